"""Ablation: config validation, variant construction, parameter matching, resumability, aggregation."""

import json
import math
from pathlib import Path

import pytest

from polyglu import PolychromaticLM
from polyglu.config import ConfigError
from polyglu.train import ablation
from polyglu.train.ablation import (
    VARIANTS,
    AblationConfig,
    aggregate,
    markdown_table,
    mean_std,
    paired,
    parameter_total,
    read_metrics,
    variant_d_ff,
    variant_model_config,
    variant_run_config,
    welch,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY_MODEL = {"preset": "debug", "d_model": 32, "d_ff": 48, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2,
              "head_dim": 8, "max_seq_len": 64, "gate_hidden": 8}


def _micro(tmp_path, variants=("swiglu", "polyglu-static"), **ablation_keys) -> dict:
    """A whole ablation in a few seconds: byte tokens, a 1-layer model, 4 steps, 4 test problems."""
    return {
        "base": {"model": dict(TINY_MODEL),
                 "data": {"tokenizer": "byte", "seq_len": 32, "builtin_train": 100, "builtin_validation": 20,
                          "builtin_test": 10},
                 "train": {"max_steps": 4, "batch_size": 2, "lr": 3.0e-3, "warmup_steps": 1, "log_every": 1,
                           "eval_every": 2, "eval_batches": 1, "checkpoint_every": 2, "keep_checkpoints": 1,
                           "routing_stats_every": 4, "progress": False}},
        "ablation": {"output_dir": str(tmp_path / "ablation"), "variants": list(variants), "seeds": 1,
                     "eval_problems": 4, "eval_max_new_tokens": 8, "eval_batch_size": 4, "plot": False,
                     **ablation_keys},
    }


def _write(tmp_path, data) -> Path:
    path = tmp_path / "ablation.json"
    path.write_text(json.dumps(data))
    return path


# ---- config


# what each shipped config compares (the tiny and GPU ones predate polyglu-neuron)
SHIPPED_VARIANTS = {
    "ablation-tiny.yaml": set(VARIANTS) - {"polyglu-neuron"},
    "ablation-gpu.yaml": set(VARIANTS) - {"polyglu-neuron"},
    "ablation-routing.yaml": {"swiglu", "polyglu", "polyglu-neuron", "polyglu-static"},
}


@pytest.mark.parametrize("name", SHIPPED_VARIANTS)
def test_shipped_configs_load(name):
    config = AblationConfig.load(CONFIGS / name)
    assert set(config.ablation.variants) == SHIPPED_VARIANTS[name]
    assert config.ablation.seeds >= 3 and config.ablation.reference == "swiglu"
    for variant in VARIANTS:  # every variant's run config validates
        variant_run_config(config, variant, config.base.train.seed)


@pytest.mark.parametrize("key, value, message", [
    ("ablation.seed", 3, "unknown config key 'ablation.seed'"),
    ("ablation.variants", ["polyglu", "swishglu"], "unknown variant 'swishglu'"),
    ("ablation.seeds", 0, "ablation.seeds must be >= 1"),
    ("base.train.max_step", 3, "unknown config key 'base.train.max_step'"),
    ("base.model.ffn", "swiglu", "base.model.ffn is set by each variant"),
    ("base.model.routing_scope", "neuron", "base.model.routing_scope is set by each variant"),
    ("base.task", "sft", "base.task must be 'pretrain'"),
    ("extra", 1, "unknown config key 'extra'"),
])
def test_config_errors_name_the_key(tmp_path, key, value, message):
    data = _micro(tmp_path)
    node = data
    *parents, last = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        AblationConfig.load(_write(tmp_path, data))


def test_dotted_overrides(tmp_path):
    config = AblationConfig.load(_write(tmp_path, _micro(tmp_path)), ["base.train.max_steps=7", "ablation.seeds=2"])
    assert config.base.train.max_steps == 7 and config.seeds() == [0, 1]


# ---- variants


def test_variants_are_what_they_claim(tmp_path):
    config = AblationConfig.load(_write(tmp_path, _micro(tmp_path)))
    for variant, fields in VARIANTS.items():
        run = variant_run_config(config, variant, seed=5)
        assert run.train.seed == 5 and Path(run.run_dir) == tmp_path / "ablation" / variant / "seed-5"
        assert run.data.builtin_dir == str(tmp_path / "ablation" / "data")  # data prepared once, shared
        model_config = run.model_config()
        for key, value in fields.items():
            assert getattr(model_config, key) == value, (variant, key)
        # everything but the variant's own fields equals the base
        base = config.base.model_config()
        assert model_config.replace(**{k: getattr(base, k) for k in fields}) == base
        model = PolychromaticLM(model_config)
        names = [n for n, _ in model.named_parameters()]
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        has_gate_net = any(".gate_net." in n for n in names)
        has_alpha = any(n.endswith(".alpha") for n in trainable)
        has_map = any(n.endswith(".routing_map") for n in trainable)
        assert has_map == (variant == "polyglu-neuron"), variant
        if variant in ("polyglu", "polyglu-nonoise", "polyglu-neuron"):
            assert has_gate_net and has_alpha
        elif variant == "polyglu-static":
            assert not has_gate_net and not any(n.endswith(".beta") for n in names) and has_alpha
        elif variant == "polyglu-dynamic":
            assert has_gate_net and not has_alpha
            assert all(float(b.abs().sum()) == 0 for n, b in model.named_buffers() if n.endswith(".alpha"))
        else:
            assert not has_gate_net and not has_alpha and model_config.ffn == variant
    assert not variant_run_config(config, "polyglu-nonoise", 0).model_config().routing_noise


def test_matched_params_within_one_percent(tmp_path):
    config = AblationConfig.load(_write(tmp_path, _micro(tmp_path, variants=list(VARIANTS), matched_params=True)))
    d_ffs = variant_d_ff(config)
    reference = parameter_total(variant_model_config(config, "swiglu"))
    for variant, d_ff in d_ffs.items():
        if VARIANTS[variant]["ffn"] == "polyglu":
            assert d_ff < TINY_MODEL["d_ff"]
            total = parameter_total(variant_model_config(config, variant, d_ff))
            assert abs(total - reference) / reference < 0.01, (variant, total, reference)
            # closest: one neuron more or fewer is no nearer
            for other in (d_ff - 1, d_ff + 1):
                assert abs(parameter_total(variant_model_config(config, variant, other)) - reference) >= \
                    abs(total - reference)
        else:
            assert d_ff is None
    unmatched = AblationConfig.load(_write(tmp_path, _micro(tmp_path)))
    assert set(variant_d_ff(unmatched).values()) == {None}
    # matched PolyGLU runs get their own directories; the baselines' are shared with unmatched runs
    assert variant_run_config(config, "polyglu", 0, d_ffs["polyglu"]).run_dir.endswith("polyglu-matched/seed-0")
    assert variant_run_config(config, "swiglu", 0).run_dir == variant_run_config(unmatched, "swiglu", 0).run_dir


# ---- resumability


def test_finished_runs_are_not_retrained_and_interrupted_ones_resume(tmp_path, monkeypatch):
    from polyglu.cli import main
    from polyglu.train import setup

    path = _write(tmp_path, _micro(tmp_path))
    config = AblationConfig.load(path)
    out = tmp_path / "ablation"
    # interrupt polyglu-static after its checkpoint at step 2 (fit with stop_at also exports final/)
    interrupted = variant_run_config(config, "polyglu-static", 0)
    setup.build_run(interrupted, log=lambda *a: None).fit(stop_at=2)
    assert json.loads((out / "polyglu-static/seed-0/final/config.json").read_text())["step"] == 2

    builds = []
    real_build_run = setup.build_run

    def counting_build_run(run_config, *args, **kwargs):
        builds.append(Path(run_config.run_dir).parent.name)
        return real_build_run(run_config, *args, **kwargs)

    monkeypatch.setattr(setup, "build_run", counting_build_run)
    assert main(["ablate", "--config", str(path)]) == 0
    assert sorted(builds) == ["polyglu-static", "swiglu"]
    static_dir = out / "polyglu-static" / "seed-0"
    assert [r["step"] for r in read_metrics(static_dir)] == [1, 2, 3, 4]
    results = json.loads((static_dir / "results.json").read_text())
    assert results["steps"] == 4 and results["math"]["n"] == 4 and results["final_val_loss"] is not None
    # per-layer validation routing of a PolyGLU variant; none for the baseline
    (layer,) = results["routing"]
    assert 0 <= layer["entropy"] <= 1 and 0 <= layer["entropy_tau1"] <= 1 and 0 < layer["agreement"] <= 1
    assert layer["entropy"] <= layer["entropy_tau1"] + 1e-6  # tau < 1 at the end of training sharpens
    assert json.loads((out / "swiglu" / "seed-0" / "results.json").read_text())["routing"] is None
    report = json.loads((out / "results.json").read_text())
    assert [row["variant"] for row in report["summary"]] == ["swiglu", "polyglu-static"]
    assert [row["variant"] for row in report["routing"]] == ["polyglu-static"]
    markdown = (out / "results.md").read_text()
    assert markdown.count("| swiglu |") == 1 and "| polyglu-static | 0 |" in markdown
    assert "entropy (τ = 1)" in markdown

    # a second invocation trains nothing and rewrites no run's results
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/seed-*/results.json")}
    builds.clear()
    assert main(["ablate", "--config", str(path)]) == 0
    assert builds == []
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/seed-*/results.json")} == stamps

    # trained but not scored (interrupted during evaluation): scored without retraining
    (out / "swiglu" / "seed-0" / "results.json").unlink()
    assert main(["ablate", "--config", str(path)]) == 0
    assert builds == [] and (out / "swiglu" / "seed-0" / "results.json").is_file()

    # the same directory with another run config is refused, not silently mixed
    with pytest.raises(ConfigError, match=r"different config \(train.lr differ"):
        ablation.run_variant(AblationConfig.load(path, ["base.train.lr=1.0e-3"]), "swiglu", 0, log=lambda *a: None)
    # ... but a field added to the configs since a run was made is no conflict
    spec_path = out / "swiglu" / "seed-0" / ablation.SPEC_NAME
    spec = json.loads(spec_path.read_text())
    del spec["train"]["lr"]
    spec_path.write_text(json.dumps(spec))
    assert ablation.run_variant(config, "swiglu", 0, log=lambda *a: None)["variant"] == "swiglu"


# ---- aggregation


def _fake(variant, seed, val, acc, speed=1000.0):
    return {"variant": variant, "seed": seed, "run_dir": f"x/{variant}/seed-{seed}", "d_ff": 48,
            "parameters": {"total": 1000, "routing": 10}, "tokens_per_s": speed, "final_val_loss": val,
            "best_val_loss": val - 0.01, "math": {"accuracy": acc, "accuracy_easy": 2 * acc}}


def test_aggregate_mean_std_and_difference():
    results = [_fake("polyglu", s, v, a) for s, (v, a) in enumerate([(1.0, 0.1), (1.2, 0.2), (1.1, 0.3)])]
    results += [_fake("swiglu", s, v, 0.1) for s, v in enumerate([1.3, 1.35, 1.25])]
    rows = aggregate(results, ["polyglu", "swiglu", "geglu"], reference="swiglu")
    assert [r["variant"] for r in rows] == ["polyglu", "swiglu"]  # no geglu results: no row
    poly = rows[0]
    assert poly["final_val_loss"]["mean"] == pytest.approx(1.1)
    assert poly["final_val_loss"]["std"] == pytest.approx(0.1)  # sample std (n - 1)
    assert poly["best_val_loss"]["mean"] == pytest.approx(1.09)
    assert poly["accuracy"]["mean"] == pytest.approx(0.2) and poly["accuracy_easy"]["mean"] == pytest.approx(0.4)
    unpaired = poly["vs_reference"]["final_val_loss"]["welch"]
    se = math.sqrt(0.1**2 / 3 + 0.05**2 / 3)
    assert unpaired["diff"] == pytest.approx(-0.2) and unpaired["se"] == pytest.approx(se)
    assert unpaired["t"] == pytest.approx(-0.2 / se) and unpaired["df"] == pytest.approx(2.94, abs=0.01)
    assert not unpaired["significant"]  # |t| = 3.1 < 4.30 (df 2): two standard errors are not enough with 3 seeds
    # per seed: -0.3, -0.15, -0.15 -> mean -0.2, sd 0.0866, se 0.05, t = -4.0 < 4.30 (df 2)
    pair = poly["vs_reference"]["final_val_loss"]["paired"]
    assert pair["diff"] == pytest.approx(-0.2) and pair["se"] == pytest.approx(0.05) and pair["df"] == 2
    assert pair["t"] == pytest.approx(-4.0) and not pair["significant"]
    assert rows[1]["vs_reference"] == {}
    table = markdown_table(rows, "swiglu")
    assert "| polyglu | 48 | 1,000 | 1000 ± 0 | 1.1000 ± 0.1000 |" in table and "(reference)" in table
    assert "-0.2000 ± 0.0500 (t=-4.0)" in table


def test_statistics_helpers():
    assert mean_std([1.0, None, 3.0]) == (2.0, pytest.approx(math.sqrt(2)), 2)
    assert mean_std([2.0]) == (2.0, None, 1) and mean_std([None]) == (None, None, 0)
    assert welch([1.0], [1.0, 2.0]) is None
    same = welch([1.0, 1.1, 0.9], [1.05, 0.95, 1.0])  # overlapping: no significant difference
    assert abs(same["t"]) < 1 and not same["significant"]
    # a small but consistent per-seed difference is significant when paired, not when unpaired
    a, b = {0: 1.01, 1: 1.21, 2: 0.91, 3: 1.11}, {0: 1.0, 1: 1.2, 2: 0.9, 3: 1.1}
    assert paired(a, b)["significant"] and not welch(list(a.values()), list(b.values()))["significant"]
    assert paired({0: 1.0}, {0: 1.0, 1: 2.0}) is None


def test_plot_from_metrics(tmp_path):
    pytest.importorskip("matplotlib")
    runs = {}
    for variant, offset in (("polyglu", 0.0), ("swiglu", 0.1)):
        runs[variant] = []
        for seed in range(2):
            d = tmp_path / variant / f"seed-{seed}"
            d.mkdir(parents=True)
            rows = [{"step": s, "loss": 3 / s + offset + 0.01 * seed, **({"val_loss": 3 / s} if s % 5 == 0 else {})}
                    for s in range(1, 21)]
            (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            runs[variant].append(d)
    steps, means, stds = ablation.curve_band(runs["swiglu"], "loss")
    assert steps == list(range(1, 21)) and means[0] == pytest.approx(3.105) and stds[0] > 0
    path = ablation.plot_loss_curves(runs, tmp_path / "curves.png")
    assert path.is_file() and path.stat().st_size > 1000


def test_aggregate_routing_over_seeds():
    from polyglu.train.ablation.report import routing_table
    from polyglu.train.ablation.stats import aggregate_routing

    def layer(entropy, agreement):
        return {"layer": 0, "entropy": entropy, "entropy_tau1": 2 * entropy, "agreement": agreement,
                "variance": {"fractions": {"between_inputs": 0.9, "between_neurons": 0.05, "interaction": 0.05}}}

    results = [{**_fake("polyglu", s, 1.0, 0.1), "routing": [layer(e, a)]}
               for s, (e, a) in enumerate([(0.1, 1.0), (0.3, 0.8)])]
    results.append({**_fake("swiglu", 0, 1.0, 0.1), "routing": None})
    (row,) = aggregate_routing(results, ["swiglu", "polyglu"])
    assert row["variant"] == "polyglu" and row["seeds"] == [0, 1]
    cell = row["layers"][0]
    assert cell["entropy"]["mean"] == pytest.approx(0.2) and cell["entropy_tau1"]["mean"] == pytest.approx(0.4)
    assert cell["agreement"]["std"] == pytest.approx(math.sqrt(0.02))
    assert cell["between_inputs"]["mean"] == pytest.approx(0.9)
    assert "| polyglu | 0 | 20.0 ± 14.1% | 40.0 ± 28.3% | 90.0 ± 14.1% | 90.0 ± 0.0% | 5.0 ± 0.0% | 2 |" \
        in routing_table([row])
