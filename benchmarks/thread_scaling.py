"""Two threads against one for our CPU kernels, op level, 64x64 tokens.

    python benchmarks/thread_scaling.py block axial longformer strided

B=2, 8 heads, D=32, fp32; forward and forward+backward. Each round times
both thread counts back to back (median of 3 calls each, their order
alternating from round to round, so that neither always runs with the
inputs warm from the other) and takes their ratio; printed: the median of
ROUNDS such ratios, and their quartiles in brackets. The
forward+backward is the benchmark's training step
(sparse_attention.bench): the output's backward with a gradient of ones,
then the inputs' gradients dropped, as zero_grad() does. Left in place, each
call would add its gradients to the last ones: three 8 MB adds that torch
runs in about 2 ms whatever the thread count."""

import statistics
import sys
import time

import torch

import sparse_attention as sa

ROUNDS = 15


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(patterns):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 8, 4096, 32, requires_grad=True) for _ in range(3))
    for pattern in patterns:
        layout = sa.build_layout(pattern, 64, 64)

        def forward():
            with torch.no_grad():
                sa.sparse_scaled_dot_product_attention(q, k, v, layout)

        def forward_backward():
            out = sa.sparse_scaled_dot_product_attention(q, k, v, layout)
            out.backward(torch.ones_like(out))
            for leaf in (q, k, v):
                leaf.grad = None

        speedups = {}
        for name, fn in (("fwd", forward), ("fwd+bwd", forward_backward)):
            ratios = []
            for round_ in range(ROUNDS):
                times = {}
                for threads in ((1, 2) if round_ % 2 else (2, 1)):
                    torch.set_num_threads(threads)
                    sa.set_num_threads(threads)
                    fn()  # warm-up at this thread count
                    times[threads] = statistics.median(timed(fn) for _ in range(3))
                # a ratio per round, both counts timed back to back, so that the
                # machine's drift between rounds cancels
                ratios.append(times[1] / times[2])
            quartiles = statistics.quantiles(ratios, n=4)
            speedups[name] = f"{statistics.median(ratios):.2f}x ({quartiles[0]:.2f}-{quartiles[2]:.2f})"
        print(f"{pattern}: 2 threads vs 1: fwd {speedups['fwd']}, fwd+bwd {speedups['fwd+bwd']}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["block", "axial", "longformer", "strided"])
