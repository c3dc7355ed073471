"""The float32 gather row kernels (csrc/attention_cpu_gather.c) against the
float64 reference and against the generic row kernels they replace, on the
layouts that reach the rows: scattered keys (RANDOM at low ratios, custom
masks), head dims 8 to 128 in steps of 8 and the others up to 128 (on copies
padded to the next multiple of 8), odd grids, bias, key mask, dropout,
pruned heads, statistics, rows without keys and non-finite inputs."""

import shutil
import subprocess

import numpy as np
import pytest
import torch

from reference import (assert_backward_matches_reference, assert_bias_gradients_match_reference,
                       assert_forward_matches_reference, bias_gradients, bias_training_inputs, random_inputs,
                       reference_attention, reference_statistics)
from sparse_attention import _stencil, _tiles, _torch_ops, build_layout, get_num_threads, set_num_threads
from sparse_attention import sparse_scaled_dot_product_attention as attention
from sparse_attention._native import C
from sparse_attention.custom_layouts import layout_from_mask

SIZES = [(1, 1), (1, 17), (9, 1), (7, 13), (20, 24)]
GATHER_DIMS = [8, 16, 24, 40, 64, 72, 80, 96, 128]
PADDED_DIMS = [1, 12, 100, 127]  # run on copies padded with zero columns


@pytest.fixture(autouse=True, params=["whole rows", "key blocks"])
def rows_only(monkeypatch, request):
    """Every layout on the row kernels: no stencils, no tiles. Each test runs
    twice: as the kernels choose (whole rows on these small grids), and with
    the blocked forms forced, in blocks of 16 keys (queries) and ranges of 8
    rows (columns), so that the odd sizes cut rows and ranges anywhere."""
    monkeypatch.setattr(_stencil, "use_stencil_cpu_kernel", False)
    monkeypatch.setattr(_tiles, "CPU_MIN_FILL", float("inf"))
    if request.param == "key blocks":
        C.set_gather_blocking(16, 8)
    yield request.param
    C.set_gather_kernels(True)
    C.set_gather_blocking(0, 0)


def scattered(height, width, ratio=0.3, seed=0):
    return build_layout("random", height, width, attention_ratio=ratio, seed=seed)


def run_both(fn):
    """fn() on the gather kernels, then on the generic ones: (gather's, generic's)."""
    C.set_gather_kernels(True)
    before = C.cpu_gather_forwards()
    fast = fn()
    assert C.cpu_gather_forwards() > before
    C.set_gather_kernels(False)
    before = C.cpu_gather_forwards()
    slow = fn()
    assert C.cpu_gather_forwards() == before
    C.set_gather_kernels(True)
    return fast, slow


