"""What a relative position bias costs the gather kernels' forward+backward.

    python benchmarks/gather_bias.py [--side 128] [--ratio 0.05] [--dim 32] [--heads 4] [--rounds 3]

RANDOM at the ratio (its rows run on the gather kernels), float32, B=1,
with and without a (2 x 16 + 1)^2 bias table per head, alternating within
each round; prints the medians and the process's peak resident memory,
which the per-pair score gradients of the bias used to dominate."""

import argparse
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from sparse_attention import build_layout  # noqa: E402
from sparse_attention import sparse_scaled_dot_product_attention as attention  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=128)
    parser.add_argument("--ratio", type=float, default=0.05)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.side < 1 or args.dim < 1 or args.heads < 1 or args.rounds < 1 or not 0 < args.ratio <= 1:
        raise SystemExit("--side, --dim, --heads and --rounds must be positive, --ratio in (0, 1]")
    layout = build_layout("random", args.side, args.side, attention_ratio=args.ratio, seed=0)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, args.heads, layout.num_tokens, args.dim, generator=gen) for _ in range(3))
    bias = torch.randn(args.heads, 33, 33, generator=gen)

    def step(with_bias):
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v, bias)]
        start = time.perf_counter()
        attention(*leaves[:3], layout, rel_pos_bias=leaves[3] if with_bias else None).sum().backward()
        return time.perf_counter() - start

    for with_bias in (False, True):  # warm: plans and caches
        step(with_bias)
    times = {False: [], True: []}
    for _ in range(args.rounds):
        for with_bias in (False, True):
            times[with_bias].append(step(with_bias))
    print(f"RANDOM {args.ratio} at {args.side}x{args.side}, D={args.dim}, {args.heads} heads, nnz {layout.nnz}: "
          f"forward+backward {statistics.median(times[False]) * 1e3:.0f} ms without a bias, "
          f"{statistics.median(times[True]) * 1e3:.0f} ms with one; peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MB")


if __name__ == "__main__":
    main()
