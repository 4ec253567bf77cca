"""Controlled ablation: PolyGLU and its routing ablations against SwiGLU and single-activation GLUs.

Every variant × seed is one ordinary pre-training run (`build_run` → `Trainer.fit`) made from the
same base run config, in `output_dir/<variant>/seed-<s>/`. Only the variant's model fields differ, so
all runs share the data order (the loader is seeded by the run's seed), token budget, optimiser and
schedules; seed s changes initialisation, data order and routing noise together, for every variant
alike. Afterwards the final model is scored by exact match on held-out problems of the built-in
math corpus, prompted as in pre-training ("Question: ...\\nAnswer:").

Runs go one after another and the ablation resumes where it stopped: a run with `final/` at
`max_steps` and `results.json` is read back, not retrained; an interrupted one continues from its
latest checkpoint (`Trainer.resume`). The report aggregates whatever runs are finished:
results.json, results.md (mean ± sample std over seeds, and each variant's difference to the
reference with Welch's t), loss_curves.png (mean ± std bands). With `matched_params` the PolyGLU
variants get the d_ff that matches the reference's parameter count and run in
`<variant>-matched/`, next to the unmatched runs and reusing the same baseline runs.

    config = AblationConfig.load("configs/ablation-tiny.yaml")
    report = run_ablation(config)          # or report_ablation(config) for finished runs only

The package, by concern: `config` (variants, AblationConfig), `plan` (each run's config, matched
d_ff, run directories), `run` (training and scoring the runs), `stats` (mean ± std, Welch's and paired
t) and `report` (results.json, results.md, loss curves).
"""

from polyglu.train.ablation.config import VARIANT_DESCRIPTIONS, VARIANTS, AblationConfig, AblationSection
from polyglu.train.ablation.plan import (
    RESULTS_NAME,
    is_matched,
    matched_d_ff,
    parameter_total,
    run_dir_of,
    variant_d_ff,
    variant_model_config,
    variant_model_fields,
    variant_run_config,
)
from polyglu.train.ablation.report import (
    collect_results,
    curve_band,
    markdown_table,
    plot_loss_curves,
    read_metrics,
    report_ablation,
)
from polyglu.train.ablation.run import (
    COSMETIC_TRAIN_KEYS,
    SPEC_NAME,
    held_out_problems,
    is_finished,
    run_ablation,
    run_variant,
    spec_conflicts,
)
from polyglu.train.ablation.stats import (
    METRICS,
    T_CRITICAL_95,
    aggregate,
    mean_std,
    paired,
    t_critical_95,
    welch,
)

__all__ = [
    "COSMETIC_TRAIN_KEYS", "METRICS", "RESULTS_NAME", "SPEC_NAME", "T_CRITICAL_95", "VARIANTS",
    "VARIANT_DESCRIPTIONS", "AblationConfig", "AblationSection", "aggregate", "collect_results", "curve_band",
    "held_out_problems", "is_finished", "is_matched", "markdown_table", "matched_d_ff", "mean_std", "paired",
    "parameter_total", "plot_loss_curves", "read_metrics", "report_ablation", "run_ablation", "run_dir_of",
    "run_variant", "spec_conflicts", "t_critical_95", "variant_d_ff", "variant_model_config",
    "variant_model_fields", "variant_run_config", "welch",
]
