"""Local lm-eval tasks for the adapter and client tests: a multiple-choice and a generation task over
JSONL files written next to their YAML (lm-eval reads them with `--include_path DIR`)."""

import json
from pathlib import Path


def write_tasks(root: Path, prefix: str, mc_docs: list[dict], gen_docs: list[dict], until: list[str],
                max_gen_toks: int) -> None:
    """`{prefix}_mc` (acc over `choices`, target `label`) and `{prefix}_gen` (exact match of `answer`,
    greedy, stopping at `until`) in `root`."""
    (root / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in mc_docs))
    (root / "gen.jsonl").write_text("".join(json.dumps(d) + "\n" for d in gen_docs))
    (root / f"{prefix}_mc.yaml").write_text(f"""task: {prefix}_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: choices
metric_list:
  - metric: acc
""")
    (root / f"{prefix}_gen.yaml").write_text(f"""task: {prefix}_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / 'gen.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: {json.dumps(until)}
  max_gen_toks: {max_gen_toks}
  do_sample: false
metric_list:
  - metric: exact_match
""")
