"""The inference wing: everything that runs a trained model token by token.

- `engine`: prefill, then a loop of decode steps, as a generator of per-step results (`Engine`);
- `generation`: `generate`, the steps collected into a `GenerationOutput` (the public entry point);
- `cache`: `KVCache`, the keys/values and routing running state, used through its methods only;
- `compiled`: `DecodeStep`, the static-cache decode step, eager or under one `torch.compile`;
- `sampling`: pure functions of the logits;
- `text`: the incremental decoder, stop strings and `TextStreamer`.

The model serves it through `PolychromaticLM.forward(ids, doc_ids, cache=..., logits_to_keep=1)` and
`PolychromaticLM.decode_step(ids, cache)`; docs/architecture.md draws the path of one token.
"""

from polyglu.inference.cache import KVCache
from polyglu.inference.compiled import DecodeStep, check_compile, compile_setting
from polyglu.inference.engine import Engine, Sampling, Step, release_caches
from polyglu.inference.generation import GenerationOutput, StreamCallback, generate
from polyglu.inference.sampling import check_sampling, filter_logits, mask_padding, sample_next
from polyglu.inference.text import IncrementalDecoder, StopStringMatcher, TextStreamer

__all__ = ["DecodeStep", "Engine", "GenerationOutput", "IncrementalDecoder", "KVCache", "Sampling", "Step",
           "StopStringMatcher", "StreamCallback", "TextStreamer", "check_compile", "check_sampling",
           "compile_setting", "filter_logits", "generate", "mask_padding", "release_caches", "sample_next"]
