"""What a batch tells the recorder (record/batches.py), table-driven: indices, labels, inputs, row metadata."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_dualform.record.batches import (
    BatchInfo,
    batch_indices,
    batch_inputs,
    batch_labels,
    batch_size,
    layer_layout,
    row_metadata,
    unknown_layout,
)
from lightning_dualform.record.capture import CallRows

X = torch.randn(4, 3)
Y = torch.tensor([2, 0, 1, 1])
IDX = torch.tensor([10, 11, 12, 13])


@pytest.mark.parametrize("batch, key, want", [
    ({"x": X, "index": IDX}, "index", IDX),
    ({"x": X, "idx": IDX}, "idx", IDX),
    ({"x": X}, "index", None),
    ((X, Y, IDX), 2, IDX),
    ((X, Y, IDX), -1, IDX),
    ((X, Y), 2, None),  # no such position
    ((X, Y, IDX), "index", None),  # a name does not index a tuple
    ({"x": X, "index": IDX.float()}, "index", None),  # float "indices" are not indices
    ({"x": X, "index": [10, 11, 12, 13]}, "index", IDX),
    ((X, Y, IDX), True, None),  # a bool is not a position
])
def test_batch_indices(batch, key, want):
    got = batch_indices(batch, key)
    assert (got is None and want is None) or torch.equal(got, want)


@pytest.mark.parametrize("batch, key, want", [
    ((X, Y), None, Y), ({"x": X, "label": Y}, None, Y), ({"x": X, "targets": Y}, None, Y), ({"x": X, "c": Y}, "c", Y),
    ((X, Y.float()), None, None), ((X,), None, None), ((Y, X), 0, Y),
])
def test_batch_labels(batch, key, want):
    got = batch_labels(batch, key)
    assert (got is None and want is None) or torch.equal(got, want)


@pytest.mark.parametrize("batch, key, want", [
    ((X, Y), None, X), ({"image": X, "y": Y}, None, X), ({"pix": X}, "pix", X), (X, None, X), ({"y": Y}, None, None),
])
def test_batch_inputs(batch, key, want):
    got = batch_inputs(batch, key)
    assert (got is None and want is None) or got is want


def test_batch_size():
    assert batch_size((X, Y)) == 4 and batch_size({"a": X}) == 4 and batch_size(torch.tensor(1.0)) is None


def _call(n: int, lead: tuple[int, ...]) -> CallRows:
    return CallRows(keys=torch.zeros(n, 2), lead_shape=lead, call=0)


@pytest.mark.parametrize("n, lead, labels, offset, index, position, label", [
    # one row per example (an MLP)
    (4, (4,), Y, 0, [10, 11, 12, 13], [0, 0, 0, 0], [2, 0, 1, 1]),
    # batch first, 2 positions per example (a sequence, or conv locations)
    (8, (4, 2), Y, 0, [10, 10, 11, 11, 12, 12, 13, 13], [0, 1] * 4, [2, 2, 0, 0, 1, 1, 1, 1]),
    # per-position labels (B, T)
    (8, (4, 2), torch.arange(8).reshape(4, 2), 0, [10, 10, 11, 11, 12, 12, 13, 13], [0, 1] * 4, list(range(8))),
    # sequence first (T, B): row r is position r // B of example r % B
    (8, (2, 4), Y, 0, [10, 11, 12, 13] * 2, [0, 0, 0, 0, 1, 1, 1, 1], [2, 0, 1, 1] * 2),
    # a second call of the same layer in the batch (an RNN cell): positions continue after the offset
    (4, (4,), Y, 3, [10, 11, 12, 13], [3, 3, 3, 3], [2, 0, 1, 1]),
])
def test_row_metadata(n, lead, labels, offset, index, position, label):
    info = BatchInfo(size=4, indices=IDX, labels=labels)
    got_index, got_position, got_label, _ = row_metadata(_call(n, lead), info, offset)
    assert got_index.tolist() == index
    assert got_position.tolist() == position
    assert got_label.tolist() == label


@pytest.mark.parametrize("lead", [(4, 4), (4, 4, 2)])
def test_row_metadata_of_a_layout_that_cannot_be_told_stores_minus_one(lead):
    # (B, B, ...): batch first (B, T) or sequence first (T, B) with T == B look the same; no guess
    n = int(np.prod(lead))
    call = _call(n, lead)
    info = BatchInfo(size=4, indices=IDX, labels=torch.arange(16).reshape(4, 4) if len(lead) == 2 else Y)
    assert unknown_layout(call, 4)
    index, position, label, per_ex = row_metadata(call, info, 2)
    assert index.tolist() == [-1] * n and label.tolist() == [-1] * n
    assert position.tolist() == list(range(2, n + 2)) and per_ex == n  # as for an unknown layout
    _, _, _, _, example = row_metadata(call, info, 0, with_example=True)  # query recording
    assert example.tolist() == [-1] * n


@pytest.mark.parametrize("lead, layout", [((4,), None), ((4, 2), None), ((2, 4), None), ((4, 3, 4), None),
                                           ((4, 4), "batch_first"), ((4, 4), "sequence_first")])
def test_a_layout_that_can_be_told_is_not_unknown(lead, layout):
    # one row per example, batch first, sequence first, the batch size only later; (B, B) with a declared layout
    assert not unknown_layout(_call(int(np.prod(lead)), lead), 4, layout)
    assert not unknown_layout(_call(16, (4, 4)), None) and not unknown_layout(_call(9, (3, 3)), 4)


def test_a_convolutions_rows_are_batch_first_even_with_as_many_locations_as_examples():
    conv = torch.nn.Conv1d(1, 1, 1)
    assert layer_layout(conv) == layer_layout(conv, "sequence_first") == "batch_first"
    index, position, _, per_ex = row_metadata(_call(16, (4, 4)), BatchInfo(size=4, indices=IDX, labels=Y), 0,
                                              layout=layer_layout(conv))
    assert index.tolist() == [10] * 4 + [11] * 4 + [12] * 4 + [13] * 4 and position.tolist() == [0, 1, 2, 3] * 4
    assert per_ex == 4


@pytest.mark.parametrize("layout", ["batch_first", "sequence_first"])
def test_a_declared_layout_names_the_examples_of_a_call_whose_shape_cannot(layout):
    # (B, B) rows; per-position labels (B, B) could be (B, T) or (T, B): left unknown; one label per example kept
    labels = torch.arange(16).reshape(4, 4)
    info = BatchInfo(size=4, indices=IDX, labels=labels)
    index, position, label, per_ex = row_metadata(_call(16, (4, 4)), info, 0, layout=layout)
    rows = np.arange(16)
    b, t = (rows // 4, rows % 4) if layout == "batch_first" else (rows % 4, rows // 4)
    assert index.tolist() == IDX[b].tolist() and position.tolist() == t.tolist() and per_ex == 4
    assert label.tolist() == [-1] * 16
    _, _, per_example, _ = row_metadata(_call(16, (4, 4)), BatchInfo(size=4, indices=IDX, labels=Y), 0, layout=layout)
    assert per_example.tolist() == Y[b].tolist()
    _, _, _, _, example = row_metadata(_call(16, (4, 4)), info, 0, with_example=True, layout=layout)  # queries
    assert example.tolist() == b.tolist()
    # a call whose shape says its layout keeps it, whatever was declared
    index, position, _, _ = row_metadata(_call(8, (2, 4)), info, 0, layout="batch_first")
    assert index.tolist() == IDX.tolist() * 2 and position.tolist() == [0] * 4 + [1] * 4


def test_the_layout_option_is_checked():
    from lightning_dualform.record.options import RecordOptions

    opts = RecordOptions.checked("DualFormCallback", "s.h5", None, layout={"enc.linear1": "sequence_first"})
    assert opts.layout_of("enc.linear1") == "sequence_first" and opts.layout_of("head") is None
    assert RecordOptions.checked("X", "s.h5", None, layout="batch_first").layout_of("any") == "batch_first"
    for bad in ("seq_first", {"a": "T,B"}, {1: "batch_first"}, ["sequence_first"]):
        with pytest.raises(ValueError, match=r"layout=.*expected None, one of \('batch_first', 'sequence_first'\)"):
            RecordOptions.checked("DualFormCallback", "s.h5", None, layout=bad)


def test_row_metadata_without_batch_facts_stores_minus_one():
    info = BatchInfo(size=None, indices=None, labels=None)
    index, position, label, per_ex = row_metadata(_call(3, (3,)), info, 0)
    assert index.tolist() == [-1, -1, -1] and label.tolist() == [-1, -1, -1] and position.tolist() == [0, 1, 2]


def test_first_seen_marks_each_index_once_across_batches_and_within_one():
    from lightning_dualform.record.batches import FirstSeen

    seen = FirstSeen(np.array([3, 1]))  # a resumed store already holds 1 and 3
    np.testing.assert_array_equal(seen.take(np.array([0, 1, 2, 2, 3, 9])), [True, False, True, False, False, True])
    np.testing.assert_array_equal(seen.take(np.array([9, 2, 40, 40])), [False, False, True, False])  # grown past 9
    np.testing.assert_array_equal(FirstSeen().take(np.array([5, 5])), [True, False])
