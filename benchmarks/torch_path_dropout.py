"""One call of the PyTorch path with dropout: time and peak memory.

    python benchmarks/torch_path_dropout.py PATTERN SIDE {infer,train} [keep]

The PyTorch path (``backend="torch"``: ``use_cuda_kernel=False``, devices
without our kernels, double backward, torch.func) on a SIDE x SIDE grid,
B=2, 8 heads, D=32, float32, dropout 0.1 with the seed drawn per call (as the
module's training does). ``infer`` runs the forward under no_grad, ``train``
forward and backward. Prints the call's wall time and how far it raised the
process's peak resident memory over where it stood after a warm-up call
(layout caches built; noisy: freed blocks the C allocator keeps count until
reused) and, in training, the bytes autograd keeps for backward (exact, per
storage). Run it once per process: the peak only grows.
``keep``: the strips form keeps its scores for backward instead of
recomputing them (``_torch_impl.recompute_in_backward = False``)."""

import gc
import os
import resource
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from sparse_attention import _torch_impl, build_layout  # noqa: E402
from sparse_attention import sparse_scaled_dot_product_attention as attention  # noqa: E402


def main():
    if len(sys.argv) not in (4, 5) or sys.argv[3] not in ("infer", "train") or sys.argv[4:] not in ([], ["keep"]):
        sys.exit(__doc__)
    pattern, side, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    _torch_impl.recompute_in_backward = sys.argv[4:] != ["keep"]
    layout = build_layout(pattern, side, side, attention_ratio=0.5, seed=1, kernel_size=7)
    n = layout.num_tokens
    q, k, v = (torch.randn(2, 8, n, 32, requires_grad=True) for _ in range(3))
    with torch.no_grad():
        attention(q, k, v, layout, backend="torch")  # layout caches
    gc.collect()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    saved = {}

    def hold(t):  # what autograd keeps for backward, per storage
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    start = time.time()
    if mode == "train":
        with torch.autograd.graph.saved_tensors_hooks(hold, lambda t: t):
            out = attention(q, k, v, layout, backend="torch", dropout_p=0.1)
        out.sum().backward()
    else:
        with torch.no_grad():
            attention(q, k, v, layout, backend="torch", dropout_p=0.1)
    seconds = time.time() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kept = f", saved for backward {sum(saved.values()) / 2**20:.1f} MiB" if mode == "train" else ""
    print(f"{pattern} {side} {mode}{' keep' if sys.argv[4:] else ''}: peak RSS growth {(peak - base) / 1024:.0f} MiB"
          f"{kept}, {seconds:.2f} s; B*H*N^2 floats would be {2 * 8 * n * n * 4 / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
