"""Evaluation: exact-match math (`math`), perplexity over token shards (`perplexity`), and the
lm-evaluation-harness adapter (`harness`, needs the optional `lm-eval` package). All of them score or
generate through `polyglu.eval.scoring` and `polyglu.generate`."""
