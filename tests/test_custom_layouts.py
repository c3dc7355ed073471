"""Custom layouts: built from rules, masks and CSR arrays, checked in C, and run
by every kernel family, the PyTorch path, NumPy and the module."""

import copy
import pickle

import numpy as np
import pytest
import torch

from reference import reference_attention
from sparse_attention import (CustomPattern, EnhancedSparseAttention, Layout, _stencil, _tiles, build_layout,
                              layout_from_csr, layout_from_mask, layout_from_mask_mod, layout_from_rule)
from sparse_attention.custom_layouts import combine_layouts
from sparse_attention import sparse_scaled_dot_product_attention as attention

TOL = {torch.float64: dict(atol=1e-10, rtol=1e-9), torch.float32: dict(atol=3e-5, rtol=3e-4)}


# rules at the top level of the module, so that modules holding them pickle
def dilated(yi, xi, yj, xj):
    dy, dx = yi - yj, xi - xj
    return (abs(dy) <= 4) & (abs(dx) <= 4) & (dy % 2 == 0) & (dx % 2 == 0)


def causal_window(yi, xi, yj, xj):
    return (yj <= yi) & (abs(yi - yj) <= 2) & (abs(xi - xj) <= 2)


def earlier_neighbours(yi, xi, yj, xj):
    """Strictly earlier tokens of a 5 x 5 window: token 0 has no key at all."""
    return (yj * 100000 + xj < yi * 100000 + xi) & (abs(yi - yj) <= 2) & (abs(xi - xj) <= 2)


def top_rows_only(yi, xi, yj, xj):
    """Only the queries of the first image row attend (the rest are empty rows),
    and only keys of even columns are ever attended (empty columns)."""
    return (yi == 0) & (xj % 2 == 0) & (yj == 0) | ((yi == 0) & (yj == 1) & (xj == xi))


def cross(yi, xi, yj, xj):
    return ((yi == yj) & (abs(xi - xj) <= 3)) | ((xi == xj) & (abs(yi - yj) <= 3))


