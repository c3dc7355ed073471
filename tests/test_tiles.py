"""Tile plans of the tensor-core CUDA forward, checked on the host: every pair
of the layout is in exactly one chunk of one pass, and nothing else is."""

import numpy as np
import pytest
import torch

from sparse_attention import _stencil, _tiles, _torch_ops, build_layout, get_num_threads, set_num_threads
from sparse_attention._native import C
from sparse_attention.custom_layouts import layout_from_csr
from sparse_attention._tiles import TILE, build_tile_plan, choose_passes

from reference import reference_tile_pass

PATTERNS = ["dense", "axial", "block", "longformer", "strided", "random"]
SIZES = [(1, 1), (1, 17), (9, 1), (7, 13), (33, 35), (20, 70), (64, 64)]


@pytest.mark.parametrize("for_cpu", [False, True])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_plan_covers_every_pair_once(pattern, size, for_cpu):
    layout = build_layout(pattern, *size, kernel_size=5, block_size=4, num_global_tokens=2,
                          attention_ratio=0.3)
    plan = build_tile_plan(layout, passes=choose_passes(layout, for_cpu=for_cpu))
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


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_cpu_fill_counts_the_slots_the_cpu_kernels_compute(pattern, size):
    """The CPU kernels stop at a tile's last query and a chunk's last key
    (rounded up to 8 columns); cpu_fill is the planned pairs' share of that."""
    layout = build_layout(pattern, *size, kernel_size=5, block_size=4, num_global_tokens=2,
                          attention_ratio=0.3)
    plan = build_tile_plan(layout)
    computed = planned = 0
    for one in plan:
        for tile in range(one.queries.shape[0]):
            present = np.flatnonzero(one.queries[tile] >= 0)
            rows = int(present[-1]) + 1 if present.size else 0
            for chunk in range(one.chunk_ptr[tile], one.chunk_ptr[tile + 1]):
                keys = np.flatnonzero(one.keys[chunk] >= 0)
                computed += rows * (-(-(int(keys[-1]) + 1) // 8) * 8 if keys.size else 0)
        planned += one.pairs()[0].size
    assert plan.cpu_fill == pytest.approx(planned / computed)
    assert plan.fill <= plan.cpu_fill <= 1.0


def test_the_cpu_plan_picks_tiles_by_the_slots_the_cpu_computes():
    """On a grid 14 wide AXIAL's GPU plan tiles four image rows at a time (4
    chunks a pass); the CPU computes only the used slots, so its plan takes
    one row (column) a tile, a quarter of the slots. The GPU plan stays as it
    was; where both choose alike they are one object."""
    layout = build_layout("axial", 14, 14)
    shared, cpu = layout.tile_plan(), layout.cpu_tile_plan()
    assert [one.shape for one in shared] == [(4, 14), (14, 4)]
    assert [one.shape for one in cpu] == [(1, 14), (14, 1)]
    assert cpu.cpu_fill > 3 * shared.cpu_fill
    for other in (build_layout("axial", 64, 64), build_layout("block", 16, 16), build_layout("random", 14, 14)):
        assert other.cpu_tile_plan() is other.tile_plan()
    buffer, passes, _ = layout.packed_tile_plan(cpu=True)
    np.testing.assert_array_equal(buffer, cpu.packed()[0])
    assert layout.tile_plan_tensors("cpu")["num_passes"] == len(cpu)


def test_the_cpu_takes_the_tiles_by_the_slots_it_computes():

    small = build_layout("axial", 4, 4)  # a 64 x 64 chunk of 16 x 16 tokens
    assert small.cpu_tile_plan().fill < _tiles.CPU_MIN_FILL <= small.cpu_tile_plan().cpu_fill
    assert _stencil.cpu_kernel_choice(small) == "tiles"
    scattered = build_layout("random", 64, 64, attention_ratio=0.02)
    assert scattered.cpu_tile_plan().cpu_fill < _tiles.CPU_MIN_FILL
    assert _stencil.cpu_kernel_choice(scattered) is None


def fresh(layout):
    """The layout's pairs as a new custom layout: build_layout's are cached, plans and all."""
    return layout_from_csr(layout.height, layout.width, layout.indptr, layout.indices)


@pytest.mark.parametrize("size", [(7, 13), (33, 35), (64, 64)])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_the_counted_fill_is_the_built_plans(pattern, size):
    """Counting every tile's keys and last query slot (no plan built) gives
    the built CPU plan's cpu_fill, long rows (LONGFORMER's global tokens) and
    cut-short edge tiles included."""
    built = build_layout(pattern, *size, kernel_size=5, block_size=4, num_global_tokens=2, attention_ratio=0.1)
    layout = fresh(built)
    counted = layout.counted_cpu_fill()
    assert not layout._is_built("cpu_plan")
    assert counted == pytest.approx(layout.cpu_tile_plan().cpu_fill, rel=1e-12)


def test_a_sparse_plan_is_counted_and_left_unbuilt():
    """RANDOM at 2% on 64 x 64 fills about 0.02 of the slots: the count says
    so and the plan is never built; a layout the tiles take is built once,
    and the CPU's choice never works out the GPU's."""
    scattered = fresh(build_layout("random", 64, 64, attention_ratio=0.02))
    assert _stencil.cpu_kernel_choice(scattered) is None
    assert scattered.counted_cpu_fill() < _tiles.CPU_MIN_FILL
    assert not scattered._is_built("cpu_plan") and not scattered._is_built("gpu_passes")
    dense = fresh(build_layout("block", 32, 32, block_size=8))
    assert _stencil.cpu_kernel_choice(dense) == "tiles"
    assert dense._is_built("cpu_plan") and not dense._is_built("gpu_passes")
    # the GPU's plan, built later, is the CPU's where the passes agree, and the other way round
    assert dense.tile_plan() is dense.cpu_tile_plan()
    other = fresh(dense)
    assert other.tile_plan() is other.cpu_tile_plan()


def test_a_count_near_the_limit_leaves_the_choice_to_the_built_plan(monkeypatch):
    """Counts within the margin below CPU_MIN_FILL do not decide: the plan is
    built and its own cpu_fill does; further below, nothing is built."""
    layout = fresh(build_layout("random", 32, 32, attention_ratio=0.3))
    monkeypatch.setattr(_tiles, "CPU_MIN_FILL", layout.counted_cpu_fill() * 1.02)
    assert not _tiles.cpu_plan_pays(layout) and not layout._is_built("cpu_plan")
    monkeypatch.setattr(_tiles, "CPU_MIN_FILL", layout.counted_cpu_fill() * 1.005)
    assert not _tiles.cpu_plan_pays(layout) and layout._is_built("cpu_plan")


_SELECTIONS = {
    _tiles.PAIRS_ALL: lambda i, j, w: True,
    _tiles.PAIRS_SAME_ROW: lambda i, j, w: i // w == j // w,
    _tiles.PAIRS_OTHER_ROWS: lambda i, j, w: i // w != j // w,
    _tiles.PAIRS_SAME_COLUMN: lambda i, j, w: i % w == j % w,
    _tiles.PAIRS_OTHER_COLUMNS: lambda i, j, w: i % w != j % w,
}


@pytest.mark.parametrize("pairs", sorted(_SELECTIONS))
@pytest.mark.parametrize("shape", [(8, 8), (1, 64), (64, 1), (4, 16), (3, 5)])
@pytest.mark.parametrize("pattern, size", [("axial", (11, 13)), ("random", (9, 20)), ("longformer", (13, 11)),
                                           ("strided", (12, 12)), ("block", (1, 23)), ("dense", (7, 1))])
def test_c_planner_builds_the_reference_pass(pattern, size, shape, pairs):
    layout = build_layout(pattern, *size, kernel_size=5, block_size=3, num_global_tokens=2,
                          attention_ratio=0.3)
    shape = (min(shape[0], size[0]), min(shape[1], size[1]))
    left_out = np.zeros(layout.num_tokens, dtype=bool)
    left_out[::7] = True  # rows kept out, as the long rows are
    one = _tiles._build_pass(layout, shape, pairs, left_out)
    select = _SELECTIONS[pairs]
    expected = reference_tile_pass(layout, shape, lambda i, j: select(i, j, size[1]),
                                   set(np.flatnonzero(left_out).tolist()))
    for field, want in zip(("queries", "chunk_ptr", "keys", "masks"), expected):
        got = getattr(one, field)
        assert got.dtype == want.dtype, field
        np.testing.assert_array_equal(got, want, err_msg=field)
    counts = C.plan_pair_counts(layout.indptr, layout.indices, *size, left_out=left_out)
    kept = ~left_out[layout.row_ids()]
    rows, cols = layout.row_ids()[kept], layout.indices[kept]
    assert counts[pairs] == sum(select(int(i), int(j), size[1]) for i, j in zip(rows, cols))


def test_c_planner_refuses_bad_arguments():
    layout = build_layout("block", 4, 4, block_size=2)
    rp, ci = layout.indptr, layout.indices
    with pytest.raises(ValueError, match="tile_shape"):
        C.plan_union_sizes(rp, ci, 4, 4, 8, 9, 0)  # 72 slots
    with pytest.raises(ValueError, match="tile_shape"):
        C.plan_union_sizes(rp, ci, 4, 4, 5, 1, 0)  # taller than the grid
    with pytest.raises(ValueError, match="pairs"):
        C.plan_union_sizes(rp, ci, 4, 4, 2, 2, 7)
    with pytest.raises(ValueError, match="row_ptr"):
        C.plan_union_sizes(rp[:-1], ci, 4, 4, 2, 2, 0)
    with pytest.raises(TypeError, match="row_ptr"):
        C.plan_union_sizes(rp.astype(np.int32), ci, 4, 4, 2, 2, 0)
    bad_keys = ci.copy()
    bad_keys[3] = 16
    with pytest.raises(ValueError, match="col_idx: entry 3 is 16"):
        C.plan_union_sizes(rp, bad_keys, 4, 4, 2, 2, 0)
    falling = rp.copy()
    falling[2] = falling[3] + 1
    with pytest.raises(ValueError, match="row_ptr: offsets decrease"):
        C.plan_union_sizes(falling, ci, 4, 4, 2, 2, 0)
    with pytest.raises(ValueError, match="tiles: entry 0 is 4"):
        C.plan_union_sizes(rp, ci, 4, 4, 2, 2, 0, tiles=np.array([4]))
    with pytest.raises(ValueError, match="left_out"):
        C.plan_union_sizes(rp, ci, 4, 4, 2, 2, 0, left_out=np.zeros(15, dtype=bool))
    with pytest.raises(ValueError, match="height, width"):
        C.plan_union_sizes(rp, ci, 0, 4, 1, 1, 0)
    good = np.array([0, 1, 2, 3, 4], dtype=np.int32)  # one chunk per 2 x 2 tile
    with pytest.raises(ValueError, match="chunk_ptr: tile 0 has 4 keys, 1 chunks, but chunk_ptr gives it 2"):
        C.plan_fill(rp, ci, 4, 4, 2, 2, 0, chunk_ptr=np.array([0, 2, 3, 4, 5], dtype=np.int32))
    with pytest.raises(ValueError, match="chunk_ptr: offsets decrease"):
        C.plan_fill(rp, ci, 4, 4, 2, 2, 0, chunk_ptr=np.array([0, 2, 1, 3, 4], dtype=np.int32))
    with pytest.raises(ValueError, match="chunk_ptr"):
        C.plan_fill(rp, ci, 4, 4, 2, 2, 0, chunk_ptr=good[:-1])
    queries, keys, masks = C.plan_fill(rp, ci, 4, 4, 2, 2, 0, chunk_ptr=good)
    assert queries.shape == (4, 64) and keys.shape == (4, 64) and np.all(masks[:, :4] == 15)


@pytest.mark.parametrize("pattern, size, shape, pairs", [("random", (33, 35), (8, 8), _tiles.PAIRS_ALL),
                                                        ("axial", (40, 24), (1, 24), _tiles.PAIRS_SAME_ROW),
                                                        ("strided", (29, 31), (4, 16), _tiles.PAIRS_OTHER_COLUMNS)])
def test_the_c_planner_gives_the_same_plan_on_any_number_of_threads(pattern, size, shape, pairs):
    """Threads take runs of tiles, each with scratch of its own; the plan,
    the union sizes of sampled tiles and the pair counts do not depend on
    how many there are."""
    layout = build_layout(pattern, *size, attention_ratio=0.3)
    left_out = np.zeros(layout.num_tokens, dtype=bool)
    left_out[::5] = True
    args = (layout.indptr, layout.indices, *size, *shape, pairs)
    picked = np.array([0, 3, 4, 9, 2], dtype=np.int64)
    results = []
    before = get_num_threads()
    try:
        for threads in (1, 2, 3, 7):
            set_num_threads(threads)
            sizes = C.plan_union_sizes(*args, left_out=left_out)
            chunk_ptr = np.zeros(sizes.size + 1, dtype=np.int32)
            np.cumsum(-(-sizes // TILE), out=chunk_ptr[1:])
            results.append((sizes, C.plan_union_sizes(*args, left_out=left_out, tiles=picked),
                            *C.plan_fill(*args, left_out=left_out, chunk_ptr=chunk_ptr),
                            C.plan_pair_counts(layout.indptr, layout.indices, *size, left_out=left_out)))
        bad_keys = layout.indices.copy()
        bad_keys[layout.nnz // 2] = layout.num_tokens
        with pytest.raises(ValueError, match=f"col_idx: entry {layout.nnz // 2} is {layout.num_tokens}"):
            C.plan_union_sizes(layout.indptr, bad_keys, *size, *shape, pairs)
    finally:
        set_num_threads(before)
    for other in results[1:]:
        for mine, theirs in zip(results[0], other):
            np.testing.assert_array_equal(mine, theirs)


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


def test_no_plan_for_layouts_past_the_limits(monkeypatch):
    layout = build_layout("random", 16, 16, attention_ratio=0.5)
    assert build_tile_plan(layout) is not None
    monkeypatch.setattr(_tiles, "MAX_PAIRS", layout.nnz - 1)
    assert build_tile_plan(layout) is None


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


def _tiled_backward_by_plan(plan, q, k, v, grad_out, lse, delta, scale, usable):
    """The CUDA tensor-core backward's arithmetic, chunk by chunk in float64
    (one batch-head): dQ with tiles as queries, and dK / dV with the same tiles
    taken as keys and the chunks' tokens as the queries that attend them, which
    holds for a symmetric layout. Every pass adds to the gradients."""
    grads = [np.zeros_like(q) for _ in range(3)]
    for one in plan:
        chunk_tile = np.repeat(np.arange(one.queries.shape[0]), np.diff(one.chunk_ptr))
        words = one.masks.view(np.uint64)
        for chunk, tile in enumerate(chunk_tile):
            rows, cols = one.queries[tile], one.keys[chunk]
            bits = ((words[chunk][:, None] >> np.arange(TILE, dtype=np.uint64)) & np.uint64(1)).astype(bool)
            r, c = rows >= 0, cols >= 0
            bits, rows, cols = bits[r][:, c], rows[r], cols[c]
            # dQ: the tile's tokens as queries, the chunk's as keys
            allowed = bits & usable[cols][None, :]
            s = q[rows] @ k[cols].T * scale
            p = np.where(allowed, np.exp(np.where(allowed, s - lse[rows, None], 0.0)), 0.0)
            ds = p * (grad_out[rows] @ v[cols].T - delta[rows, None])
            grads[0][rows] += ds @ k[cols] * scale
            # dK and dV: the tile's tokens as keys, the chunk's as their queries
            allowed = bits & usable[rows][:, None]
            s = k[rows] @ q[cols].T * scale
            p = np.where(allowed, np.exp(np.where(allowed, s - lse[None, cols], 0.0)), 0.0)
            grads[2][rows] += p @ grad_out[cols]
            ds = p * (v[rows] @ grad_out[cols].T - delta[None, cols])
            grads[1][rows] += ds @ q[cols] * scale
    return grads


@pytest.mark.parametrize("pattern, size", [("axial", (20, 70)), ("axial", (7, 13)), ("block", (33, 35)),
                                           ("strided", (33, 35)), ("dense", (9, 11)),
                                           ("longformer", (33, 35)), ("longformer", (7, 13))])
def test_a_symmetric_layouts_plan_serves_its_backward(pattern, size):
    """What the CUDA tensor-core backward relies on: a symmetric layout's plan,
    read with tiles as keys, is its transpose's, and the passes' contributions
    sum to the gradients (against autograd on the dense float64 reference).
    The backward takes the full plan: LONGFORMER's global row, left out of the
    forward's plan at 33 x 35, is kept in it."""
    from reference import reference_attention

    layout = build_layout(pattern, *size, kernel_size=5, block_size=4)
    assert layout.is_symmetric()
    plan = layout.full_tile_plan()
    assert plan.long_rows.size == 0
    assert (plan is layout.tile_plan()) == (layout.tile_plan().long_rows.size == 0)
    if pattern == "longformer" and size == (33, 35):
        assert layout.tile_plan().long_rows.size == 1
    n, dim = layout.num_tokens, 16
    gen = torch.Generator().manual_seed(5)
    q, k, v, grad_out = (torch.randn(1, 1, n, dim, generator=gen, dtype=torch.float64) for _ in range(4))
    usable = torch.rand(1, n, generator=gen) > 0.2
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out, lse, _ = reference_attention(*leaves, layout, key_mask=usable)
    out.backward(grad_out)
    delta = (grad_out * out.detach()).sum(-1)
    flat = [t[0, 0].numpy() for t in (q, k, v, grad_out)]
    got = _tiled_backward_by_plan(plan, *flat, lse.detach()[0, 0].numpy(), delta[0, 0].numpy(),
                                  dim ** -0.5, usable[0].numpy())
    for name, mine, leaf in zip("qkv", got, leaves):
        np.testing.assert_allclose(mine, leaf.grad[0, 0].numpy(), atol=1e-10, err_msg=f"grad {name}")


def test_symmetric_layouts_share_their_transpose_tensors():
    for pattern, symmetric in (("axial", True), ("block", True), ("strided", True), ("random", False)):
        layout = build_layout(pattern, 12, 10, attention_ratio=0.3)
        assert layout.is_symmetric() == symmetric
        tensors = layout.torch_tensors("cpu")
        assert (tensors["col_ptr"] is tensors["row_ptr"]) == symmetric
        assert (tensors["row_idx"] is tensors["col_idx"]) == symmetric
        np.testing.assert_array_equal(tensors["col_ptr"].numpy(), layout.col_ptr)
        np.testing.assert_array_equal(tensors["row_idx"].numpy(), layout.row_indices)


def _bias_sums(scores, perm, ptr, heads=1):
    """C.bias_grad of one (batch, head)'s scores over the given buckets."""
    table = torch.empty(heads, ptr.shape[0] - 1, dtype=torch.float64)
    C.bias_grad(torch.from_numpy(np.array(scores)).view(1, heads, -1), torch.from_numpy(np.array(perm)),
                torch.from_numpy(np.array(ptr)), table)
    return table[0].numpy()


@pytest.mark.parametrize("max_relative", [0, 2, 9])
@pytest.mark.parametrize("size", [(1, 17), (9, 1), (7, 13), (33, 35)])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_plan_score_buckets_sum_what_the_csr_buckets_sum(pattern, size, max_relative):
    """The CUDA tensor-core backward writes each pair's score gradient at its
    plan slot; TilePlan.score_buckets must group those slots as
    Layout.bias_buckets groups the CSR entries. One value per pair, placed in
    both orders (slots without a pair hold NaN, so reading one shows), summed
    per bucket by C.bias_grad both ways."""
    layout = build_layout(pattern, *size, kernel_size=5, block_size=4, num_global_tokens=1,
                          attention_ratio=0.3)
    plan = layout.full_tile_plan()  # the backward's plan: long rows kept in
    n, width = layout.num_tokens, layout.width
    perm, ptr = plan.score_buckets(width, max_relative)
    assert perm.dtype == np.int64 and ptr.dtype == np.int64
    assert perm.shape == (layout.nnz,) and ptr[-1] == layout.nnz
    assert np.unique(perm).size == perm.size and perm.max() < plan.num_slots
    values = np.random.default_rng(5).standard_normal(layout.nnz)
    csr_keys = layout.row_ids() * n + layout.indices
    slots = np.full(plan.num_slots, np.nan)
    offset = 0
    for one in plan:
        queries, keys = one.pairs()
        chunk_tile = np.repeat(np.arange(one.queries.shape[0]), np.diff(one.chunk_ptr))
        bits = (one.masks.view(np.uint64)[:, :, None] >> np.arange(TILE, dtype=np.uint64)) & np.uint64(1)
        chunk, row, col = np.nonzero(bits)
        assert np.array_equal(one.queries[chunk_tile[chunk], row], queries)
        at = np.searchsorted(csr_keys, queries.astype(np.int64) * n + keys)
        slots[offset + (chunk * TILE + row) * TILE + col] = values[at]
        offset += one.num_chunks * TILE * TILE
    _, csr_perm, csr_ptr = layout.bias_buckets(max_relative)
    np.testing.assert_array_equal(ptr, csr_ptr)  # the same pairs in every bucket
    expected = _bias_sums(values, csr_perm, csr_ptr)
    got = _bias_sums(slots, perm, ptr)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_bias_grad_takes_fewer_buckets_entries_than_scores_and_checks_them():
    scores = torch.arange(10, dtype=torch.float64).view(1, 1, 10)
    table = torch.empty(1, 2, dtype=torch.float64)
    C.bias_grad(scores, torch.tensor([9, 1, 4]), torch.tensor([0, 2, 3]), table)
    assert table.tolist() == [[10.0, 4.0]]
    with pytest.raises(ValueError, match="bucket_perm: expected at most 10 entries"):
        C.bias_grad(scores, torch.arange(11), torch.tensor([0, 11]), table[:, :1])
    with pytest.raises(ValueError, match="bucket_perm: entry outside"):
        C.bias_grad(scores, torch.tensor([10]), torch.tensor([0, 1]), table[:, :1])
    with pytest.raises(ValueError, match="bucket_ptr: expected offsets from 0 to the length of bucket_perm"):
        C.bias_grad(scores, torch.tensor([1, 2]), torch.tensor([0, 3]), table[:, :1])


def test_plan_scores_take_a_cuda_call_with_a_plan():
    """plan_scores (score gradients in plan order) is for the CUDA tensor-core
    backward; a CPU call asking for it is refused, naming it."""
    layout = build_layout("block", 8, 8, block_size=4)
    t = layout.torch_tensors("cpu")
    q = torch.randn(1, 1, 64, 8)
    grads = [torch.empty_like(q) for _ in range(3)]
    plan = layout.tile_plan_tensors("cpu")
    with pytest.raises(ValueError, match="plan_scores"):
        C.attention_backward(q, q, q, q, q, torch.zeros(1, 1, 64), torch.empty(1, 1, 64), *grads,
                             t["row_ptr"], t["col_idx"], t["col_ptr"], t["row_idx"],
                             height=8, width=8, scale=1.0, rel_pos_bias=torch.zeros(1, 1, 1),
                             grad_scores=torch.empty(1, 1, layout.nnz), tile_plan=plan["buffer"],
                             tile_passes=plan["passes"], tiled_backward_extras=True, plan_scores=True)


def test_cuda_backward_plan_choices(monkeypatch):
    """Which plan the CUDA backward gets (host logic, no GPU needed): a bias
    needs the extras and the plan's score buckets; a call whose forward took
    no plan (statistics over several passes) hands its backward the plan as
    backward_plan; long rows need tiled_backward_long_rows."""
    cuda = torch.device("cuda")
    buffer, perm = torch.zeros(4, dtype=torch.int32), torch.zeros(2, dtype=torch.int64)
    bias = torch.zeros(1, 3, 3)
    passes = [1, 1, 0, 0, 0, 0]
    choose = _torch_ops._backward_plan
    monkeypatch.setattr(_torch_ops, "use_tiled_cuda_backward", True)
    monkeypatch.setattr(_torch_ops, "tiled_backward_long_rows", True)
    monkeypatch.setattr(_torch_ops, "use_tiled_cuda_backward_extras", False)
    assert choose(cuda, None, buffer, passes, None, None)["tile_passes"] == passes
    assert "tiled_backward_extras" not in choose(cuda, None, buffer, passes, None, None)
    assert choose(cuda, bias, buffer, passes, None, None, score_perm=perm) == {}
    monkeypatch.setattr(_torch_ops, "use_tiled_cuda_backward_extras", True)
    assert choose(cuda, bias, buffer, passes, None, None) == {}  # no score buckets
    chosen = choose(cuda, bias, buffer, passes, None, None, score_perm=perm)
    assert chosen["tiled_backward_extras"] is True and chosen["tile_passes"] == passes
    chosen = choose(cuda, bias, None, [], None, None, buffer, passes, score_perm=perm)
    assert chosen["tile_passes"] == passes
    long_rows = torch.zeros(1, dtype=torch.int32)
    assert choose(cuda, None, buffer, [9] * 6, long_rows, None, buffer, passes)["tile_passes"] == passes
    monkeypatch.setattr(_torch_ops, "tiled_backward_long_rows", False)
    assert choose(cuda, None, buffer, [9] * 6, long_rows, None, buffer, passes) == {}
    monkeypatch.setattr(_torch_ops, "use_tiled_cuda_backward", False)
    assert choose(cuda, None, buffer, passes, None, None) == {}


def test_plan_score_buckets_only_for_plans_that_stay_near_one_slot_a_pair():
    """The plan-order score gradients take a float per slot: RANDOM at 10%
    (about 10 slots a pair) keeps the row kernels' CSR order instead."""
    sparse = build_layout("random", 32, 32, attention_ratio=0.1)
    assert sparse.full_tile_plan().num_slots > _torch_ops.PLAN_SCORES_MAX_SLOTS_PER_PAIR * sparse.nnz
    assert _torch_ops._score_buckets(sparse, "cpu", 4, full=True) == (None, None)
    for pattern in ("axial", "longformer", "strided"):
        layout = build_layout(pattern, 32, 32)
        perm, ptr = _torch_ops._score_buckets(layout, "cpu", 4, full=True)
        assert perm.shape == (layout.nnz,) and ptr.shape == (82,)


def test_the_gather_kernels_move_the_line_between_rows_and_tiles():
    """Where the rows run on the gather kernels (float32, head dims up to 128;
    those that are not multiples of 8 on padded copies) the tiles need GATHER_FILL_FACTOR times the fill; RANDOM at
    30% (cpu_fill 0.3) stays on the rows there and takes the tiles otherwise."""
    layout = build_layout("random", 32, 32, attention_ratio=0.3)
    fill = layout.counted_cpu_fill()
    assert _tiles.CPU_MIN_FILL < fill < _tiles.CPU_MIN_FILL * _tiles.GATHER_FILL_FACTOR
    # other head dims up to 128 run on copies padded to a multiple of 8
    assert [C.gather_takes(d, 1024) for d in (8, 16, 24, 64, 72, 128, 12, 1, 127, 136, 129, 0)] == \
        [True] * 9 + [False] * 3
    assert not C.gather_takes(16, 1 << 22)  # bias coordinates in float lanes: fewer tokens only
    assert _stencil.cpu_kernel_choice(layout, 64) is None and _stencil.cpu_kernel_choice(layout, 20) is None
    assert _stencil.cpu_kernel_choice(layout, 136) == "tiles"
    assert _stencil.cpu_kernel_choice(layout) == "tiles"  # head dim unknown: the generic rows' line
    try:
        C.set_gather_kernels(False)
        assert _stencil.cpu_kernel_choice(layout, 64) == "tiles"
    finally:
        C.set_gather_kernels(True)
