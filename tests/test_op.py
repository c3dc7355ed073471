"""The op on the CPU: C kernels and the PyTorch path against the float64 reference."""

import numpy as np
import pytest
import torch

from conftest import PATTERNS, SIZES
from reference import reference_attention
from sparse_attention import build_layout, set_num_threads, get_num_threads
from sparse_attention import sparse_scaled_dot_product_attention as attention

TOL = {torch.float64: dict(atol=1e-10, rtol=1e-9), torch.float32: dict(atol=3e-5, rtol=3e-4)}


def make_layout(pattern, size):
    return build_layout(pattern, *size, kernel_size=3, block_size=4, num_global_tokens=2,
                        attention_ratio=0.4, seed=3)


def make_inputs(batch, heads, n, dim, dtype, seed=0, bias_side=None):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, dim, generator=gen, dtype=torch.float64).to(dtype)
               for _ in range(3))
    bias = None
    if bias_side is not None:
        bias = torch.randn(heads, bias_side, bias_side, generator=gen, dtype=torch.float64).to(dtype)
    return q, k, v, bias


def run_with_grads(fn, tensors, grad_out):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]
    out = fn(*leaves)
    wanted = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, wanted, grad_out)
    return out.detach(), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_native_matches_reference(pattern, size, with_bias, with_mask, dtype):
    layout = make_layout(pattern, size)
    n = layout.num_tokens
    q, k, v, bias = make_inputs(2, 3, n, 8, dtype, bias_side=5 if with_bias else None)
    key_mask = (torch.rand(2, n, generator=torch.Generator().manual_seed(1)) > 0.3) if with_mask else None
    grad_out = torch.randn(2, 3, n, 8, dtype=torch.float64).to(dtype)

    def ours(q, k, v, bias):
        return attention(q, k, v, layout, rel_pos_bias=bias, key_mask=key_mask, backend="native")

    def ref(q, k, v, bias):
        return reference_attention(q, k, v, layout, bias=bias, key_mask=key_mask)[0]

    out, grads = run_with_grads(ours, (q, k, v, bias), grad_out)
    ref_out, ref_grads = run_with_grads(ref, (q.double(), k.double(), v.double(),
                                              None if bias is None else bias.double()),
                                        grad_out.double())
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref_out, **TOL[dtype])
    for g, rg in zip(grads, ref_grads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), rg, **TOL[dtype])


@pytest.mark.parametrize("pattern", PATTERNS)
def test_torch_path_matches_native(pattern):
    layout = make_layout(pattern, (7, 13))
    q, k, v, bias = make_inputs(2, 2, layout.num_tokens, 16, torch.float64, bias_side=7)
    key_mask = torch.rand(2, layout.num_tokens) > 0.2
    grad_out = torch.randn_like(q)
    results = []
    for backend in ("native", "torch"):
        def fn(q, k, v, bias):
            return attention(q, k, v, layout, rel_pos_bias=bias, key_mask=key_mask,
                             dropout_p=0.25, dropout_seed=11, backend=backend)
        results.append(run_with_grads(fn, (q, k, v, bias), grad_out))
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_a, out_b, **TOL[torch.float64])
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


@pytest.mark.parametrize("pattern", ["axial", "longformer", "random"])
def test_dropout_matches_reference(pattern):
    layout = make_layout(pattern, (6, 7))
    q, k, v, bias = make_inputs(2, 2, layout.num_tokens, 8, torch.float64, bias_side=3)
    grad_out = torch.randn_like(q)

    def ours(q, k, v, bias):
        return attention(q, k, v, layout, rel_pos_bias=bias, dropout_p=0.3, dropout_seed=99)

    def ref(q, k, v, bias):
        return reference_attention(q, k, v, layout, bias=bias, dropout_p=0.3, dropout_seed=99)[0]

    out, grads = run_with_grads(ours, (q, k, v, bias), grad_out)
    ref_out, ref_grads = run_with_grads(ref, (q, k, v, bias), grad_out)
    torch.testing.assert_close(out, ref_out, **TOL[torch.float64])
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, **TOL[torch.float64])


