"""Every pattern against its definition in DESIGN.md, computed independently."""

import numpy as np
import pytest

from conftest import PATTERNS, SIZES
from sparse_attention import Layout, SparsityPattern, build_layout
from sparse_attention.patterns import global_tokens

MASK64 = (1 << 64) - 1


def definition_mask(pattern, height, width, kernel_size=7, block_size=8, stride=None,
                    num_global_tokens=1):
    n = height * width
    r = kernel_size // 2
    s = kernel_size if stride is None else stride
    glob = set(global_tokens(n, num_global_tokens).tolist()) if num_global_tokens else set()
    mask = np.zeros((n, n), dtype=bool)
    for i in range(n):
        yi, xi = divmod(i, width)
        for j in range(n):
            yj, xj = divmod(j, width)
            window = abs(yi - yj) <= r and abs(xi - xj) <= r
            if pattern == "dense":
                ok = True
            elif pattern == "axial":
                ok = yi == yj or xi == xj
            elif pattern == "block":
                ok = yi // block_size == yj // block_size and xi // block_size == xj // block_size
            elif pattern == "longformer":
                ok = window or i in glob or j in glob
            elif pattern == "strided":
                ok = window or ((yi - yj) % s == 0 and (xi - xj) % s == 0)
            mask[i, j] = ok
    return mask


def documented_random_rows(height, width, ratio, seed):
    """RANDOM rebuilt from the docstring of sparse_attention.patterns alone."""
    n = height * width
    k = max(1, min(n, int(np.floor(ratio * n + 0.5))))
    rows = []
    for i in range(n):
        state = (seed ^ ((0xD1B54A32D192ED03 * (i + 1)) & MASK64)) & MASK64

        def next_value():
            nonlocal state
            state = (state + 0x9E3779B97F4A7C15) & MASK64
            z = state
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
            return z ^ (z >> 31)

        def token(v):
            return v if v < i else v + 1

        chosen = {i}
        for t in range(n - 1 - (k - 1), n - 1):
            v = (next_value() * (t + 1)) >> 64
            chosen.add(token(t) if token(v) in chosen else token(v))
        rows.append(sorted(chosen))
    return rows


@pytest.mark.parametrize("pattern", [p for p in PATTERNS if p != "random"])
@pytest.mark.parametrize("size", SIZES + [(9, 10)])
def test_structured_pattern_matches_definition(pattern, size):
    layout = build_layout(pattern, *size, kernel_size=3, block_size=4, num_global_tokens=2)
    expected = definition_mask(pattern, *size, kernel_size=3, block_size=4, num_global_tokens=2)
    assert layout.nnz == expected.sum()
    np.testing.assert_array_equal(layout.to_dense(), expected)


@pytest.mark.parametrize("kernel_size,stride", [(3, 2), (5, 4), (7, 7), (1, 3)])
def test_strided_knobs(kernel_size, stride):
    layout = build_layout("strided", 11, 9, kernel_size=kernel_size, stride=stride)
    np.testing.assert_array_equal(layout.to_dense(),
                                  definition_mask("strided", 11, 9, kernel_size, stride=stride))


def test_default_knobs_follow_design():
    layout = build_layout("longformer", 12, 12)
    np.testing.assert_array_equal(layout.to_dense(), definition_mask("longformer", 12, 12))
    assert build_layout("strided", 12, 12).params["stride"] == 7
    np.testing.assert_array_equal(build_layout("block", 12, 12).to_dense(),
                                  definition_mask("block", 12, 12, block_size=8))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("ratio", [0.05, 0.5, 1.0])
def test_random_matches_documented_generator(size, ratio):
    layout = build_layout("random", *size, attention_ratio=ratio, seed=1234)
    expected = documented_random_rows(*size, ratio, 1234)
    for i, row in enumerate(expected):
        np.testing.assert_array_equal(layout.neighbors(i), row)


def test_random_properties_and_seed():
    a = build_layout("random", 20, 20, attention_ratio=0.3, seed=7)
    k = round(0.3 * 400)
    assert (a.degrees() == k).all()
    for i in range(a.num_tokens):
        row = a.neighbors(i)
        assert i in row and (np.diff(row) > 0).all()
    b = build_layout("random", 20, 20, attention_ratio=0.3, seed=8)
    assert not np.array_equal(a.indices, b.indices)
    # keys spread over the whole map: each column is chosen about k times
    counts = np.bincount(a.indices, minlength=400)
    assert counts.min() > 0.4 * k and counts.max() < 1.8 * k


