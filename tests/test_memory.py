"""Memory stays O(B * heads * N * D + nnz): never an N x N matrix."""

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import json, resource, torch
    from sparse_attention import build_layout, sparse_scaled_dot_product_attention as attention
    layout = build_layout("axial", 128, 128)
    q, k, v = (torch.randn(1, 2, 128 * 128, 32, requires_grad=True) for _ in range(3))
    bias = torch.zeros(2, 65, 65, requires_grad=True)
    layout.torch_tensors("cpu", 32)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = attention(q, k, v, layout, rel_pos_bias=bias)
    out.sum().backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_increase_kib": after - before, "nnz": layout.nnz,
                      "finite": bool(torch.isfinite(q.grad).all())}))
""")


def test_axial_128x128_forward_backward_far_below_n_squared():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                            env=env, timeout=300, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    n_by_n_fp32_kib = (128 * 128) ** 2 * 4 // 1024  # 1 GiB
    assert report["finite"]
    # the op's own peak: outputs, gradients, lse, and the per-pair score
    # gradients of the bias (B * heads * nnz floats, 33 MiB here)
    assert report["peak_increase_kib"] < n_by_n_fp32_kib / 10, report


def test_a_layout_larger_than_the_machine_raises_before_it_is_written():
    """RANDOM and DENSE on a million tokens hold about 10**12 pairs (8 TB of
    indices): a MemoryError naming the pattern and sizes, not a process that
    the system kills while it fills the arrays."""
    import pytest
    import torch

    from sparse_attention import EnhancedSparseAttention, SparsityPattern, build_layout

    with pytest.raises(MemoryError, match=r"RANDOM layout of a 1000 x 1000 grid holds 500000000000 pairs"):
        build_layout("random", 1000, 1000, attention_ratio=0.5)
    with pytest.raises(MemoryError, match=r"DENSE layout .* 1000000000000 pairs; .* need 8000\.0 GB"):
        build_layout("dense", 1000, 1000)
    module = EnhancedSparseAttention(8, 8, num_heads=2, sparsity_pattern=SparsityPattern.RANDOM)
    with pytest.raises(MemoryError, match="lower attention_ratio"):
        module(torch.randn(1, 8, 1000, 1000))
    # a layout that fits still builds after the refusal
    assert build_layout("random", 8, 8, attention_ratio=0.5).nnz == 64 * 32