def test_dropout_seed_behaviour():
    layout = make_layout("dense", (5, 5))
    q, k, v, _ = make_inputs(1, 2, 25, 8, torch.float32)
    a = attention(q, k, v, layout, dropout_p=0.5, dropout_seed=1)
    b = attention(q, k, v, layout, dropout_p=0.5, dropout_seed=1)
    c = attention(q, k, v, layout, dropout_p=0.5, dropout_seed=2)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    plain = attention(q, k, v, layout)
    assert torch.equal(attention(q, k, v, layout, dropout_p=0.0, dropout_seed=5), plain)
    torch.manual_seed(0)
    d = attention(q, k, v, layout, dropout_p=0.5)
    torch.manual_seed(0)
    e = attention(q, k, v, layout, dropout_p=0.5)
    assert torch.equal(d, e), "the drawn seed follows torch.manual_seed"


def test_dropout_preserves_expectation_and_rate():
    layout = make_layout("dense", (6, 6))
    q, k, v, _ = make_inputs(1, 1, 36, 8, torch.float64)
    plain = attention(q, k, v, layout)
    runs = torch.stack([attention(q, k, v, layout, dropout_p=0.3, dropout_seed=s) for s in range(400)])
    # the mean over seeds converges to the undropped output
    err = (runs.mean(0) - plain).abs().mean() / plain.abs().mean()
    assert err < 0.05
    from sparse_attention._torch_impl import dropout_keep_mask
    rows = torch.arange(200).repeat_interleave(200)
    cols = torch.arange(200).repeat(200)
    keep = dropout_keep_mask(5, 2, 2, rows, cols, 0.3)
    assert abs(keep.double().mean().item() - 0.7) < 0.01


def test_row_with_every_key_masked():
    layout = build_layout("block", 4, 4, block_size=2)
    q, k, v, bias = make_inputs(2, 2, 16, 4, torch.float64, bias_side=3)
    key_mask = torch.ones(2, 16, dtype=torch.bool)
    key_mask[0, [0, 1, 4, 5]] = False  # the whole top-left block, for batch 0
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, bias)]
    out, lse = attention(*leaves[:3], layout, rel_pos_bias=leaves[3], key_mask=key_mask,
                         return_lse=True)
    assert (out[0, :, [0, 1, 4, 5]] == 0).all()
    assert torch.isinf(lse[0, :, [0, 1, 4, 5]]).all() and (lse[0, :, [0, 1, 4, 5]] < 0).all()
    out.sum().backward()
    for leaf in leaves:
        assert torch.isfinite(leaf.grad).all()
    assert (leaves[0].grad[0, :, [0, 1, 4, 5]] == 0).all()
    ref_out, ref_lse, _ = reference_attention(q, k, v, layout, bias=bias, key_mask=key_mask)
    torch.testing.assert_close(out.detach(), ref_out)


@pytest.mark.parametrize("with_dropout", [False, True])
@pytest.mark.parametrize("pattern", ["axial", "longformer", "strided", "random", "block"])
def test_gradcheck_native(pattern, with_dropout):
    layout = make_layout(pattern, (3, 5))
    q, k, v, bias = make_inputs(1, 2, 15, 4, torch.float64, bias_side=3)
    key_mask = torch.ones(1, 15, dtype=torch.bool)
    key_mask[0, 7] = False
    leaves = tuple(t.clone().requires_grad_(True) for t in (q, k, v, bias))

    def fn(q, k, v, bias):
        return attention(q, k, v, layout, rel_pos_bias=bias, key_mask=key_mask,
                         dropout_p=0.2 if with_dropout else 0.0, dropout_seed=4)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6)


def test_gradcheck_torch_path():
    layout = make_layout("longformer", (3, 4))
    q, k, v, bias = make_inputs(1, 2, 12, 4, torch.float64, bias_side=3)
    leaves = tuple(t.clone().requires_grad_(True) for t in (q, k, v, bias))
    assert torch.autograd.gradcheck(
        lambda q, k, v, b: attention(q, k, v, layout, rel_pos_bias=b, backend="torch"), leaves)


