"""Infinite scores on every CPU kernel and the PyTorch path.

A key with an infinite element gives +inf scores to some queries and -inf to
others. Softmax over a row with a +inf score holds exp(inf - inf): the row is
NaN in PyTorch, and must be NaN here too (output, lse, statistics, and the
query's gradient), never the zeros and -inf lse of a row without keys. Rows
where the key scores -inf just give it no weight."""

import pytest
import torch

from reference import call_with, reference_attention
from sparse_attention import _stencil, _tiles, build_layout
from sparse_attention import sparse_scaled_dot_product_attention as attention

PATTERNS = ["dense", "axial", "block", "longformer", "strided", "random"]
SIZES = [(1, 9), (9, 1), (7, 13), (16, 16), (40, 40)]


def run(kernel, *args, **kwargs):
    """The op on one kernel family: the row kernel, the tiles (every plan,
    however sparse), the default choice (stencils and windows where the
    layout has them), or the PyTorch path."""
    if kernel == "torch":
        return attention(*args, backend="torch", **kwargs)
    if kernel == "auto":
        return attention(*args, **kwargs)
    no_stencil = lambda: call_with(_stencil, "use_stencil_cpu_kernel", False, attention, *args, **kwargs)
    if kernel == "rows":
        return call_with(_tiles, "use_tiled_cpu_kernel", False, no_stencil)
    return call_with(_tiles, "CPU_MIN_FILL", 0.0, no_stencil)


def poisoned_inputs(n, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, n, 16, generator=gen, dtype=dtype) for _ in range(3))
    k[0, 1, min(5, n - 1), 3] = float("inf")
    k[0, 0, n // 2, 1] = float("-inf")
    return q, k, v


@pytest.mark.parametrize("kernel", ["rows", "tiles", "auto", "torch"])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_a_plus_inf_score_makes_its_row_nan(pattern, size, kernel):
    layout = build_layout(pattern, *size)
    for dtype in (torch.float32, torch.float64):
        q, k, v = poisoned_inputs(layout.num_tokens, dtype, seed=size[0] * 100 + size[1])
        expected = reference_attention(q, k, v, layout)[0]
        nan_rows = torch.isnan(expected).any(-1)
        assert nan_rows.any() and not nan_rows.all()  # the case is exercised both ways
        query = q.clone().requires_grad_(True)
        out, lse, stats = run(kernel, query, k, v, layout, return_lse=True, return_stats=True)
        assert torch.equal(torch.isnan(out).all(-1), nan_rows)
        assert torch.equal(torch.isnan(out).any(-1), nan_rows)
        assert torch.equal(torch.isnan(lse), nan_rows)
        assert torch.equal(torch.isnan(stats).all(-1), nan_rows)
        assert torch.isfinite(lse[~nan_rows]).all()
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(out[~nan_rows].double(), expected[~nan_rows], rtol=tol, atol=tol)
        out.backward(torch.ones_like(out))
        assert torch.isnan(query.grad).any(-1)[nan_rows].all()


@pytest.mark.parametrize("kernel", ["rows", "tiles", "auto", "torch"])
@pytest.mark.parametrize("pattern", ["axial", "longformer", "random"])
def test_a_masked_infinite_key_leaves_every_row_finite(pattern, kernel):
    layout = build_layout(pattern, 16, 16)
    q, k, v = poisoned_inputs(layout.num_tokens, torch.float32, seed=3)
    key_mask = torch.ones(1, layout.num_tokens, dtype=torch.bool)
    key_mask[0, 5] = False
    key_mask[0, layout.num_tokens // 2] = False
    out, lse = run(kernel, q, k, v, layout, key_mask=key_mask, return_lse=True)
    expected, expected_lse, _ = reference_attention(q, k, v, layout, key_mask=key_mask)
    assert not torch.isnan(expected).any()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), expected_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", ["rows", "tiles", "auto", "torch"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_infinite_cells_of_the_bias_table(pattern, kernel):
    """A +inf cell of the relative position table makes NaN exactly the rows
    whose kept keys sit at its offset; -inf cells drop their offsets' keys
    (the tiles' shift from raw scores must not take them for a bound)."""
    layout = build_layout(pattern, 16, 16)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, layout.num_tokens, 16, generator=gen) for _ in range(3))
    bias = torch.randn(2, 7, 7, generator=gen)
    bias[1, 3, 4] = float("inf")
    bias[0, 2, 3] = bias[1, 6, 6] = float("-inf")
    expected, expected_lse, _ = reference_attention(q, k, v, layout, bias=bias)
    nan_rows = torch.isnan(expected).any(-1)
    assert nan_rows.any() and not nan_rows.all()
    query = q.clone().requires_grad_(True)
    out, lse = run(kernel, query, k, v, layout, rel_pos_bias=bias, return_lse=True)
    assert torch.equal(torch.isnan(out).all(-1), nan_rows)
    assert torch.equal(torch.isnan(out).any(-1), nan_rows)
    assert torch.equal(torch.isnan(lse), nan_rows)
    torch.testing.assert_close(out[~nan_rows].double(), expected[~nan_rows], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse[~nan_rows].double(), expected_lse[~nan_rows], rtol=1e-5, atol=1e-5)
    out.backward(torch.ones_like(out))
    assert torch.isnan(query.grad).any(-1)[nan_rows].all()
    assert torch.isfinite(query.grad[~nan_rows]).all()
