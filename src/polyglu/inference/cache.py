"""The decoding state: keys/values per layer and the causal-pool running sums, in one class.

    cache = KVCache.for_model(model, batch_size, max_len)
    logits = model(prompt_ids, cache=cache, logits_to_keep=1).logits[:, -1]    # prefill
    logits = model.decode_step(next_ids, cache)                                # one token per row

The model reads and writes the cache only through its methods (`prepare`, `attention_mask`,
`update`, `pool_state`, `advance`; for a decode step at fixed shapes `step_inputs` and `step_view`),
and so do the engine and the compiled step (`check_room`, `static_tensors`, `reorder`, `reset`):
nothing outside this module reads its tensors. `batch_size`, `max_len`, `length` (slots filled),
`device` and `dtype` are its read-only public state.

Rows of a batch may hold several documents (left padding is a document of its own): the cache keeps
each slot's document (segment id) so attention and routing never cross documents, and positions
restart per document exactly as in an uncached forward, whatever the chunking.
"""

from __future__ import annotations

import torch

from polyglu.documents import document_positions, segment_causal_mask, segment_ids
from polyglu.model.polyglu import PoolState
from polyglu.model_config import ModelConfig


class KVCache:
    """Keys/values per layer (B, Hkv, max_len, hd), preallocated, plus per slot the document (a
    segment id, non-decreasing along the row) and the rotary position of the token written there.

    A chunk's doc_ids follow the contract of `polyglu.documents`: runs of equal ids are documents.
    Its first run continues the row's last cached document when its id equals that document's id
    (the id the caller gave), and starts a new document otherwise; every later run is a new document.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        max_len = max_len or config.max_seq_len
        if max_len > config.max_seq_len:
            raise ValueError(f"cache length {max_len} exceeds the model context max_seq_len={config.max_seq_len}")
        self.batch_size, self.max_len = batch_size, max_len
        shape = (batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.segments = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.last_doc_id = torch.zeros(batch_size, dtype=torch.long, device=device)  # the caller's id
        self.pool = [PoolState(torch.zeros(batch_size, config.gate_hidden, device=device))
                     for _ in range(config.n_layers)]
        self.length = 0  # slots filled, on the host
        self.filled = torch.zeros((), dtype=torch.long, device=device)  # the same count, on the device
        # while every row holds one document, attention needs no explicit mask
        self.single_document = True

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int | None = None) -> KVCache:
        """A cache for `model` (any module with a `config` and parameters), on its device and in its dtype."""
        p = next(model.parameters())
        return cls(model.config, batch_size, max_len, device=p.device, dtype=p.dtype)

    @property
    def device(self) -> torch.device:
        return self.segments.device

    @property
    def doc_ids(self) -> torch.Tensor:
        """(B, max_len) segment ids; the old name, kept for callers that read it."""
        return self.segments

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype if self.keys else torch.float32

    def pool_state(self, layer: int) -> PoolState:
        """Layer `layer`'s causal-pool running sums (updated in place by its PolyGLU)."""
        return self.pool[layer]

    def filled_segments(self, T: int) -> torch.Tensor:
        """(B, length + T): the segment ids of the cached slots and of the chunk just prepared."""
        return self.segments[:, :self.length + T]

    def static_tensors(self) -> list[torch.Tensor]:
        """Every tensor a decode step writes in place: what CUDA graphs must see at fixed addresses."""
        return [*self.keys, *self.values, self.segments, self.positions, self.filled,
                *(state.total for state in self.pool)]

    def reset(self) -> None:
        """Empty the cache in place, every tensor at its address (reused by a later generation)."""
        for tensor in (*self.static_tensors(), self.last_doc_id):
            tensor.zero_()
        self.length, self.single_document = 0, True

    def prepare(self, T: int, doc_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Register a chunk of T new tokens: returns (segment ids, positions), both (B, T).

        doc_ids None: the chunk continues each row's last document."""
        L = self.length
        if L + T > self.max_len:
            raise ValueError(f"KV cache overflow: {L} cached + {T} new tokens > capacity {self.max_len}")
        device = self.segments.device
        offsets = torch.arange(T, device=device)
        if doc_ids is None:
            if L:
                segments = self.segments[:, L - 1:L].expand(self.batch_size, T)
                positions = self.positions[:, L - 1:L] + 1 + offsets
            else:
                segments = torch.zeros(self.batch_size, T, dtype=torch.long, device=device)
                positions = offsets.expand(self.batch_size, T)
        else:
            doc_ids = doc_ids.to(device=device, dtype=torch.long)
            segments, positions = segment_ids(doc_ids), document_positions(doc_ids)
            if L:
                continues = (doc_ids[:, :1] == self.last_doc_id[:, None])  # (B, 1)
                in_first = segments == 0
                positions = positions + (self.positions[:, L - 1:L] + 1) * (continues & in_first)
                segments = segments + self.segments[:, L - 1:L] + (~continues).long()
            self.last_doc_id = doc_ids[:, -1].clone()
            self.single_document = bool((segments[:, -1] == 0).all())
        self.segments[:, L:L + T] = segments
        self.positions[:, L:L + T] = positions
        return segments, positions

    def attention_mask(self, T: int) -> torch.Tensor | None:
        """Boolean (B, 1, T, L+T) mask for the chunk just prepared; None when plain causal suffices."""
        L = self.length
        if self.single_document and (T == 1 or L == 0):
            return None  # one token sees every cached slot; a first chunk is plain causal
        S = L + T
        return segment_causal_mask(self.segments[:, L:S], self.segments[:, :S],
                                   torch.arange(L, S, device=self.segments.device))

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, Hkv, T, hd) at the current offset; return the filled prefix incl. them."""
        L, T = self.length, k.shape[2]
        self.keys[layer][:, :, L:L + T] = k
        self.values[layer][:, :, L:L + T] = v
        return self.keys[layer][:, :, :L + T], self.values[layer][:, :, :L + T]

    def advance(self, T: int) -> None:
        self.length += T
        self.filled += T

    # ---- one decode step at fixed shapes (see PolychromaticLM.decode_step)

    def check_room(self, T: int = 1) -> None:
        if self.length + T > self.max_len:
            raise ValueError(f"KV cache overflow: {self.length} cached + {T} new tokens > capacity {self.max_len}")

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Register one token per row continuing each row's last document, at slot `filled`, reading
        nothing on the host: returns (segments (B, 1), positions (B, 1), mask (B, 1, 1, max_len))."""
        slot = self.filled.view(1, 1).expand(self.batch_size, 1)  # (B, 1)
        last = (slot - 1).clamp(min=0)
        segments = self.segments.gather(1, last)
        positions = (self.positions.gather(1, last) + 1) * (slot > 0)  # a first token is at position 0
        self.segments.scatter_(1, slot, segments)
        self.positions.scatter_(1, slot, positions)
        mask = segment_causal_mask(segments, self.segments, self.filled.view(1))
        return segments, positions, mask

    def step_view(self, positions: torch.Tensor | None = None) -> _StepView:
        """The cache as one decode step sees it; `positions` (B, 1) (from `step_inputs`) lets every
        layer's causal pooling share the step's restart flags and token counts."""
        return _StepView(self, positions)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (beam search / dropping finished rows)."""
        self.keys = [k[index] for k in self.keys]
        self.values = [v[index] for v in self.values]
        self.segments, self.positions = self.segments[index], self.positions[index]
        self.last_doc_id = self.last_doc_id[index]
        for state in self.pool:
            state.total = state.total[index]
        self.batch_size = int(index.numel())


class _StepView:
    """The cache as one decode step sees it: k, v are written at slot `filled` and attention reads
    every one of the max_len slots (the step's mask hides the unwritten ones), so every step has the
    same shapes and no host-side length."""

    def __init__(self, cache: KVCache, positions: torch.Tensor | None = None) -> None:
        self.cache, self.pool = cache, cache.pool
        if positions is not None:  # the same running sums, with the step's shared flags and counts
            keep, count = (positions > 0).float(), (positions + 1).float()
            self.pool = [PoolState(state.total, keep, count) for state in cache.pool]

    def pool_state(self, layer: int) -> PoolState:
        return self.pool[layer]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        slot = self.cache.filled.view(1)
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        keys.index_copy_(2, slot, k)
        values.index_copy_(2, slot, v)
        return keys, values