@pytest.mark.parametrize("pattern", ["axial", "strided", "longformer"])
def test_numpy_float16_equals_torch_float16(pattern):
    """float16 arrays widen to float32 for the kernels as float16 tensors do:
    the same output (float16) and lse and statistics (float32)."""
    layout = make_layout(pattern, (7, 13))
    q, k, v, bias = make_inputs(2, 2, layout.num_tokens, 8, torch.float16, bias_side=5)
    expected = attention(q, k, v, layout, rel_pos_bias=bias, return_lse=True, return_stats=True,
                         dropout_p=0.1, dropout_seed=2)
    got = attention(q.numpy(), k.numpy(), v.numpy(), layout, rel_pos_bias=bias.numpy(), return_lse=True,
                    return_stats=True, dropout_p=0.1, dropout_seed=2)
    assert got[0].dtype == np.float16 and got[1].dtype == np.float32 and got[2].dtype == np.float32
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b.numpy())


def test_numpy_path_equals_torch_path():
    layout = make_layout("strided", (7, 13))
    q, k, v, bias = make_inputs(2, 2, layout.num_tokens, 8, torch.float32, bias_side=5)
    key_mask = torch.rand(2, layout.num_tokens) > 0.3
    expected, expected_lse = attention(q, k, v, layout, rel_pos_bias=bias, key_mask=key_mask,
                                       return_lse=True)
    out, lse = attention(q.numpy(), k.numpy(), v.numpy(), layout, rel_pos_bias=bias.numpy(),
                         key_mask=key_mask.numpy(), return_lse=True)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_array_equal(out, expected.numpy())
    np.testing.assert_array_equal(lse, expected_lse.numpy())


def test_lse_and_stats_match_reference():
    layout = make_layout("longformer", (7, 13))
    q, k, v, bias = make_inputs(2, 3, layout.num_tokens, 8, torch.float64, bias_side=5)
    out, lse, stats = attention(q, k, v, layout, rel_pos_bias=bias, return_lse=True,
                                return_stats=True)
    _, ref_lse, probs = reference_attention(q, k, v, layout, bias=bias)
    torch.testing.assert_close(lse, ref_lse)
    torch.testing.assert_close(stats[..., 0], (probs ** 2).sum(-1))
    plogp = torch.where(probs > 0, probs * probs.clamp_min(1e-300).log(), torch.zeros_like(probs))
    torch.testing.assert_close(stats[..., 1], -plogp.sum(-1))
    torch_stats = attention(q, k, v, layout, rel_pos_bias=bias, return_stats=True, backend="torch")[1]
    torch.testing.assert_close(torch_stats, stats)


def test_pruned_heads_are_zero_and_others_unchanged():
    layout = make_layout("axial", (5, 6))
    q, k, v, _ = make_inputs(2, 4, 30, 8, torch.float64)
    active = torch.tensor([True, False, True, False])
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = attention(*leaves, layout, head_active=active)
    full = attention(q, k, v, layout)
    assert (out[:, ~active] == 0).all()
    torch.testing.assert_close(out[:, active], full[:, active])
    out.sum().backward()
    for leaf in leaves:
        assert (leaf.grad[:, ~active] == 0).all()
    torch_out = attention(q, k, v, layout, head_active=active, backend="torch")
    torch.testing.assert_close(torch_out, out.detach())


def test_strided_views_of_fused_projection():
    layout = make_layout("block", (6, 6))
    batch, n, heads, dim = 2, 36, 3, 8
    fused = torch.randn(batch, n, 3, heads, dim, dtype=torch.float64)
    q, k, v = (fused[:, :, idx].permute(0, 2, 1, 3) for idx in range(3))
    assert not q.is_contiguous()
    out = attention(q, k, v, layout)
    expected = attention(q.contiguous(), k.contiguous(), v.contiguous(), layout)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_threads_are_deterministic():
    layout = make_layout("random", (12, 12))
    q, k, v, bias = make_inputs(2, 4, 144, 16, torch.float32, bias_side=9)
    previous = get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3, 1):
            set_num_threads(threads)
            leaves = [t.clone().requires_grad_(True) for t in (q, k, v, bias)]
            out = attention(*leaves[:3], layout, rel_pos_bias=leaves[3], dropout_p=0.1, dropout_seed=3)
            out.backward(torch.ones_like(out))
            results.append([out.detach()] + [leaf.grad for leaf in leaves])
    finally:
        set_num_threads(previous)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_empty_batch_and_single_token():
    layout = build_layout("axial", 1, 1)
    q, k, v, _ = make_inputs(0, 2, 1, 4, torch.float32)
    assert attention(q, k, v, layout).shape == (0, 2, 1, 4)
    q, k, v, _ = make_inputs(1, 1, 1, 4, torch.float64)
    torch.testing.assert_close(attention(q, k, v, layout), v)  # one key: out = v