def training_step(layout, q, k, v, bias, grad_out, args):
    """Output, lse, statistics and the four gradients of a float32 call with every option on."""
    leaves = [t.float().requires_grad_(True) for t in (q, k, v, bias)]
    out, lse, stats = attention(*leaves[:3], layout, rel_pos_bias=leaves[3], return_lse=True,
                                return_stats=True, **args)
    out.backward(grad_out.float())
    return [out, lse, stats] + [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("dim", GATHER_DIMS + PADDED_DIMS)
@pytest.mark.parametrize("size", SIZES)
def test_forward_matches_the_reference(size, dim):
    layout = scattered(*size)
    (q, k, v), bias = random_inputs(2, 3, layout.num_tokens, dim, seed=dim, bias_side=9)
    key_mask = torch.rand(2, layout.num_tokens, generator=torch.Generator().manual_seed(1)) > 0.25
    args = dict(key_mask=key_mask, head_active=torch.tensor([True, False, True]))
    before = C.cpu_gather_forwards()
    out, lse = attention(q.float(), k.float(), v.float(), layout, rel_pos_bias=bias.float(), return_lse=True,
                         **args)
    assert C.cpu_gather_forwards() == before + 1
    ref_out, ref_lse, _ = reference_attention(q, k, v, layout, bias=bias, **args)
    assert_forward_matches_reference(out, lse, ref_out, ref_lse, 2e-5)


@pytest.mark.parametrize("dim", [8, 24, 64, 96, 5, 36])
@pytest.mark.parametrize("size", [(1, 17), (7, 13), (20, 24)])
def test_backward_matches_the_reference(size, dim):
    layout = scattered(*size, ratio=0.2)
    (q, k, v), _ = random_inputs(2, 3, layout.num_tokens, dim, seed=3)
    grad_out = torch.randn(2, 3, layout.num_tokens, dim, generator=torch.Generator().manual_seed(4))
    key_mask = torch.rand(2, layout.num_tokens, generator=torch.Generator().manual_seed(5)) > 0.3
    args = dict(key_mask=key_mask, head_active=torch.tensor([True, True, False]), dropout_p=0.25,
                dropout_seed=9)
    before = C.cpu_gather_backwards()
    assert_backward_matches_reference(attention, layout, (q, k, v), grad_out, **args)
    assert C.cpu_gather_backwards() == before + 1


@pytest.mark.parametrize("dim", [16, 40, 12])
def test_bias_gradients_match_the_reference(dim):
    layout = scattered(13, 11, ratio=0.25)
    q, k, v, bias, grad_out, args = bias_training_inputs(layout, 7, dim=dim)
    got = bias_gradients(attention, layout, q, k, v, bias, grad_out, **args)
    assert_bias_gradients_match_reference(got, layout, q, k, v, bias, grad_out, **args)


@pytest.mark.parametrize("dim", GATHER_DIMS + [12, 100])
def test_the_gather_and_generic_kernels_agree(dim):
    """Outputs, statistics and all four gradients within float32 rounding of
    each other, with every option on; dropout keeps the same pairs."""
    layout = layout_from_mask(np.random.default_rng(dim).random((15 * 9, 15 * 9)) < 0.15, 15, 9)
    inputs = bias_training_inputs(layout, 5, dim=dim)
    fast, slow = run_both(lambda: training_step(layout, *inputs))
    for name, a, b in zip(("out", "lse", "stats", "q", "k", "v", "bias"), fast, slow):
        finite = torch.isfinite(b)
        assert torch.equal(finite, torch.isfinite(a)), name
        assert (a[finite] - b[finite]).abs().max() <= 2e-5 * max(1.0, b[finite].abs().max().item()), name
    assert torch.equal(fast[0] == 0, slow[0] == 0)


def test_statistics_match_the_reference():
    layout = scattered(10, 10, ratio=0.2)
    (q, k, v), _ = random_inputs(1, 2, 100, 32, seed=8)
    _, _, stats = attention(q.float(), k.float(), v.float(), layout, return_lse=True, return_stats=True)
    _, _, probs = reference_attention(q, k, v, layout)
    assert (stats.double() - reference_statistics(probs)).abs().max() < 2e-5


@pytest.mark.parametrize("dim", [129, 136])
def test_other_head_dims_run_on_the_generic_kernels(dim):
    layout = scattered(7, 13)
    (q, k, v), _ = random_inputs(1, 2, layout.num_tokens, dim)
    before = C.cpu_gather_forwards(), C.cpu_gather_backwards()
    assert_backward_matches_reference(attention, layout, (q, k, v), torch.randn(1, 2, layout.num_tokens, dim))
    assert (C.cpu_gather_forwards(), C.cpu_gather_backwards()) == before


def test_float64_runs_on_the_generic_kernels():
    layout = scattered(7, 13)
    (q, k, v), _ = random_inputs(1, 2, layout.num_tokens, 16)
    before = C.cpu_gather_forwards()
    out = attention(q, k, v, layout)
    assert C.cpu_gather_forwards() == before
    torch.testing.assert_close(out, reference_attention(q, k, v, layout)[0])


def test_rows_without_keys_give_zeros_and_no_gradient():
    """A key mask that leaves some rows no key: zero output, lse -inf, zero
    gradients there, and rows of 1 to 70 keys (chunks of 64, groups of 8)
    around them."""
    rng = np.random.default_rng(4)
    mask = np.zeros((80, 80), dtype=bool)
    for row in range(80):
        mask[row, rng.choice(80, size=row % 71, replace=False)] = True
    layout = layout_from_mask(mask, 8, 10)
    (q, k, v), _ = random_inputs(2, 2, 80, 16, seed=6)
    key_mask = torch.ones(2, 80, dtype=torch.bool)
    key_mask[1, ::2] = False
    leaves = [t.float().requires_grad_(True) for t in (q, k, v)]
    out, lse = attention(*leaves, layout, key_mask=key_mask, return_lse=True)
    ref_out, ref_lse, _ = reference_attention(q, k, v, layout, key_mask=key_mask)
    assert_forward_matches_reference(out, lse, ref_out, ref_lse, 2e-5)
    empty = torch.isinf(ref_lse)
    assert empty.any() and torch.all(out[empty] == 0)
    out.sum().backward()
    assert torch.all(leaves[0].grad[empty] == 0)
    assert_backward_matches_reference(attention, layout, (q, k, v), torch.randn(2, 2, 80, 16),
                                      key_mask=key_mask)


def test_non_finite_inputs_give_what_the_generic_kernels_give():
    layout = scattered(9, 9, ratio=0.4)
    (q, k, v), _ = random_inputs(1, 2, 81, 16, seed=2)
    q, k, v = q.float(), k.float(), v.float()
    q[0, 0, 3] = float("nan")
    k[0, 1, 7] = float("inf")
    fast, slow = run_both(lambda: attention(q, k, v, layout, return_lse=True))
    for a, b in zip(fast, slow):
        assert torch.equal(torch.isnan(a), torch.isnan(b))
        finite = torch.isfinite(b)
        assert (a[finite] - b[finite]).abs().max() < 2e-5
    assert torch.isnan(fast[0][0, 0, 3]).all()


def test_long_rows_left_by_a_plan_run_on_the_gather_kernels(monkeypatch):
    """LONGFORMER's global row, which its tile plan leaves out, goes through
    the gather forward beside the tiles."""
    monkeypatch.setattr(_tiles, "CPU_MIN_FILL", 0.0)
    layout = build_layout("longformer", 40, 40, kernel_size=5, num_global_tokens=1)
    assert _stencil.cpu_kernel_choice(layout) == "tiles" and layout.cpu_tile_plan().long_rows.size
    (q, k, v), _ = random_inputs(1, 2, 1600, 32, seed=1)
    before = C.cpu_gather_forwards()
    out, lse = attention(q.float(), k.float(), v.float(), layout, return_lse=True)
    assert C.cpu_gather_forwards() == before + 1
    ref_out, ref_lse, _ = reference_attention(q, k, v, layout)
    assert_forward_matches_reference(out, lse, ref_out, ref_lse, 2e-5)


def test_the_switch_says_what_it_was():
    assert C.set_gather_kernels(False) is True
    assert C.set_gather_kernels(True) is False


def test_masked_keys_with_non_finite_rows_add_nothing_to_the_gradients():
    """NaN and inf in the K and V rows of masked keys, and in the dO rows of
    queries whose keys are all masked: the gradients stay finite and are the
    generic kernels' (which pass such pairs over)."""
    layout = scattered(9, 9, ratio=0.4, seed=3)
    (q, k, v), _ = random_inputs(2, 2, 81, 24, seed=7)
    q, k, v = q.float(), k.float(), v.float()
    key_mask = torch.rand(2, 81, generator=torch.Generator().manual_seed(8)) > 0.3
    k[~key_mask[:, None, :, None].expand_as(k)] = float("nan")
    v[~key_mask[:, None, :, None].expand_as(v)] = float("inf")
    grad_out = torch.randn(2, 2, 81, 24, generator=torch.Generator().manual_seed(9))

    def gradients():
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out, lse = attention(*leaves, layout, key_mask=key_mask, return_lse=True)
        empty = torch.isinf(lse)  # rows with no allowed key: their dO may be anything
        out.backward(torch.where(empty[..., None], torch.full_like(grad_out, float("nan")), grad_out))
        return [leaf.grad for leaf in leaves]
    fast, slow = run_both(gradients)
    for a, b in zip(fast, slow):
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
        assert (a - b).abs().max() <= 2e-5 * max(1.0, b.abs().max().item())


def test_key_blocks_run_where_forced_and_agree_with_whole_rows(rows_only):
    """Forward and backward in blocks against whole rows, every option on;
    the blocked forms ran (their counter) exactly where forced."""
    layout = scattered(20, 24, ratio=0.2, seed=5)
    inputs = bias_training_inputs(layout, 3, dim=32)
    before = C.cpu_gather_blocked_calls()
    got = training_step(layout, *inputs)
    assert C.cpu_gather_blocked_calls() == before + (2 if rows_only == "key blocks" else 0)
    settings = C.set_gather_blocking(-1)
    whole = training_step(layout, *inputs)
    C.set_gather_blocking(*settings)
    for name, a, b in zip(("out", "lse", "stats", "q", "k", "v", "bias"), got, whole):
        finite = torch.isfinite(b)
        assert torch.equal(finite, torch.isfinite(a)), name
        assert (a[finite] - b[finite]).abs().max() <= 2e-5 * max(1.0, b[finite].abs().max().item()), name


def l2_bytes():
    """glibc's figure, which the kernels read through sysconf (Python's os.sysconf does not name it); 0 if unknown."""
    found = subprocess.run(["getconf", "LEVEL2_CACHE_SIZE"], capture_output=True, text=True) \
        if shutil.which("getconf") else None
    return int(found.stdout.strip()) if found is not None and found.stdout.strip().isdigit() else 0


def test_heads_past_l2_run_in_key_blocks_by_themselves(rows_only):
    """128 x 128 tokens at D=64: a head's K and V take 8 MB, past three
    quarters of any L2 this runs on, so the kernels choose blocks; every 37th
    row is checked against its softmax over its own keys in float64 (a dense
    reference would take N x N)."""
    if rows_only == "key blocks":
        pytest.skip("the kernels' own choice")
    l2 = l2_bytes()
    if l2 * 3 // 4 >= 8 << 20:
        pytest.skip(f"an L2 of {l2} bytes holds a head's rows")
    layout = build_layout("random", 128, 128, attention_ratio=0.01, seed=2)
    (q, k, v), _ = random_inputs(1, 1, layout.num_tokens, 64, seed=4)
    before = C.cpu_gather_blocked_calls()
    out, lse = attention(q.float(), k.float(), v.float(), layout, return_lse=True)
    assert C.cpu_gather_blocked_calls() == before + 1
    for row in range(0, layout.num_tokens, 37):
        keys = torch.from_numpy(layout.neighbors(row).astype(np.int64))
        scores = k[0, 0, keys] @ q[0, 0, row] / 8.0
        ref_lse = torch.logsumexp(scores, 0)
        ref_out = torch.softmax(scores, 0) @ v[0, 0, keys]
        assert abs(lse[0, 0, row].item() - ref_lse.item()) < 2e-5
        assert (out[0, 0, row].double() - ref_out).abs().max() < 2e-5


def test_the_blocking_setting_says_what_it_was_and_checks_its_range():
    assert C.set_gather_blocking(256, 64) in ((0, 0), (16, 8))
    assert C.set_gather_blocking(0) == (256, 64)
    with pytest.raises(ValueError, match=r"range_rows: expected 0 \(the default\) to 1024, got 2000"):
        C.set_gather_blocking(64, 2000)
    with pytest.raises(ValueError, match="range_rows: expected 0 .* got -1"):
        C.set_gather_blocking(64, -1)


def test_the_bias_gradient_comes_per_head_without_score_gradients(rows_only):
    """On the gather kernels the bias gradient is summed by offset per (batch,
    head) in the kernel (grad_bias_rows), not written per pair and summed
    after (grad_scores): the C entry point takes either, and both give the
    same table; other calls refuse grad_bias_rows."""
    layout = scattered(11, 13, ratio=0.3, seed=4)
    n = layout.num_tokens
    q, k, v, bias, grad_out, args = bias_training_inputs(layout, 5, heads=2, dim=16)
    q, k, v, bias, grad_out = (t.float().contiguous() for t in (q, k, v, bias, grad_out))
    out, lse = attention(q, k, v, layout, rel_pos_bias=bias, return_lse=True, **args)
    csr = [torch.from_numpy(a.copy()) for a in (layout.indptr, layout.indices, layout.col_ptr,
                                                 layout.row_indices)]
    knobs = dict(height=11, width=13, scale=0.25, rel_pos_bias=bias, key_mask=args["key_mask"],
                 head_active=args["head_active"], dropout_p=0.2, dropout_seed=7)

    def backward(dtype=torch.float32, **extra):
        tensors = [t.to(dtype) for t in (q, k, v, out, grad_out, lse)]
        grads = [torch.empty_like(tensors[0]) for _ in range(3)]
        delta = torch.empty(2, 2, n, dtype=dtype)
        C.attention_backward(*tensors, delta, *grads, *csr, **{**knobs, **extra})
        return grads

    rows = torch.empty(2, 2, 25)
    before = C.cpu_gather_backwards()
    by_rows = backward(grad_bias_rows=rows)
    assert C.cpu_gather_backwards() == before + 1
    scores = torch.empty(2, 2, layout.nnz)
    by_scores = backward(grad_scores=scores)
    for a, b in zip(by_rows, by_scores):
        assert (a - b).abs().max() <= 1e-6 * max(1.0, b.abs().max().item())
    # the per-pair score gradients summed by offset, batch by batch
    table = torch.zeros(2, 25, dtype=torch.float64)
    ys, xs = np.divmod(np.arange(n), 13)
    queries = np.repeat(np.arange(n), np.diff(layout.indptr))
    dy = np.clip(ys[queries] - ys[layout.indices], -2, 2) + 2
    dx = np.clip(xs[queries] - xs[layout.indices], -2, 2) + 2
    bucket = torch.from_numpy(dy * 5 + dx)
    for b in range(2):
        for h in range(2):
            table[h].index_add_(0, bucket, scores[b, h].double())
    assert (rows.sum(0).double() - table).abs().max() < 1e-5 * max(1.0, table.abs().max().item())
    assert rows[:, 1].abs().max() == 0  # the pruned head
    with pytest.raises(ValueError, match="grad_bias_rows: takes"):
        backward(torch.float64, grad_bias_rows=rows.double(), rel_pos_bias=bias.double())
    C.set_gather_kernels(False)
    with pytest.raises(ValueError, match="grad_bias_rows: takes"):
        backward(grad_bias_rows=rows)
    C.set_gather_kernels(True)
    with pytest.raises(ValueError, match="grad_bias_rows: takes"):
        backward(grad_bias_rows=rows, grad_scores=scores)


@pytest.mark.parametrize("bias_side, per_head", [(3, True), (41, False)])
def test_a_wide_bias_over_few_pairs_keeps_its_gradient_per_pair(monkeypatch, rows_only, bias_side, per_head):
    """Each range of the dQ pass holds a bias table of its own; where those
    tables outgrow one score gradient per pair (a 41 x 41 table, about five
    keys a row), the op takes the per-pair buffer instead. Either way the
    gradients match the reference."""
    layout = scattered(7, 13, ratio=0.05, seed=3)
    chosen = []
    choose = _torch_ops._gather_sums_bias_per_head
    monkeypatch.setattr(_torch_ops, "_gather_sums_bias_per_head",
                        lambda *a: chosen.append(choose(*a)) or chosen[-1])
    q, k, v, bias, grad_out, args = bias_training_inputs(layout, bias_side, dim=16)
    got = bias_gradients(attention, layout, q, k, v, bias, grad_out, **args)
    assert chosen == [per_head]
    assert_bias_gradients_match_reference(got, layout, q, k, v, bias, grad_out, **args)


def test_the_ranges_per_head_follow_the_call_and_the_setting():
    """1024 rows a range, halved down to 64 until the call has 32 ranges,
    on any thread count; a setting fixes the size."""
    settings, threads = C.set_gather_blocking(0, 0), get_num_threads()
    try:
        for count in (1, 2):
            set_num_threads(count)
            assert C.gather_ranges_per_head(100, 0) == 0
            assert C.gather_ranges_per_head(32, 1024) == 1
            assert C.gather_ranges_per_head(32, 1025) == 2
            assert C.gather_ranges_per_head(8, 1024) == 4  # 256 rows
            assert C.gather_ranges_per_head(1, 1024) == 16  # 64 rows at the least
            assert C.gather_ranges_per_head(1, 16384) == 32  # 512 rows
        C.set_gather_blocking(64, 100)
        assert C.gather_ranges_per_head(1, 1025) == 11
    finally:
        C.set_gather_blocking(*settings)
        set_num_threads(threads)
    with pytest.raises(ValueError, match="num_tokens: expected 0 or more, got -3"):
        C.gather_ranges_per_head(1, -3)
    with pytest.raises(ValueError, match="batch_heads: expected 1 or more, got 0"):
        C.gather_ranges_per_head(0, 10)


def test_one_head_of_32_x_32_with_a_bias_adds_up_the_same_on_one_thread_and_two(rows_only):
    """B=1, one head, 1024 tokens: the dQ pass runs in 16 ranges of 64 rows
    (not one of 1024, one thread's work), whose bias tables add up in range
    order: the same bits on one thread and on two, and the reference's
    gradients."""
    layout = scattered(32, 32, ratio=0.05, seed=6)
    q, k, v, bias, grad_out, args = bias_training_inputs(layout, 5, batch=1, heads=1, dim=16)
    threads = get_num_threads()
    try:
        set_num_threads(2)
        two = bias_gradients(attention, layout, q, k, v, bias, grad_out, **args)
        set_num_threads(1)
        one = bias_gradients(attention, layout, q, k, v, bias, grad_out, **args)
    finally:
        set_num_threads(threads)
    for a, b in zip(one, two):
        assert torch.equal(a, b)
    assert_bias_gradients_match_reference(two, layout, q, k, v, bias, grad_out, **args)


def test_heads_within_three_quarters_of_l2_run_whole_rows(rows_only):
    """K and V of 0.6 L2 run whole rows (blocks cost more there than they
    save), of 0.9 L2 in key blocks; both match the generic kernels."""
    if rows_only == "key blocks":
        pytest.skip("the kernels' own choice")
    l2 = l2_bytes()
    if l2 < 1 << 18:
        pytest.skip("the L2 size is unknown: the kernels assume 2 MB")
    row_bytes = 2 * 64 * 4
    for share, blocked in ((0.6, 0), (0.9, 1)):
        tokens = int(share * l2 / row_bytes)
        layout = build_layout("random", 1, tokens, attention_ratio=0.02, seed=1)
        (q, k, v), _ = random_inputs(1, 1, tokens, 64, seed=2)
        before = C.cpu_gather_blocked_calls()
        fast, slow = run_both(lambda: attention(q.float(), k.float(), v.float(), layout))
        assert C.cpu_gather_blocked_calls() == before + blocked, share
        assert (fast - slow).abs().max() < 2e-5
