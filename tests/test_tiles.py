"""Tile plans of the tensor-core CUDA forward, checked on the host: every pair
of the layout is in exactly one chunk of one pass, and nothing else is."""

import numpy as np
import pytest
import torch

from sparse_attention import _torch_ops, build_layout
from sparse_attention._native import C
from sparse_attention._tiles import TILE, build_tile_plan

PATTERNS = ["dense", "axial", "block", "longformer", "strided", "random"]
SIZES = [(1, 1), (1, 17), (9, 1), (7, 13), (33, 35), (20, 70), (64, 64)]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_plan_covers_every_pair_once(pattern, size):
    layout = build_layout(pattern, *size, kernel_size=5, block_size=4, num_global_tokens=2,
                          attention_ratio=0.3)
    plan = build_tile_plan(layout)
    n = layout.num_tokens
    queries, keys = zip(*(one.pairs() for one in plan))
    got = np.sort(np.concatenate(queries).astype(np.int64) * n + np.concatenate(keys))
    short = ~np.isin(layout.row_ids(), plan.long_rows)  # long rows go to another kernel
    expected = np.sort(layout.row_ids()[short] * n + layout.indices[short])
    np.testing.assert_array_equal(got, expected)  # no pair missing, none twice, none extra
    for one in plan:
        assert one.queries.shape[1] == TILE and one.keys.shape[1] == TILE
        assert one.chunk_ptr[0] == 0 and one.chunk_ptr[-1] == one.num_chunks
        assert np.all(np.diff(one.chunk_ptr) >= 0)
        # every token but the long rows is in exactly one tile of every pass (the
        # first pass writes all those rows)
        tokens = np.sort(one.queries[one.queries >= 0])
        np.testing.assert_array_equal(tokens, np.setdiff1d(np.arange(n), plan.long_rows))
        # a chunk's keys ascend, padding (-1) only at its end, no bits on padding
        for chunk_keys, words in zip(one.keys, one.masks.view(np.uint64)):
            real = chunk_keys[chunk_keys >= 0]
            assert np.all(np.diff(real) > 0) and np.all(chunk_keys[real.size:] == -1)
            if real.size < TILE:
                assert not np.any(words >> np.uint64(real.size))


@pytest.mark.parametrize("pattern, size", [("axial", (33, 35)), ("random", (20, 70)),
                                           ("longformer", (33, 35)), ("strided", (64, 64))])
def test_plan_is_the_same_when_the_presence_table_is_built_in_blocks(pattern, size, monkeypatch):
    from sparse_attention import _tiles

    layout = build_layout(pattern, *size, kernel_size=5, num_global_tokens=2, attention_ratio=0.3)
    whole = build_tile_plan(layout)
    n = layout.num_tokens
    monkeypatch.setattr(_tiles, "_PRESENCE_BYTES", 4 * n * 3)  # three tiles per block
    blocked = build_tile_plan(layout)
    assert len(blocked) == len(whole)
    for a, b in zip(whole, blocked):
        assert a.queries.shape[0] > 3  # more than one block
        for field in ("queries", "chunk_ptr", "keys", "masks"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def test_axial_splits_into_row_and_column_passes_without_waste():
    layout = build_layout("axial", 64, 64)
    plan = build_tile_plan(layout)
    assert [one.shape for one in plan] == [(1, 64), (64, 1)]
    used = sum(one.num_chunks for one in plan) * TILE * TILE
    assert layout.nnz / used > 0.99


def test_block_tiles_are_the_blocks():
    layout = build_layout("block", 32, 32, block_size=8)
    plan = build_tile_plan(layout)
    assert len(plan) == 1 and plan[0].shape == (8, 8) and plan[0].num_chunks == 16
    assert np.all(plan[0].masks == -1)  # all 64 x 64 bits set


def test_no_plan_for_layouts_past_the_limits():
    assert build_tile_plan(build_layout("dense", 128, 128)) is None


def test_long_rows_are_left_to_the_block_kernel():
    layout = build_layout("longformer", 40, 40, kernel_size=5, num_global_tokens=1)
    plan = build_tile_plan(layout)
    degrees = layout.degrees()
    assert plan.long_rows.size == 1 and degrees[plan.long_rows[0]] == layout.num_tokens
    for one in plan:
        assert plan.long_rows[0] not in one.queries
    # every other token's pairs are in the plan
    queries, keys = zip(*(one.pairs() for one in plan))
    assert np.concatenate(queries).size == layout.nnz - layout.num_tokens


def test_packed_plan_holds_every_array_at_its_offset():
    layout = build_layout("axial", 20, 70)
    plan = build_tile_plan(layout)
    buffer, fields = plan.packed()
    assert buffer.dtype == np.int32 and len(fields) == 6 * len(plan)
    for i, one in enumerate(plan):
        tiles, chunks, q_at, ptr_at, keys_at, masks_at = fields[6 * i:6 * i + 6]
        assert (tiles, chunks) == (one.queries.shape[0], one.num_chunks)
        np.testing.assert_array_equal(buffer[q_at:q_at + tiles * TILE], one.queries.ravel())
        np.testing.assert_array_equal(buffer[ptr_at:ptr_at + tiles + 1], one.chunk_ptr)
        np.testing.assert_array_equal(buffer[keys_at:keys_at + chunks * TILE], one.keys.ravel())
        assert masks_at % 2 == 0
        np.testing.assert_array_equal(buffer[masks_at:masks_at + 2 * chunks * TILE].view(np.int64),
                                      one.masks.ravel())


def _call(layout, q, **kwargs):
    return C.attention_forward(q, q, q, torch.empty_like(q), torch.empty(q.shape[:3]),
                               torch.from_numpy(layout.indptr.copy()),
                               torch.from_numpy(layout.indices.copy()),
                               height=layout.height, width=layout.width, scale=0.3, **kwargs)


def test_tile_plan_arguments_come_in_pairs():
    layout = build_layout("block", 4, 4, block_size=2)
    buffer, fields = build_tile_plan(layout).packed()
    q = torch.randn(1, 1, 16, 8)
    with pytest.raises(ValueError, match="both or neither"):
        _call(layout, q, tile_passes=fields)
    with pytest.raises(ValueError, match="both or neither"):
        _call(layout, q, tile_plan=torch.from_numpy(buffer))


def test_segments_for_grid():
    """Long rows are cut shorter (up to twice the segments) only while their
    blocks are fewer than LONG_ROW_MIN_BLOCKS."""
    assert _torch_ops.LONG_ROW_MIN_BLOCKS == 256
    assert _torch_ops.segments_for_grid(32, 8) == 32    # LONGFORMER 128x128, 8 heads: 256 blocks
    assert _torch_ops.segments_for_grid(8, 8) == 16     # 64x64: 64 blocks become 128
    assert _torch_ops.segments_for_grid(3, 64) == 4     # only as many as reach 256 blocks
    assert _torch_ops.segments_for_grid(1, 1) == 2
    assert _torch_ops.segments_for_grid(200, 1) == 256
    assert _torch_ops.segments_for_grid(40000, 1) == 40000  # already enough blocks
    assert _torch_ops.segments_for_grid(5, 0) == 5          # an empty batch launches nothing
