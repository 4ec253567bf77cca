"""The document-id contract (polyglu.documents): a document is a maximal run of equal ids."""

import torch

from polyglu.documents import (
    PADDING_DOCUMENT,
    doc_ids_from_eos,
    doc_ids_with_padding,
    document_causal_mask,
    document_positions,
    document_starts,
    segment_ids,
)

RETURNING = torch.tensor([[0, 0, 0, 1, 1, 1, 0, 0, 0]])  # three documents: the third reuses id 0


def test_runs_not_values_define_documents():
    assert document_starts(RETURNING).tolist() == [[True, False, False, True, False, False, True, False, False]]
    assert segment_ids(RETURNING).tolist() == [[0, 0, 0, 1, 1, 1, 2, 2, 2]]
    assert document_positions(RETURNING).tolist() == [[0, 1, 2, 0, 1, 2, 0, 1, 2]]
    # only boundaries matter: any relabelling with the same runs gives the same segments
    assert torch.equal(segment_ids(torch.tensor([[7, 7, 7, -1, -1, -1, 3, 3, 3]])), segment_ids(RETURNING))


def test_helpers_work_on_any_leading_shape():
    flat = torch.tensor([5, 5, 2, 2, 2, 5])
    assert segment_ids(flat).tolist() == [0, 0, 1, 1, 1, 2]
    assert document_positions(flat).tolist() == [0, 1, 0, 1, 2, 0]


def test_document_causal_mask_blocks_a_returning_id():
    mask = document_causal_mask(RETURNING)[0, 0]  # (T, T)
    expected = torch.zeros(9, 9, dtype=torch.bool)
    for start in (0, 3, 6):
        expected[start:start + 3, start:start + 3] = torch.ones(3, 3, dtype=torch.bool).tril()
    assert torch.equal(mask, expected)


def test_eos_ends_the_document_it_closes():
    eos = 9
    ids = torch.tensor([[4, eos, 5, 6, eos, eos, 1]])
    assert doc_ids_from_eos(ids, eos).tolist() == [[0, 0, 1, 1, 1, 2, 3]]
    assert doc_ids_from_eos(ids, None).tolist() == [[0] * 7]


def test_padding_is_one_document_id_on_either_side_or_inside():
    is_token = torch.tensor([[0, 0, 1, 1], [1, 1, 0, 0], [1, 0, 1, 1]])
    doc_ids = doc_ids_with_padding(is_token)
    P = PADDING_DOCUMENT
    assert doc_ids.tolist() == [[P, P, 0, 0], [0, 0, P, P], [0, P, 0, 0]]
    # a gap of padding splits a row: the tokens after it are a new document
    assert segment_ids(doc_ids)[2].tolist() == [0, 1, 2, 2]
    packed = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 0, 0]])
    assert doc_ids_with_padding(is_token, packed).tolist() == [[P, P, 1, 1], [0, 1, P, P], [0, P, 0, 0]]