def test_scale_argument():
    layout = make_layout("axial", (4, 4))
    q, k, v, _ = make_inputs(1, 1, 16, 8, torch.float64)
    out = attention(q, k, v, layout, scale=0.3)
    torch.testing.assert_close(out, reference_attention(q, k, v, layout, scale=0.3)[0])


def test_numpy_only_use_without_torch():
    """Layouts and the NumPy forward work in a process where torch cannot be imported."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        import numpy as np
        import sparse_attention as sa
        assert not hasattr(sa, "EnhancedSparseAttention")
        layout = sa.build_layout("longformer", 5, 6, kernel_size=3)
        q = np.random.default_rng(0).standard_normal((1, 2, 30, 4)).astype(np.float32)
        out = sa.sparse_scaled_dot_product_attention(q, q, q, layout, dropout_p=0.1, dropout_seed=3)
        assert out.shape == q.shape and np.isfinite(out).all()
        # layouts of one's own too, and a stencil among them on the NumPy path
        ring = sa.layout_from_rule(lambda yi, xi, yj, xj: abs(yi - yj) + abs(xi - xj) <= 2, 5, 6, max_offset=2)
        both = ring | layout
        assert ring.stencil() is not None and both.pattern is None
        for custom in (ring, both, sa.layout_from_mask(both.to_dense(), 5, 6)):
            assert np.isfinite(sa.sparse_scaled_dot_product_attention(q, q, q, custom)).all()
        print("ok")
    """)
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_calls_without_gradients_skip_autograd_and_match():
    """Under no_grad, and with grad on but nothing requiring it, the op runs
    without an autograd node; a bias that alone requires grad still gets one."""
    layout = build_layout("axial", 6, 7)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 42, 8, generator=gen) for _ in range(3))
    bias = torch.randn(2, 5, 5, generator=gen)
    with torch.no_grad():
        quiet = attention(q, k, v, layout, rel_pos_bias=bias)
    plain = attention(q, k, v, layout, rel_pos_bias=bias)
    assert quiet.grad_fn is None and plain.grad_fn is None
    torch.testing.assert_close(quiet, plain, atol=0, rtol=0)
    leaf = bias.clone().requires_grad_(True)
    out = attention(q, k, v, layout, rel_pos_bias=leaf)
    assert out.grad_fn is not None
    out.sum().backward()
    both = bias.clone().requires_grad_(True)
    attention(q.clone().requires_grad_(True), k, v, layout,
                                        rel_pos_bias=both).sum().backward()
    torch.testing.assert_close(leaf.grad, both.grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("extras", ["plain", "bias+mask+dropout+stats"])
@pytest.mark.parametrize("size", [(1, 9), (9, 1), (7, 13), (16, 16)])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_half_precision_on_the_cpu_runs_the_kernels_in_float32(pattern, size, extras, dtype):
    """float16 / bfloat16 CPU calls take the float32 kernels on widened copies
    (the PyTorch path took 175x as long): output, statistics and every
    gradient are the float32 call's on the same values, rounded to the input
    dtype; gradients come back in that dtype."""
    layout = make_layout(pattern, size)
    n = layout.num_tokens
    q, k, v, bias = make_inputs(2, 3, n, 8, dtype, seed=4, bias_side=5)
    grad_out = torch.randn(2, 3, n, 8, generator=torch.Generator().manual_seed(5)).to(dtype)
    args = {}
    if extras != "plain":
        key_mask = torch.rand(2, n, generator=torch.Generator().manual_seed(6)) > 0.3
        args = dict(key_mask=key_mask, dropout_p=0.2, dropout_seed=9, return_stats=True)
    else:
        bias = None

    def call(q, k, v, bias):
        return attention(q, k, v, layout, rel_pos_bias=bias, backend="native", **args)

    def grads_of(tensors, grad):
        leaves = [t.detach().clone().requires_grad_(True) for t in tensors if t is not None]
        result = call(*leaves, *([None] * (4 - len(leaves))))
        out = result[0] if isinstance(result, tuple) else result
        return result, torch.autograd.grad(out, leaves, grad)

    half, half_grads = grads_of((q, k, v, bias), grad_out)
    wide, wide_grads = grads_of([None if t is None else t.float() for t in (q, k, v, bias)], grad_out.float())
    half_out = half[0] if isinstance(half, tuple) else half
    wide_out = wide[0] if isinstance(wide, tuple) else wide
    assert half_out.dtype == dtype and torch.equal(half_out, wide_out.to(dtype))
    if extras != "plain":
        assert half[1].dtype == torch.float32 and torch.equal(half[1], wide[1])
    for got, expected in zip(half_grads, wide_grads):
        assert got.dtype == dtype and torch.equal(got, expected.to(dtype))


@pytest.mark.parametrize("size", SIZES + [(33, 35)])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_torch_path_over_the_plan_matches_its_gather_form(pattern, size, monkeypatch):
    """The PyTorch path computes over the tile plan (batched 64 x 64 blocks)
    where the layout has one, or in strips of query rows where that plan is
    near dense; its gather form (a key row per pair) computes the same in
    float64: output, lse, statistics and the gradients of q, k, v
    and the bias, with a key mask, a pruned head and dropout. LONGFORMER at
    33 x 35 has a long row, which the full plan keeps."""
    from sparse_attention import _torch_impl

    layout = make_layout(pattern, size)
    assert layout.full_tile_plan() is not None
    n = layout.num_tokens
    q, k, v, bias = make_inputs(2, 3, n, 8, torch.float64, seed=7, bias_side=5)
    key_mask = torch.rand(2, n, generator=torch.Generator().manual_seed(8)) > 0.3
    active = torch.tensor([True, False, True])
    grad_out = torch.randn(2, 3, n, 8, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    results = []
    # over the plan, in strips of rows (the form near-dense plans take), and the gather form
    for over_plan, strip_fill in ((True, float("inf")), (True, 0.0), (False, float("inf"))):
        monkeypatch.setattr(_torch_impl, "use_tile_plan", over_plan)
        monkeypatch.setattr(_torch_impl, "strip_min_plan_fill", strip_fill)
        monkeypatch.setattr(_torch_impl, "_STRIP_ELEMENTS", 2 * 3 * n * 5)  # strips of 5 rows
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, bias)]
        out, lse, stats = attention(*leaves[:3], layout, rel_pos_bias=leaves[3], key_mask=key_mask,
                                    head_active=active, dropout_p=0.2, dropout_seed=4, return_lse=True,
                                    return_stats=True, backend="torch")
        grads = torch.autograd.grad(out, leaves, grad_out)
        results.append([out, lse, stats, *grads])
    names = ["out", "lse", "stats", "dq", "dk", "dv", "dbias"]
    for form, found in zip(("plan", "strips"), results[:2]):
        for name, got, expected in zip(names, found, results[2]):
            assert torch.equal(torch.isnan(got), torch.isnan(expected)), (form, name)
            assert torch.equal(torch.isinf(got), torch.isinf(expected)), (form, name)
            finite = torch.isfinite(expected)
            torch.testing.assert_close(got[finite], expected[finite], atol=1e-10, rtol=1e-9,
                                       msg=f"{form} {name}")