@pytest.mark.parametrize("pattern", PATTERNS)
def test_transpose_and_invariants(pattern):
    layout = build_layout(pattern, 7, 13, kernel_size=5, block_size=3, num_global_tokens=3)
    dense = layout.to_dense()
    assert dense.diagonal().all(), "every row contains its own token"
    for j in range(layout.num_tokens):
        rows = layout.row_indices[layout.col_ptr[j]:layout.col_ptr[j + 1]]
        np.testing.assert_array_equal(rows, np.nonzero(dense[:, j])[0])
    assert layout.density == pytest.approx(dense.mean())


def test_cache_returns_same_object_and_arrays_are_read_only():
    a = build_layout("axial", 10, 10, attention_ratio=0.2)
    b = build_layout(SparsityPattern.AXIAL, 10, 10, attention_ratio=0.9)  # ratio irrelevant
    assert a is b
    with pytest.raises(ValueError):
        a.indices[0] = 5


@pytest.mark.parametrize("knob,value,message", [
    ("kernel_size", 0, "kernel_size"), ("block_size", 0, "block_size"),
    ("attention_ratio", 0.0, "attention_ratio"), ("attention_ratio", 1.5, "attention_ratio"),
    ("num_global_tokens", -1, "num_global_tokens"), ("stride", 0, "stride"),
])
def test_bad_knobs_name_themselves(knob, value, message):
    with pytest.raises(ValueError, match=message):
        build_layout("longformer", 8, 8, **{knob: value})


@pytest.mark.parametrize("height,width,name", [(0, 4, "height"), (4, -1, "width")])
def test_bad_sizes(height, width, name):
    with pytest.raises(ValueError, match=name):
        build_layout("axial", height, width)


def test_too_many_tokens_for_32_bit_indices():
    with pytest.raises(ValueError, match="32-bit"):
        build_layout("axial", 65536, 65536)


def test_unknown_pattern_and_wrong_types():
    with pytest.raises(ValueError, match="unknown sparsity pattern"):
        build_layout("diagonal", 4, 4)
    with pytest.raises(TypeError, match="height"):
        build_layout("axial", 4.0, 4)


def test_more_global_tokens_than_tokens_makes_all_global():
    layout = build_layout("longformer", 2, 2, kernel_size=1, num_global_tokens=5)
    assert layout.density == 1.0


def test_neighbors_bounds():
    layout = build_layout("block", 4, 4, block_size=2)
    np.testing.assert_array_equal(layout.neighbors(5), [0, 1, 4, 5])
    with pytest.raises(IndexError):
        layout.neighbors(16)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_layout_build_is_the_same_on_any_thread_count(pattern):
    # 64 x 64 gives the builders several row ranges, and RANDOM's 8 M pairs a
    # transpose split by columns; its result is checked against NumPy's
    from sparse_attention import get_num_threads, set_num_threads
    from sparse_attention.patterns import _PATTERN_IDS, C

    pattern = SparsityPattern.parse(pattern, "pattern")
    before = get_num_threads()
    built = []
    try:
        for threads in (1, 2, 3):
            set_num_threads(threads)
            built.append(C.build_layout(_PATTERN_IDS[pattern], 64, 64, 7, 8, 7, 2, 0.5, 99))
    finally:
        set_num_threads(before)
    for other in built[1:]:
        for a, b in zip(built[0], other):
            np.testing.assert_array_equal(a, b)
    row_ptr, col_idx, col_ptr, row_idx = built[-1]
    n = 64 * 64
    rows = np.repeat(np.arange(n, dtype=np.int32), np.diff(row_ptr))
    np.testing.assert_array_equal(col_ptr, np.concatenate([[0], np.cumsum(np.bincount(col_idx, minlength=n))]))
    np.testing.assert_array_equal(row_idx, rows[np.argsort(col_idx, kind="stable")])


