"""Decoding state, allocated by the caller: keys/values per layer and the causal-pool running sums.

Rows of a batch may hold several documents (left padding is a document of its own): the cache keeps
each slot's document id so attention and routing never cross documents, and positions restart per
document exactly as in an uncached forward.
"""

from __future__ import annotations

import torch

from polyglu.config import ModelConfig
from polyglu.model.layers import document_positions
from polyglu.model.polyglu import PoolState


class KVCache:
    def __init__(self, config: ModelConfig, batch_size: int, max_len: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        max_len = max_len or config.max_seq_len
        if max_len > config.max_seq_len:
            raise ValueError(f"cache length {max_len} exceeds the model context max_seq_len={config.max_seq_len}")
        self.batch_size, self.max_len = batch_size, max_len
        shape = (batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.doc_ids = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.pool = [PoolState(torch.zeros(batch_size, config.gate_hidden, device=device))
                     for _ in range(config.n_layers)]
        self.length = 0
        # while every token belongs to one document per row, attention needs no explicit mask
        self.single_document = True

    def prepare(self, T: int, doc_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Register a chunk of T new tokens: returns (doc_ids, positions), both (B, T)."""
        L = self.length
        if L + T > self.max_len:
            raise ValueError(f"KV cache overflow: {L} cached + {T} new tokens > capacity {self.max_len}")
        device = self.doc_ids.device
        if doc_ids is None:
            last_doc = self.doc_ids[:, L - 1:L] if L else torch.zeros(self.batch_size, 1, dtype=torch.long,
                                                                       device=device)
            doc_ids = last_doc.expand(self.batch_size, T)
        else:
            doc_ids = doc_ids.to(device=device, dtype=torch.long)
            if L:
                self.single_document &= bool((doc_ids == self.doc_ids[:, :1]).all())
            else:
                self.single_document = bool((doc_ids == doc_ids[:, :1]).all())
        positions = document_positions(doc_ids)
        if L:
            # the chunk's first document continues the last cached one when the ids agree
            continues = doc_ids[:, :1] == self.doc_ids[:, L - 1:L]  # (B, 1)
            in_first_run = positions == torch.arange(T, device=device)
            positions = positions + (self.positions[:, L - 1:L] + 1) * (continues & in_first_run)
        self.doc_ids[:, L:L + T] = doc_ids
        self.positions[:, L:L + T] = positions
        return doc_ids, positions

    def attention_mask(self, T: int) -> torch.Tensor | None:
        """Boolean (B, 1, T, L+T) mask for the chunk just prepared; None when plain causal suffices."""
        L = self.length
        if self.single_document and (T == 1 or L == 0):
            return None  # one token sees every cached slot; a first chunk is plain causal
        S = L + T
        q_slot = torch.arange(L, S, device=self.doc_ids.device)
        k_slot = torch.arange(S, device=self.doc_ids.device)
        mask = (k_slot[None, :] <= q_slot[:, None])[None]  # (1, T, S)
        if not self.single_document:
            mask = mask & (self.doc_ids[:, None, :S] == self.doc_ids[:, L:S, None])
        return mask[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, Hkv, T, hd) at the current offset; return the filled prefix incl. them."""
        L, T = self.length, k.shape[2]
        self.keys[layer][:, :, L:L + T] = k
        self.values[layer][:, :, L:L + T] = v
        return self.keys[layer][:, :, :L + T], self.values[layer][:, :, :L + T]

    def advance(self, T: int) -> None:
        self.length += T

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (beam search / dropping finished rows)."""
        self.keys = [k[index] for k in self.keys]
        self.values = [v[index] for v in self.values]
        self.doc_ids, self.positions = self.doc_ids[index], self.positions[index]
        for state in self.pool:
            state.total = state.total[index]
        self.batch_size = int(index.numel())
