"""One call of the PyTorch path with dropout: time and peak memory.

    python benchmarks/torch_path_dropout.py PATTERN SIDE {infer,train}

The PyTorch path (``backend="torch"``: ``use_cuda_kernel=False``, devices
without our kernels, double backward, torch.func) on a SIDE x SIDE grid,
B=2, 8 heads, D=32, float32, dropout 0.1 with the seed drawn per call (as the
module's training does). ``infer`` runs the forward under no_grad, ``train``
forward and backward. Prints the call's wall time and how far it raised the
process's peak resident memory over where it stood after a warm-up call
(layout caches built). Run it once per process: the peak only grows."""

import gc
import os
import resource
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from sparse_attention import build_layout  # noqa: E402
from sparse_attention import sparse_scaled_dot_product_attention as attention  # noqa: E402


def main():
    if len(sys.argv) != 4 or sys.argv[3] not in ("infer", "train"):
        sys.exit(__doc__)
    pattern, side, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    layout = build_layout(pattern, side, side, attention_ratio=0.5, seed=1, kernel_size=7)
    n = layout.num_tokens
    q, k, v = (torch.randn(2, 8, n, 32, requires_grad=True) for _ in range(3))
    with torch.no_grad():
        attention(q, k, v, layout, backend="torch")  # layout caches
    gc.collect()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.time()
    if mode == "train":
        attention(q, k, v, layout, backend="torch", dropout_p=0.1).sum().backward()
    else:
        with torch.no_grad():
            attention(q, k, v, layout, backend="torch", dropout_p=0.1)
    seconds = time.time() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{pattern} {side} {mode}: peak RSS growth {(peak - base) / 1024:.0f} MiB, {seconds:.2f} s; "
          f"B*H*N^2 floats would be {2 * 8 * n * n * 4 / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