def cached_storages(layout):
    """Storages of the tensors in the layout's device cache."""
    found = set()

    def walk(x):
        if isinstance(x, torch.Tensor):
            found.add(x.untyped_storage().data_ptr())
        elif isinstance(x, (list, tuple)):
            for y in x:
                walk(y)
        elif isinstance(x, dict):
            for y in x.values():
                walk(y)

    walk(list(layout._device_cache.values()))
    return found


@pytest.mark.parametrize("form", ["strips", "plan"])
@pytest.mark.parametrize("extras", [False, True])
def test_torch_path_recomputes_scores_instead_of_keeping_them(form, extras, monkeypatch):
    """Training calls of the PyTorch path keep q, k, v and small outputs for
    backward, not their scores (the strips' B x heads x rows x N, the plan
    passes' per slot, with their gathered rows), which backward recomputes:
    a fraction of the bytes kept otherwise, and the same output, statistics
    and gradients, bit for bit."""
    from sparse_attention import _torch_impl

    layout = build_layout("random" if form == "strips" else "strided", 16, 16, attention_ratio=0.5, seed=3,
                          kernel_size=3)
    monkeypatch.setattr(_torch_impl, "strip_min_plan_fill", 0.0 if form == "strips" else float("inf"))
    n = layout.num_tokens
    q, k, v, bias = make_inputs(2, 3, n, 8, torch.float32, seed=2, bias_side=5)
    args = {}
    if extras:
        key_mask = torch.rand(2, n, generator=torch.Generator().manual_seed(4)) > 0.2
        args = dict(rel_pos_bias=bias, key_mask=key_mask, dropout_p=0.2, dropout_seed=9, return_stats=True)
    monkeypatch.setattr(_torch_impl, "_STRIP_ELEMENTS", 2 * 3 * n * 32)  # strips of 32 rows
    results = []
    for recompute in (True, False):
        monkeypatch.setattr(_torch_impl, "recompute_in_backward", recompute)
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        saved = {}

        def keep(t):  # memory held, whatever the views: per storage
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            found = attention(*leaves, layout, backend="torch", **args)
        out = found[0] if extras else found
        grads = torch.autograd.grad(out.square().sum(), leaves)
        # the layout's cached tensors (bias buckets) live on anyway: not counted
        held = sum(size for ptr, size in saved.items() if ptr not in cached_storages(layout))
        results.append((held, [out, *grads] + ([found[1]] if extras else [])))
    inputs_bytes = 3 * q.numel() * 4 + (bias.numel() * 4 if extras else 0)  # q, k, v and the table
    assert results[0][0] <= inputs_bytes and 4 * results[0][0] < results[1][0]
    if form == "strips":
        assert results[1][0] >= 2 * 3 * n * n * 4  # kept: the scores of every pair of the grid
    for got, expected in zip(results[0][1], results[1][1]):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_meta_tensors_give_shapes(pattern):
    """Meta tensors (model summaries, deferred initialisation) get outputs and
    gradients of the right shapes and dtypes, without data."""
    layout = make_layout(pattern, (7, 13))
    n = layout.num_tokens
    q, k, v = (torch.empty(2, 3, n, 8, device="meta", requires_grad=True) for _ in range(3))
    bias = torch.empty(3, 5, 5, device="meta", requires_grad=True)
    key_mask = torch.empty(2, n, dtype=torch.bool, device="meta")
    out, lse, stats = attention(q, k, v, layout, rel_pos_bias=bias, key_mask=key_mask, dropout_p=0.1,
                                return_lse=True, return_stats=True)
    assert out.device.type == "meta" and out.shape == (2, 3, n, 8) and out.dtype == torch.float32
    assert lse.shape == (2, 3, n) and stats.shape == (2, 3, n, 2)
    out.sum().backward()
    for x in (q, k, v, bias):
        assert x.grad.device.type == "meta" and x.grad.shape == x.shape