def test_cpu_tensors_are_views_of_the_layout_arrays():
    # a copy of each array doubled a large layout's memory (2 GiB more for
    # RANDOM at 128 x 128) and took seconds of page faults on the first call
    layout = build_layout("random", 16, 16, seed=3)
    tensors = layout.torch_tensors("cpu")
    assert tensors["row_ptr"].data_ptr() == layout.indptr.ctypes.data
    assert tensors["col_idx"].data_ptr() == layout.indices.ctypes.data
    assert tensors["row_idx"].data_ptr() == layout.row_indices.ctypes.data
    assert "row_ids" not in tensors  # only the PyTorch path needs it, and asks for it
    rows = layout.row_ids_tensor("cpu")
    assert rows.data_ptr() == layout.row_ids().ctypes.data
    np.testing.assert_array_equal(rows.numpy(), np.repeat(np.arange(256), layout.degrees()))


@pytest.mark.parametrize("pattern", PATTERNS)
def test_pickle_round_trip_rebuilds_caches(pattern):
    import pickle

    layout = build_layout(pattern, 7, 13, kernel_size=3, block_size=4, attention_ratio=0.3, seed=2)
    layout.row_ids()
    layout.bias_buckets(3)
    plan = layout.tile_plan()
    copy = pickle.loads(pickle.dumps(layout))
    assert copy is not layout
    assert (copy.pattern, copy.height, copy.width, copy.nnz, copy.params) == \
        (layout.pattern, layout.height, layout.width, layout.nnz, layout.params)
    for name in ("indptr", "indices", "col_ptr", "row_indices"):
        assert np.array_equal(getattr(copy, name), getattr(layout, name))
        assert not getattr(copy, name).flags.writeable
    assert copy._row_ids is None and not copy._buckets and not copy._plan_cache
    for a, b in zip(copy.bias_buckets(3), layout.bias_buckets(3)):
        assert np.array_equal(a, b)
    copied_plan = copy.tile_plan()
    assert (plan is None) == (copied_plan is None)
    if plan is not None:
        assert all(np.array_equal(x, y) for x, y in zip(copy.packed_tile_plan()[:1], layout.packed_tile_plan()[:1]))


def test_copies_share_the_immutable_layout():
    import copy

    layout = build_layout("axial", 4, 6)
    assert copy.copy(layout) is layout
    assert copy.deepcopy({"layout": layout})["layout"] is layout


def test_unpickling_checks_the_arrays():
    import pickle

    layout = build_layout("block", 4, 4, block_size=2)
    state = layout.__getstate__()
    state["indices"] = state["indices"].copy()
    state["indices"][0] = 99
    forged = Layout.__new__(Layout)
    with pytest.raises(ValueError, match="indices"):
        forged.__setstate__(state)
    with pytest.raises(TypeError, match="Layout state"):
        forged.__setstate__(("not", "a", "dict"))
    assert pickle.loads(pickle.dumps(layout)).nnz == layout.nnz


@pytest.mark.parametrize("max_relative", [0, 1, 3, 127, 128])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_bias_buckets_follow_their_definition(pattern, max_relative):
    """bucket = (clamped dy + M) * (2M+1) + (clamped dx + M) per CSR entry;
    perm a stable sort of the entries by bucket (16-bit radix or not: M = 127
    is the last clamp whose buckets fit 16 bits); ptr the bucket offsets."""
    layout = build_layout(pattern, 7, 13, kernel_size=3, block_size=4, attention_ratio=0.4, seed=2)
    rows = np.repeat(np.arange(layout.num_tokens), layout.degrees())
    cols = layout.indices.astype(np.int64)
    m = max_relative
    dy = np.clip(rows // 13 - cols // 13, -m, m) + m
    dx = np.clip(rows % 13 - cols % 13, -m, m) + m
    expected = dy * (2 * m + 1) + dx
    bucket, perm, ptr = layout.bias_buckets(m)
    assert bucket.dtype == perm.dtype == ptr.dtype == np.int64
    assert np.array_equal(bucket, expected)
    assert np.array_equal(perm, np.argsort(expected, kind="stable"))
    assert np.array_equal(ptr, np.concatenate([[0], np.cumsum(np.bincount(expected, minlength=(2 * m + 1) ** 2))]))
