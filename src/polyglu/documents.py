"""The document-id contract: what a document is, and every rule derived from it.

A row of a batch may hold several documents (packed training data, left or right padding). The
caller labels each token with a document id, `doc_ids` (..., T) integers, and

    a document is a maximal run of equal ids along the row.

Only the boundaries matter, not the values: ids [0, 0, 1, 1, 0, 0] are three documents, and the
third never sees the first. Attention, rotary positions, causal and sequence routing pools and the
KV cache all derive from the helpers below, so they cannot disagree.

Padding is a document of its own with the id PADDING_DOCUMENT (-1); real tokens' ids are >= 0.

Torch only; imports nothing from polyglu (the model, the data loaders and the interop layers all
depend on it).
"""

from __future__ import annotations

import torch

PADDING_DOCUMENT = -1  # the id of padding tokens (real documents are numbered from 0)


def document_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """Bool (..., T): True where a document (a run of equal ids) begins; the first token always does."""
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[..., 1:] = doc_ids[..., 1:] != doc_ids[..., :-1]
    return starts


def segment_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Long (..., T): the index of each token's document along its row, 0, 1, 2, ... (non-decreasing).

    Two tokens of a row are in the same document exactly when their segment ids are equal.
    """
    return document_starts(doc_ids).long().cumsum(dim=-1) - 1


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Long (..., T): the position of each token inside its document, restarting at 0 at each start."""
    T = doc_ids.shape[-1]
    index = torch.arange(T, device=doc_ids.device).expand(doc_ids.shape)
    first = torch.where(document_starts(doc_ids), index, torch.zeros_like(index)).cummax(dim=-1).values
    return index - first


def segment_causal_mask(query_segments: torch.Tensor, key_segments: torch.Tensor,
                        query_slots: torch.Tensor) -> torch.Tensor:
    """Bool (B, 1, T, S): query t sees key slot s when s <= its slot and both are in the same segment.

    query_segments (B, T) and key_segments (B, S) are segment ids on one axis of slots (a cache's
    slots, or the positions of one row); query_slots (T,) or (B, T) are the queries' slots. Slots past
    the queries (unwritten cache slots included) are never seen.
    """
    key_slots = torch.arange(key_segments.shape[-1], device=key_segments.device)
    causal = key_slots <= query_slots[..., None]  # (T, S) or (B, T, S)
    same_document = query_segments[:, :, None] == key_segments[:, None, :]  # (B, T, S)
    return (same_document & causal)[:, None]


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Bool (B, 1, T, T): causal attention inside each document of a (B, T) batch."""
    segments = segment_ids(doc_ids)
    return segment_causal_mask(segments, segments, torch.arange(doc_ids.shape[-1], device=doc_ids.device))


def doc_ids_from_eos(ids: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """Long (..., T): a new document starts after each `eos_id` token; the EOS belongs to the document
    it ends. `eos_id` None: one document (zeros)."""
    if eos_id is None:
        return torch.zeros_like(ids, dtype=torch.long)
    is_eos = (ids == eos_id).long()
    return is_eos.cumsum(dim=-1) - is_eos


def doc_ids_with_padding(is_token: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Long (B, T): `doc_ids` (default: every token in document 0) with padding set to PADDING_DOCUMENT.

    is_token (B, T) bool (or 0/1, as an attention mask): True on real tokens, False on padding, on
    either side or in the middle (a gap splits the row: the tokens after it are a new document).
    """
    is_token = is_token.bool()
    if doc_ids is None:
        doc_ids = torch.zeros(is_token.shape, dtype=torch.long, device=is_token.device)
    return doc_ids.long().masked_fill(~is_token, PADDING_DOCUMENT)