def test_torch_path_picks_its_form_by_plan_fill():
    """Near-dense plans (RANDOM at 50%, DENSE) compute in strips of rows, sparse
    ones over the plan; strips cover every row once and hold the layout's pairs."""
    from sparse_attention import _torch_impl

    # at 64 x 64 AXIAL's plan fills 3% of the grid's pairs, STRIDED's 23%, RANDOM's 100%
    for pattern, side, expected in (("random", 64, "strips"), ("dense", 20, "strips"), ("axial", 64, "plan"),
                                    ("longformer", 64, "plan"), ("strided", 64, "plan"),
                                    ("axial", 16, "strips")):  # small grids: every tile sees every key
        layout = build_layout(pattern, side, side, attention_ratio=0.5, seed=1)
        n = layout.num_tokens
        form, found = _torch_impl._layout_form(layout, torch.device("cpu"), None, n * 700)
        assert form == expected, (pattern, side)
        if form == "strips":
            rows = _torch_impl._STRIP_ELEMENTS // (n * 700)
            bounds, tensors, pair_rows = found
            assert [bound[:2] for bound in bounds] == [
                (start, min(n, start + rows)) for start in range(0, n, rows)]
            dense = torch.cat([_torch_impl._strip_mask(bound, pair_rows, tensors["col_idx"], n)
                               for bound in bounds])
            assert torch.equal(dense, torch.from_numpy(layout.to_dense()))