def checkerboard(yi, xi, yj, xj):
    return (yi // 4 == yj // 4) & (xi // 4 == xj // 4) & ((yi + xi) % 2 == (yj + xj) % 2)


RULES = [dilated, causal_window, earlier_neighbours, top_rows_only, cross, checkerboard]
SIZES = [(1, 9), (8, 1), (7, 13), (16, 16)]


def dense_mask(rule, height, width):
    """The rule's N x N mask by brute force, pair by pair."""
    n = height * width
    mask = np.zeros((n, n), dtype=bool)
    for i in range(n):
        for j in range(n):
            mask[i, j] = bool(rule(i // width, i % width, j // width, j % width))
    return mask


def transpose_by_numpy(layout):
    rows = np.repeat(np.arange(layout.num_tokens), layout.degrees())
    order = np.lexsort((rows, layout.indices))
    col_ptr = np.zeros(layout.num_tokens + 1, dtype=np.int64)
    np.cumsum(np.bincount(layout.indices, minlength=layout.num_tokens), out=col_ptr[1:])
    return col_ptr, rows[order]


# -- building ------------------------------------------------------------------

@pytest.mark.parametrize("size", [(1, 1), (1, 9), (8, 1), (7, 13)])
@pytest.mark.parametrize("rule", RULES)
def test_rule_mask_and_csr_give_the_same_layout(rule, size):
    layout = layout_from_rule(rule, *size)
    mask = dense_mask(rule, *size)
    np.testing.assert_array_equal(layout.to_dense(), mask)
    from_mask = layout_from_mask(mask, *size)
    from_csr = layout_from_csr(*size, layout.indptr, layout.indices)
    for other in (from_mask, from_csr):
        for name in ("indptr", "indices", "col_ptr", "row_indices"):
            np.testing.assert_array_equal(getattr(other, name), getattr(layout, name))
    col_ptr, row_indices = transpose_by_numpy(layout)
    np.testing.assert_array_equal(layout.col_ptr, col_ptr)
    np.testing.assert_array_equal(layout.row_indices, row_indices)
    assert layout.pattern is None and layout.name == rule.__name__
    assert from_mask.name == "custom"


def test_rules_for_built_in_patterns_give_their_layouts():
    rules = {
        "axial": lambda yi, xi, yj, xj: (yi == yj) | (xi == xj),
        "block": lambda yi, xi, yj, xj: (yi // 4 == yj // 4) & (xi // 4 == xj // 4),
        "dense": lambda yi, xi, yj, xj: np.ones(np.broadcast(yi, yj).shape, dtype=bool),
    }
    for pattern, rule in rules.items():
        for size in [(1, 1), (5, 9), (13, 7), (24, 20)]:
            built = build_layout(pattern, *size, block_size=4)
            custom = layout_from_rule(rule, *size)
            for name in ("indptr", "indices", "col_ptr", "row_indices"):
                np.testing.assert_array_equal(getattr(custom, name), getattr(built, name))


def test_rule_is_evaluated_in_blocks_of_rows(monkeypatch):
    from sparse_attention import custom_layouts

    monkeypatch.setattr(custom_layouts, "_RULE_BLOCK_PAIRS", 3 * 91)
    calls = []

    def counting(yi, xi, yj, xj):
        calls.append(yi.shape[0])
        return dilated(yi, xi, yj, xj)

    layout = layout_from_rule(counting, 7, 13)
    assert calls == [3] * 30 + [1]
    np.testing.assert_array_equal(layout.to_dense(), dense_mask(dilated, 7, 13))


REACH = {dilated: 4, causal_window: 2, earlier_neighbours: 2, cross: 3, checkerboard: (3, 3)}


@pytest.mark.parametrize("size", [(1, 1), (1, 9), (8, 1), (7, 13), (16, 16)])
@pytest.mark.parametrize("rule", list(REACH))
def test_max_offset_asks_only_the_box_and_builds_the_same_layout(rule, size):
    shapes = []

    def watched(yi, xi, yj, xj):
        shapes.append(np.broadcast(yi, xi, yj, xj).shape)
        return rule(yi, xi, yj, xj)

    everything = layout_from_rule(rule, *size)
    boxed = layout_from_rule(watched, *size, max_offset=REACH[rule], name=rule.__name__)
    for name in ("indptr", "indices", "col_ptr", "row_indices"):
        np.testing.assert_array_equal(getattr(boxed, name), getattr(everything, name))
    reach = REACH[rule] if isinstance(REACH[rule], tuple) else (REACH[rule],) * 2
    box = (2 * min(reach[0], size[0] - 1) + 1) * (2 * min(reach[1], size[1] - 1) + 1)
    assert all(shape[1] == box for shape in shapes) and sum(s[0] for s in shapes) == size[0] * size[1]


def test_max_offset_leaves_out_what_lies_beyond_it():
    everything = layout_from_rule(cross, 9, 9)
    near = layout_from_rule(cross, 9, 9, max_offset=(1, 2))
    expected = everything.to_dense() & layout_from_rule(
        lambda yi, xi, yj, xj: (abs(yi - yj) <= 1) & (abs(xi - xj) <= 2), 9, 9).to_dense()
    np.testing.assert_array_equal(near.to_dense(), expected)
    pattern = CustomPattern(cross, max_offset=3)
    np.testing.assert_array_equal(pattern(9, 9).indices, everything.indices)
    again = pickle.loads(pickle.dumps(pattern))
    assert again.max_offset == 3 and again(9, 9).nnz == everything.nnz
    for bad, error in ((-1, ValueError), ((1, -2), ValueError), ("3", TypeError), ((1, 2, 3), TypeError),
                       (True, TypeError), (1.5, TypeError)):
        with pytest.raises(error, match="max_offset"):
            layout_from_rule(cross, 9, 9, max_offset=bad)
    with pytest.raises(ValueError, match="max_offset"):
        CustomPattern(cross, max_offset=-1)


@pytest.mark.parametrize("pattern", ["axial", "block", "longformer", "strided", "random"])
def test_flex_attention_mask_mods_give_the_same_layout(pattern):
    """The GPU benchmark's mask_mods (FlexAttention's form, over flat token
    indices) give back the layouts they were written for."""
    import importlib
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    gpu_bench = importlib.import_module("gpu_bench")
    layout = gpu_bench.layout_of(pattern, 11)
    mask_mod = gpu_bench.mask_mod_for(pattern, layout, "cpu")
    got = layout_from_mask_mod(mask_mod, 11, 11, name="flex")
    for name in ("indptr", "indices", "col_ptr", "row_indices"):
        np.testing.assert_array_equal(getattr(got, name), getattr(layout, name))
    assert got.name == "flex"


def test_mask_mod_sees_flat_indices_and_batch_and_head_zero():
    seen = []

    def sliding_window(b, h, q_idx, kv_idx):
        seen.append((int(b), int(h), q_idx.dtype, kv_idx.shape))
        return (q_idx - kv_idx).abs() <= 2

    layout = layout_from_mask_mod(sliding_window, 3, 5, max_offset=(1, 2))
    assert layout.name == "sliding_window" and all(s[:3] == (0, 0, torch.int64) for s in seen)
    expected = np.abs(np.arange(15)[:, None] - np.arange(15)[None, :]) <= 2
    ys, xs = np.divmod(np.arange(15), 5)
    expected &= (np.abs(ys[:, None] - ys[None, :]) <= 1) & (np.abs(xs[:, None] - xs[None, :]) <= 2)  # the box
    np.testing.assert_array_equal(layout.to_dense(), expected)
    with pytest.raises(TypeError, match="mask_mod: expected it to return a bool tensor"):
        layout_from_mask_mod(lambda b, h, q, k: True, 2, 2)
    with pytest.raises(TypeError, match="mask_mod: expected a callable"):
        layout_from_mask_mod(None, 2, 2)


@pytest.mark.parametrize("size", [(1, 1), (1, 9), (8, 1), (7, 13)])
def test_layouts_combine_as_sets_of_pairs(size):
    layouts = [build_layout("longformer", *size, kernel_size=3, num_global_tokens=1),
               build_layout("axial", *size), build_layout("random", *size, attention_ratio=0.3, seed=2),
               layout_from_rule(earlier_neighbours, *size), layout_from_rule(top_rows_only, *size)]
    for first in layouts:
        for second in layouts:
            a, b = first.to_dense(), second.to_dense()
            for combined, expected in ((first | second, a | b), (first & second, a & b), (first - second, a & ~b)):
                np.testing.assert_array_equal(combined.to_dense(), expected)
                assert combined.pattern is None
                col_ptr, row_indices = transpose_by_numpy(combined)
                np.testing.assert_array_equal(combined.col_ptr, col_ptr)
                np.testing.assert_array_equal(combined.row_indices, row_indices)
    assert (layouts[0] | layouts[1]).name == "(LONGFORMER | AXIAL)"
    assert (layouts[3] - layouts[0]).name == "(earlier_neighbours - LONGFORMER)"


def test_combining_layouts_checks_its_arguments():
    from sparse_attention.custom_layouts import combine_layouts

    small, large = build_layout("axial", 3, 4), build_layout("axial", 4, 3)
    with pytest.raises(ValueError, match="different grids, 3 x 4 and 4 x 3"):
        small | large
    with pytest.raises(TypeError):
        small | 3
    with pytest.raises(TypeError, match="expected two Layouts"):
        combine_layouts(small, "axial", "union")
    with pytest.raises(ValueError, match="how: expected one of"):
        combine_layouts(small, small, "xor")


def test_a_union_of_stencils_runs_on_the_stencil_kernels():
    window = layout_from_rule(causal_window, 16, 16)
    cross_ = layout_from_rule(cross, 16, 16)
    both = window | cross_
    assert both.stencil() is not None
    q, k, v = (torch.randn(1, 2, 256, 8, dtype=torch.float64) for _ in range(3))
    expected = reference_attention(q, k, v, both)[0]
    torch.testing.assert_close(attention(q.float(), k.float(), v.float(), both).double(), expected,
                               **TOL[torch.float32])


def test_torch_masks_and_arrays_of_any_integer_dtype():
    mask = dense_mask(cross, 5, 6)
    layout = layout_from_mask(torch.from_numpy(mask), 5, 6)
    again = layout_from_csr(5, 6, torch.from_numpy(layout.indptr.astype(np.int32)),
                            layout.indices.astype(np.uint16))
    np.testing.assert_array_equal(again.indices, layout.indices)
    torch_rule = layout_from_rule(lambda yi, xi, yj, xj: torch.from_numpy(cross(yi, xi, yj, xj)), 5, 6)
    np.testing.assert_array_equal(torch_rule.indices, layout.indices)


@pytest.mark.parametrize("call, error, words", [
    (lambda: layout_from_csr(2, 2, [0, 2, 2, 3, 4], [1, 0, 1, 1]), ValueError, "row 0 must rise strictly"),
    (lambda: layout_from_csr(2, 2, [0, 2, 2, 3, 4], [0, 0, 1, 1]), ValueError, "no repeats"),
    (lambda: layout_from_csr(2, 2, [0, 2, 1, 3, 4], [0, 1, 1, 1]), ValueError, "offsets decrease at row 1"),
    (lambda: layout_from_csr(2, 2, [1, 2, 2, 3, 4], [0, 1, 1, 1]), ValueError, "expected offsets from 0 to 4"),
    (lambda: layout_from_csr(2, 2, [0, 1, 2, 3, 5], [0, 1, 1, 1]), ValueError, "expected offsets from 0 to 4"),
    (lambda: layout_from_csr(2, 2, [0, 1, 2, 3], [0, 0, 1]), ValueError, "indptr: expected shape (5,)"),
    (lambda: layout_from_csr(2, 2, [0, 1, 2, 3, 4], [0, 4, 1, 1]), ValueError, "indices: keys must lie in [0, 4)"),
    (lambda: layout_from_csr(2, 2, [0, 1, 2, 3, 4], [0, -1, 1, 1]), ValueError, "indices: keys must lie"),
    (lambda: layout_from_csr(2, 2, [0, 1, 2, 3, 4], [0.0, 1, 1, 1]), TypeError, "indices: expected integers"),
    (lambda: layout_from_csr(2, 2, [[0, 1, 2, 3, 4]], [0, 1, 1, 1]), ValueError, "indptr: expected a 1-D"),
    (lambda: layout_from_csr(0, 2, [0], []), ValueError, "height: expected >= 1"),
    (lambda: layout_from_csr(2, 2.0, [0], []), TypeError, "width: expected an int"),
    (lambda: layout_from_csr(2, 2, [0, 1, 2, 3, 4], [0, 1, 1, 1], name=""), TypeError, "name"),
    (lambda: layout_from_mask(np.ones((4, 4)), 2, 2), TypeError, "mask: expected a bool array"),
    (lambda: layout_from_mask(np.ones((4, 3), dtype=bool), 2, 2), ValueError, "mask: expected shape (4, 4)"),
    (lambda: layout_from_rule(lambda yi, xi, yj, xj: yi - yj, 3, 3), TypeError, "rule: expected it to return a bool"),
    (lambda: layout_from_rule(lambda yi, xi, yj, xj: np.ones((2, 2), bool), 3, 3), ValueError, "broadcasts to (9, 9)"),
    (lambda: layout_from_rule("axial", 3, 3), TypeError, "rule: expected a callable"),
    (lambda: CustomPattern(3), TypeError, "rule: expected a callable"),
])
def test_bad_input_raises_a_clear_error(call, error, words):
    with pytest.raises(error, match=None) as info:
        call()
    assert words in str(info.value)


def test_the_c_check_sees_what_python_does_not():
    from sparse_attention._native import C

    indptr = np.array([0, 2, 1, 4], dtype=np.int64)
    with pytest.raises(ValueError, match="offsets decrease at row 1"):
        C.layout_transpose(indptr, np.array([0, 1, 2, 2], dtype=np.int32), 3)
    with pytest.raises(ValueError, match="holds key 7, outside"):
        C.layout_transpose(np.array([0, 1, 2, 3]), np.array([0, 7, 1], dtype=np.int32), 3)
    with pytest.raises(ValueError, match="indptr"):
        C.layout_transpose(np.array([0, 1, 2], dtype=np.int64), np.array([0, 1], dtype=np.int32), 3)
    with pytest.raises(ValueError, match="num_tokens"):
        C.layout_transpose(np.array([0], dtype=np.int64), np.array([], dtype=np.int32), 0)
    with pytest.raises(TypeError):
        C.layout_transpose(np.array([0, 1, 2, 3], dtype=np.int32), np.array([0, 1, 2], dtype=np.int32), 3)


def test_custom_layouts_pickle_and_repr():
    layout = layout_from_rule(dilated, 6, 7)
    copy_ = pickle.loads(pickle.dumps(layout))
    assert copy_.pattern is None and copy_.name == "dilated"
    np.testing.assert_array_equal(copy_.indices, layout.indices)
    assert repr(layout).startswith("Layout(dilated, 6x7, nnz=")
    with pytest.raises(ValueError, match="name"):
        Layout("axial", 1, 1, [0, 1], [0], [0, 1], [0], name="mine")


# -- which kernels take them ---------------------------------------------------

def test_stencils_are_found_in_custom_layouts():
    window = build_layout("longformer", 20, 24, kernel_size=5, num_global_tokens=0)
    custom = layout_from_csr(20, 24, window.indptr, window.indices)
    np.testing.assert_array_equal(custom.stencil(), window.stencil())
    assert _stencil.cpu_kernel_choice(custom) == "stencil"
    assert _stencil.cpu_kernel_choice(layout_from_rule(dilated, 20, 24)) == "stencil"
    # AXIAL's rule is a stencil, but its tiles fill well: tiles
    axial = layout_from_rule(lambda yi, xi, yj, xj: (yi == yj) | (xi == xj), 20, 24)
    assert axial.stencil() is not None and axial.cpu_tile_plan().cpu_fill > _stencil.CUSTOM_STENCIL_MAX_FILL
    assert _stencil.cpu_kernel_choice(axial) == "tiles"
    # one row more than the offsets promise: no stencil
    mask = window.to_dense()
    mask[5, 400] = True
    assert layout_from_mask(mask, 20, 24).stencil() is None
    # a built-in pattern's layout is never rediscovered as a stencil
    assert build_layout("axial", 20, 24).stencil() is None


# -- kernels against the reference ---------------------------------------------

FAMILIES = {
    "auto": {},
    "rows": dict(use_stencil_cpu_kernel=False, CPU_MIN_FILL=float("inf")),
    "tiles": dict(use_stencil_cpu_kernel=False, CPU_MIN_FILL=0.0),
    "strip": dict(use_window_kernel=False, CUSTOM_STENCIL_MAX_FILL=2.0),
    "window": dict(CUSTOM_STENCIL_MAX_FILL=2.0),
}


def force(monkeypatch, family):
    for name, value in FAMILIES[family].items():
        monkeypatch.setattr(_tiles if name == "CPU_MIN_FILL" else _stencil, name, value)


def kernels_run(call):
    """call(), and which CPU forward kernels it ran: window, strip, tiles or rows."""
    from sparse_attention import _torch_ops
    from sparse_attention._native import C

    before = _torch_ops.stencil_forwards_run, C.cpu_window_forwards(), _torch_ops.tiled_passes_run
    call()
    after = _torch_ops.stencil_forwards_run, C.cpu_window_forwards(), _torch_ops.tiled_passes_run
    if after[1] > before[1]:
        return "window"
    if after[0] > before[0]:
        return "strip"
    return "tiles" if after[2] > before[2] else "rows"


def expected_kernels(layout):
    """The forward kernels a float32 call on ``layout`` with head dim 12 (this
    file's) should run, by the rules."""
    choice = _stencil.cpu_kernel_choice(layout, 12)
    if choice == "stencil":
        return "window" if _stencil.use_window_kernel and _stencil.window_takes(layout.stencil(), 12) else "strip"
    return "tiles" if choice == "tiles" else "rows"


def gradients(fn, tensors, grad_out):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], grad_out)
    return out.detach(), grads


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("rule", RULES)
def test_every_kernel_family_matches_the_reference(rule, size, family, monkeypatch):
    force(monkeypatch, family)
    layout = layout_from_rule(rule, *size)
    if family in ("strip", "window"):
        # the strips do not run a clamped window (here: the checkerboard on 8 x 1, blocked windows of two)
        stencil = layout.stencil()
        stencil_runs = stencil is not None and not (family == "strip" and _stencil.is_clamped(stencil))
        assert (expected_kernels(layout) in ("strip", "window")) == stencil_runs
    elif family != "auto":
        assert expected_kernels(layout) == family
    n = layout.num_tokens
    gen = torch.Generator().manual_seed(hash((rule.__name__, size)) % 1000)
    key_mask = torch.rand(2, n, generator=gen) > 0.25
    for dtype, with_bias, mask in ((torch.float32, True, key_mask), (torch.float32, False, None),
                                   (torch.float64, True, None)):
        q, k, v = (torch.randn(2, 3, n, 12, generator=gen, dtype=torch.float64) for _ in range(3))
        bias = torch.randn(3, 9, 9, generator=gen, dtype=torch.float64) if with_bias else None
        grad_out = torch.randn(2, 3, n, 12, generator=gen, dtype=torch.float64)

        def ours(q, k, v, bias):
            return attention(q, k, v, layout, rel_pos_bias=bias, key_mask=mask, backend="native")

        def ref(q, k, v, bias):
            return reference_attention(q, k, v, layout, bias=bias, key_mask=mask)[0]

        cast = [None if t is None else t.to(dtype) for t in (q, k, v, bias)]
        ran = kernels_run(lambda: gradients(ours, cast, grad_out.to(dtype)))
        out, grads = gradients(ours, cast, grad_out.to(dtype))
        assert ran == (expected_kernels(layout) if dtype == torch.float32 else "rows")
        ref_out, ref_grads = gradients(ref, (q, k, v, bias), grad_out)
        torch.testing.assert_close(out.double(), ref_out, **TOL[dtype])
        for got, expected in zip(grads, ref_grads):
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got.double(), expected, **TOL[dtype])


def shifted_window(height, width, size=5):
    """NATTEN's neighbourhood: a size x size window shifted inward at the
    borders, so that every query keeps size^2 keys (fewer on a smaller grid)."""
    size_y, size_x = min(size, height), min(size, width)

    def rule(yi, xi, yj, xj):
        y0, x0 = np.clip(yi - size // 2, 0, height - size_y), np.clip(xi - size // 2, 0, width - size_x)
        return (yj >= y0) & (yj < y0 + size_y) & (xj >= x0) & (xj < x0 + size_x)

    return layout_from_rule(rule, height, width, name="shifted_window")


def shifted_window_and_corners(height, width, size=5):
    """The shifted window and one more pair, the first token attending the
    last: a window in every row with more pairs in some, but no longer a
    whole box in every row (which runs as a clamped window instead)."""
    n = height * width
    corner = layout_from_csr(height, width, np.r_[0, np.ones(n, dtype=np.int64)], [n - 1])
    return combine_layouts(shifted_window(height, width, size), corner, "union")


@pytest.mark.parametrize("size, split", [((1, 9), True), ((8, 1), True), ((5, 5), False), ((7, 13), True),
                                         ((16, 16), True), ((12, 20), True)])
def test_a_window_with_more_pairs_in_some_rows_runs_as_a_split(size, split, monkeypatch):
    """The shifted window: its clipped window on the window kernel, the pairs
    beyond it (border rows) on a tile pass merged into it; against the
    reference with a bias, a key mask, a pruned head and dropout. (On grids
    this small the pairs beyond the window are too many for the split to pay;
    the test lifts that limit.)"""
    from sparse_attention import _torch_ops

    monkeypatch.setattr(_stencil, "CUSTOM_SPLIT_MAX_REST", 1.0)
    layout = shifted_window_and_corners(*size)
    assert (layout.stencil() is None) == split  # on 5 x 5 the window is the whole grid: a stencil
    assert (_stencil.cpu_kernel_choice(layout) == "split") == split
    if split:
        window, _, passes = layout.stencil_split()
        assert int(window[0]) == min(5, size[0]) * min(5, size[1]) and len(passes) >= 6
    n = layout.num_tokens
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, 3, n, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(3, 7, 7, generator=gen, dtype=torch.float64)
    args = dict(key_mask=torch.rand(2, n, generator=gen) > 0.2, head_active=torch.tensor([True, False, True]),
                dropout_p=0.2, dropout_seed=5)
    grad_out = torch.randn(2, 3, n, 16, generator=gen, dtype=torch.float64)
    runs = _torch_ops.stencil_forwards_run
    out, grads = gradients(lambda q, k, v, b: attention(q, k, v, layout, rel_pos_bias=b, **args),
                           [t.float() for t in (q, k, v, bias)], grad_out.float())
    assert _torch_ops.stencil_forwards_run == runs + (_stencil.cpu_kernel_choice(layout) in ("split", "stencil"))
    ref_out, ref_grads = gradients(lambda q, k, v, b: reference_attention(q, k, v, layout, bias=b, **args)[0],
                                   (q, k, v, bias), grad_out)
    torch.testing.assert_close(out.double(), ref_out, **TOL[torch.float32])
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-4)


def test_a_split_needs_every_row_to_hold_the_window(monkeypatch):
    monkeypatch.setattr(_stencil, "CUSTOM_SPLIT_MAX_REST", 1.0)
    window = build_layout("longformer", 12, 12, kernel_size=5, num_global_tokens=0)
    mask = window.to_dense() | shifted_window_and_corners(12, 12, 7).to_dense()
    assert _stencil.cpu_kernel_choice(layout_from_mask(mask, 12, 12)) == "split"
    mask[70, 71] = False  # token 70's right neighbour: its row no longer holds the whole window
    assert layout_from_mask(mask, 12, 12).stencil_split() is None


@pytest.mark.parametrize("side, split", [(12, False), (14, False), (16, True), (32, True)])
def test_a_split_needs_few_pairs_beyond_the_window(side, split, monkeypatch):
    """The measured rule: the shifted 7 x 7 window split from 16 x 16 on,
    where the pairs beyond the clipped window are at most a fifth (measured
    before the window kernel took clamped windows, which it now does at every
    size; the rule stands for other windows with more pairs in some rows)."""
    monkeypatch.setattr(_stencil, "use_clamped_window", False)
    layout = shifted_window(side, side, 7)
    share = 1 - build_layout("longformer", side, side, kernel_size=7, num_global_tokens=0).nnz / layout.nnz
    assert (share <= _stencil.CUSTOM_SPLIT_MAX_REST) == split
    assert (_stencil.cpu_kernel_choice(layout) == "split") == split


def test_empty_rows_give_zero_output_and_minus_infinity_lse():
    layout = layout_from_rule(top_rows_only, 4, 6)
    assert (layout.degrees()[6:] == 0).all() and (np.diff(layout.col_ptr)[1:6:2] == 0).all()
    q, k, v = (torch.randn(1, 2, 24, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out, lse = attention(q, k, v, layout, return_lse=True)
    assert (out[:, :, 6:] == 0).all() and (lse[:, :, 6:] == float("-inf")).all()
    assert torch.isfinite(lse[:, :, :6]).all()
    out.sum().backward()
    assert (q.grad[:, :, 6:] == 0).all()
    assert (k.grad[:, :, 1:6:2] == 0).all() and (v.grad[:, :, 1:6:2] == 0).all()


def test_a_layout_without_pairs():
    layout = layout_from_csr(3, 4, np.zeros(13, dtype=np.int64), np.zeros(0, dtype=np.int32))
    q, k, v = (torch.randn(2, 2, 12, 4, requires_grad=True) for _ in range(3))
    for backend in ("native", "torch"):
        out, lse = attention(q, k, v, layout, return_lse=True, backend=backend)
        assert (out == 0).all() and (lse == float("-inf")).all()
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        assert all((g == 0).all() for g in grads)


@pytest.mark.parametrize("rule", [dilated, earlier_neighbours, checkerboard])
def test_dropout_torch_path_and_numpy_agree_with_the_native_kernels(rule):
    layout = layout_from_rule(rule, 7, 13)
    n = layout.num_tokens
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, n, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(2, 7, 7, generator=gen, dtype=torch.float64)
    key_mask = torch.rand(2, n, generator=gen) > 0.2
    grad_out = torch.randn_like(q)
    results = []
    for backend in ("native", "torch"):
        def fn(q, k, v, bias):
            return attention(q, k, v, layout, rel_pos_bias=bias, key_mask=key_mask, dropout_p=0.3,
                             dropout_seed=17, backend=backend)
        results.append(gradients(fn, (q, k, v, bias), grad_out))
    ref_out = reference_attention(q, k, v, layout, bias=bias, key_mask=key_mask, dropout_p=0.3,
                                  dropout_seed=17)[0]
    torch.testing.assert_close(results[0][0], ref_out, **TOL[torch.float64])
    torch.testing.assert_close(results[1][0], results[0][0], **TOL[torch.float64])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, **TOL[torch.float64])
    as_float = [t.float() for t in (q, k, v, bias)]
    expected = attention(*as_float[:3], layout, rel_pos_bias=as_float[3], key_mask=key_mask)
    got = attention(*(t.numpy() for t in as_float[:3]), layout, rel_pos_bias=as_float[3].numpy(),
                    key_mask=key_mask.numpy())
    np.testing.assert_array_equal(got, expected.numpy())


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_gradcheck_with_empty_rows(backend):
    layout = layout_from_rule(earlier_neighbours, 3, 4)
    assert layout.degrees()[0] == 0
    gen = torch.Generator().manual_seed(2)
    leaves = tuple(torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()
                   for shape in ((1, 2, 12, 4),) * 3 + ((2, 5, 5),))
    key_mask = torch.ones(1, 12, dtype=torch.bool)
    key_mask[0, 5] = False
    assert torch.autograd.gradcheck(
        lambda q, k, v, b: attention(q, k, v, layout, rel_pos_bias=b, key_mask=key_mask, dropout_p=0.2,
                                     dropout_seed=3, backend=backend), leaves, eps=1e-6, atol=1e-6)


# -- the module ----------------------------------------------------------------

def test_module_with_a_custom_pattern():
    torch.manual_seed(0)
    pattern = CustomPattern(dilated)
    module = EnhancedSparseAttention(16, 16, num_heads=2, sparsity_pattern=pattern)
    assert "pattern=dilated" in repr(module)
    x = torch.randn(2, 16, 9, 11)
    module(x).sum().backward()
    stats = module.get_attention_stats()
    layout = module.layout_for(9, 11)
    assert layout is pattern(9, 11) and layout.name == "dilated"
    assert stats.pattern_type == "dilated" and stats.density == pytest.approx(layout.density)
    module.eval()
    native = module(x)
    module.use_cuda_kernel = False
    torch.testing.assert_close(module(x), native, atol=2e-5, rtol=1e-4)
    clone = pickle.loads(pickle.dumps(module))
    clone.use_cuda_kernel = True
    torch.testing.assert_close(clone(x), native)
    assert clone.sparsity_pattern.name == "dilated"


def test_module_statistics_over_a_split_equal_the_pytorch_paths():
    torch.manual_seed(3)
    module = EnhancedSparseAttention(16, 16, num_heads=2, sparsity_pattern=shifted_window_and_corners).eval()
    x = torch.randn(2, 16, 11, 13)
    assert _stencil.cpu_kernel_choice(module.layout_for(11, 13)) == "split"
    native = module(x)
    native_stats = module.get_attention_stats()
    module.reset_stats()
    module.use_cuda_kernel = False
    torch.testing.assert_close(module(x), native, atol=2e-5, rtol=1e-4)
    torch_stats = module.get_attention_stats()
    assert native_stats.pattern_type == "shifted_window_and_corners"
    for name in ("mean", "std", "entropy", "density"):
        assert getattr(native_stats, name) == pytest.approx(getattr(torch_stats, name), rel=1e-4), name
    for a, b in zip(native_stats.entropy_per_head, torch_stats.entropy_per_head):
        assert a == pytest.approx(b, rel=1e-4)


def test_module_takes_any_layout_builder_and_checks_what_it_returns():
    layout = layout_from_rule(cross, 5, 5)

    def builder(height, width):
        return layout if (height, width) == (5, 5) else "not a layout"

    module = EnhancedSparseAttention(8, 8, num_heads=2, sparsity_pattern=builder)
    assert module.pattern_name == "builder"
    assert module(torch.randn(1, 8, 5, 5)).shape == (1, 8, 5, 5)
    with pytest.raises(TypeError, match="returned str for a 4 x 4 map"):
        module(torch.randn(1, 8, 4, 4))
    wrong_size = EnhancedSparseAttention(8, 8, num_heads=2, sparsity_pattern=lambda h, w: layout)
    with pytest.raises(ValueError, match="returned a 5 x 5 layout for a 4 x 6 map"):
        wrong_size(torch.randn(1, 8, 4, 6))
    # a lambda rule deep-copies (an EMA copy) though it cannot pickle
    lam = EnhancedSparseAttention(8, 8, num_heads=2, sparsity_pattern=CustomPattern(lambda a, b, c, d: a == c))
    assert lam.pattern_name == "custom"
    copy.deepcopy(lam)(torch.randn(1, 8, 3, 3))


@pytest.mark.parametrize("pattern", [CustomPattern(causal_window), shifted_window])
def test_module_with_a_custom_pattern_compiles_to_one_graph(pattern):
    torch._dynamo.reset()
    module = EnhancedSparseAttention(16, 16, num_heads=2, sparsity_pattern=pattern).eval()
    x = torch.randn(1, 16, 6, 7)
    compiled = torch.compile(module, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), module(x))


# -- the command lines ---------------------------------------------------------

DILATED = CustomPattern(dilated, max_offset=4)
NOT_A_PATTERN = 3


def test_command_lines_name_patterns_of_ones_own():
    from sparse_attention import SparsityPattern
    from sparse_attention.custom_layouts import layout_of, pattern_from_spec

    assert pattern_from_spec("axial") is SparsityPattern.AXIAL
    rule = pattern_from_spec("test_custom_layouts:cross")
    assert isinstance(rule, CustomPattern) and rule.name == "cross"
    assert pattern_from_spec("test_custom_layouts:DILATED") is DILATED
    builder = pattern_from_spec("test_custom_layouts:shifted_window")  # (height, width, size=5)
    assert builder.name == "shifted_window"
    np.testing.assert_array_equal(layout_of(builder, 9, 9).indices, shifted_window(9, 9).indices)
    np.testing.assert_array_equal(layout_of(SparsityPattern.AXIAL, 4, 5).indices, build_layout("axial", 4, 5).indices)
    for spec, error, words in (("no_such_module_here:rule", ValueError, "cannot import 'no_such_module_here'"),
                               ("test_custom_layouts:missing", ValueError, "has no 'missing'"),
                               ("test_custom_layouts:NOT_A_PATTERN", TypeError, "is a int"),
                               ("test_custom_layouts:gradients", TypeError, "takes 3 arguments"),
                               ("diagonal", ValueError, "--patterns")):
        with pytest.raises(error) as info:
            pattern_from_spec(spec)
        assert words in str(info.value)


def test_bench_takes_a_pattern_of_ones_own(tmp_path, monkeypatch):
    import json

    from sparse_attention import bench

    monkeypatch.setattr(bench, "fma_peak", lambda threads: None)
    bench.main(["--sides", "8", "--patterns", "test_custom_layouts:cross,block", "--repeats", "1", "--no-flex",
                "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "cpu_bench.json").read_text())["records"]
    assert {(r["pattern"], r["level"]) for r in rows} == {("cross", "op"), ("block", "op"), ("cross", "module"),
                                                           ("block", "module")}
    cross_row = next(r for r in rows if r["pattern"] == "cross")
    assert cross_row["density"] == pytest.approx(layout_from_rule(cross, 8, 8).density)


@pytest.mark.parametrize("rule", [earlier_neighbours, top_rows_only])
def test_gradgradcheck_with_empty_rows_and_columns(rule):
    """Second derivatives (the PyTorch path over the same pairs) where rows
    have no key and keys no query."""
    layout = layout_from_rule(rule, 3, 4)
    gen = torch.Generator().manual_seed(0)
    leaves = tuple(torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()
                   for shape in ((1, 2, 12, 4),) * 3 + ((2, 5, 5),))
    assert torch.autograd.gradgradcheck(lambda q, k, v, b: attention(q, k, v, layout, rel_pos_bias=b), leaves,
                                        eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("pattern", [CustomPattern(dilated), shifted_window, shifted_window_and_corners])
def test_module_with_a_custom_pattern_exports(pattern):
    """torch.export from a cold module: a strip stencil with a bias (dilated),
    a clamped window (the shifted window on 17 x 19) and a split (the same
    with one more pair), then eager calls."""
    module = EnhancedSparseAttention(16, 16, num_heads=2, sparsity_pattern=pattern).eval()
    x = torch.randn(1, 16, 17, 19)
    exported = torch.export.export(module, (x,))
    torch.testing.assert_close(exported.module()(x), module(x), atol=1e-5, rtol=1e-5)
