"""The op on small maps (a ViT's 14 x 14 tokens) against dense SDPA, CPU.

    python benchmarks/small_maps.py [--side 14] [--batch 8] [--rounds 7]
        [--patterns axial,longformer,block,strided,random]

Our op (its default kernels, float32) and dense
``torch.nn.functional.scaled_dot_product_attention`` on the same
batch x 12 heads x side^2 x 64 tensors, forward under no_grad and
forward+backward, alternating within each round; prints per pattern the
median over rounds of (our time / dense time), our median in ms, the kernels
the CPU takes and the layout's density."""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from sparse_attention import _stencil, build_layout  # noqa: E402
from sparse_attention import sparse_scaled_dot_product_attention as attention  # noqa: E402

HEADS, HEAD_DIM = 12, 64


def seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def timed_pair(ours, dense, rounds):
    ratios, times = [], []
    for _ in range(rounds):
        mine, theirs = seconds(ours), seconds(dense)
        ratios.append(mine / theirs)
        times.append(mine)
    return statistics.median(ratios), statistics.median(times) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=14)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--patterns", default="axial,longformer,block,strided,random")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{args.batch} x {HEADS} heads x {args.side}x{args.side} tokens x D={HEAD_DIM}, float32, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} rounds of ours / dense SDPA")
    print("| pattern | density | CPU kernels | forward | ms | forward+backward | ms |")
    print("|---|---|---|---|---|---|---|")
    for pattern in args.patterns.split(","):
        layout = build_layout(pattern, args.side, args.side)
        q, k, v = (torch.randn(args.batch, HEADS, layout.num_tokens, HEAD_DIM) for _ in range(3))

        def step(op, train):
            def run():
                leaves = [t.clone().requires_grad_(train) for t in (q, k, v)]
                out = op(*leaves)
                if train:
                    out.sum().backward()
            return run

        ours = lambda *t: attention(*t, layout)  # noqa: E731
        step(ours, True)()  # builds the layout's plans
        forward = timed_pair(step(ours, False), step(F.scaled_dot_product_attention, False), args.rounds)
        training = timed_pair(step(ours, True), step(F.scaled_dot_product_attention, True), args.rounds)
        kernels = _stencil.cpu_kernel_choice(layout) or "rows"
        print(f"| {pattern} | {layout.density:.3f} | {kernels} | {forward[0]:.2f}x | {forward[1]:.1f} "
              f"| {training[0]:.2f}x | {training[1]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