@pytest.mark.parametrize("seed", [0, 1, 7, 2**32 - 1, 2**32 + 5, 2**62 + 12345, 2**63 - 1])
@pytest.mark.parametrize("dropout_p", [1e-9, 0.1, 0.5, 0.999, 1 - 2**-40])
def test_dropout_mask_c_loop_equals_tensor_arithmetic(seed, dropout_p):
    """The extension's C loop (eager CPU calls) draws the mask of the tensor
    arithmetic (every other device, tracers, the reference), for pairs, every
    (row, col), and the tile plan's broadcast chunks."""
    from sparse_attention._torch_impl import dropout_keep_mask, dropout_keep_mask_torch

    gen = torch.Generator().manual_seed(seed % 1000)
    rows = torch.randint(0, 5000, (333,), generator=gen)
    cols = torch.randint(0, 5000, (333,), generator=gen)
    shapes = [(rows, cols), (rows[:37, None], cols[None]), (rows[:1, None], cols[None, :1]),
              (rows[:30].view(3, 10, 1), cols[:30].view(3, 1, 10)), (rows[:0], cols[:0])]
    for r, c in shapes:
        got = dropout_keep_mask(seed, 3, 2, r, c, dropout_p)
        expected = dropout_keep_mask_torch(seed, 3, 2, r, c, dropout_p)
        assert got.dtype == torch.bool and got.shape == expected.shape
        assert torch.equal(got, expected), (r.shape, c.shape)


def test_dropout_mask_c_entry_point_rejects_bad_arguments():
    from sparse_attention._native import C

    rows, cols = torch.arange(4), torch.arange(4)
    keep = torch.empty(1, 2, 4, dtype=torch.bool)
    C.dropout_mask(3, 0.5, rows, cols, keep)
    with pytest.raises(ValueError, match="seed"):
        C.dropout_mask(-1, 0.5, rows, cols, keep)
    with pytest.raises(TypeError, match="seed: expected an int"):
        C.dropout_mask(1.5, 0.5, rows, cols, keep)
    with pytest.raises(ValueError, match="dropout_p"):
        C.dropout_mask(3, 1.0, rows, cols, keep)
    with pytest.raises(ValueError, match="dropout_p"):
        C.dropout_mask(3, float("nan"), rows, cols, keep)
    with pytest.raises(TypeError, match="rows"):
        C.dropout_mask(3, 0.5, rows.int(), cols, keep)
    with pytest.raises(ValueError, match="cols: expected 4 entries"):
        C.dropout_mask(3, 0.5, rows, torch.arange(5), keep)
    with pytest.raises(TypeError, match="keep"):
        C.dropout_mask(3, 0.5, rows, cols, torch.empty(1, 2, 4))
    with pytest.raises(ValueError, match="keep: expected shape"):
        C.dropout_mask(3, 0.5, rows, cols, torch.empty(1, 2, 4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="keep"):
        C.dropout_mask(3, 0.5, rows, cols, torch.empty(1, 4, 2, dtype=torch.bool).transpose(1, 2))
    with pytest.raises(ValueError, match="rows"):
        C.dropout_mask(3, 0.5, torch.arange(8)[::2], cols, keep)
    with pytest.raises(TypeError):
        C.dropout_mask(3, 0.5, None, cols, keep)


@pytest.mark.parametrize("seed", [0, 1, 7, 2**32 - 1, 2**32 + 5, 2**62 + 12345, 2**63 - 1])
def test_dropout_mask_from_a_seed_tensor_equals_the_integer_seeds(seed):
    from sparse_attention._torch_impl import dropout_keep_mask

    rows = torch.randint(0, 500, (300,), generator=torch.Generator().manual_seed(1))
    cols = torch.randint(0, 500, (300,), generator=torch.Generator().manual_seed(2))
    expected = dropout_keep_mask(seed, 3, 4, rows, cols, 0.3)
    got = dropout_keep_mask(torch.tensor([seed], dtype=torch.int64), 3, 4, rows, cols, 0.3)
    assert torch.equal(got, expected)
    assert 0.2 < 1 - expected.float().mean().item() < 0.4
