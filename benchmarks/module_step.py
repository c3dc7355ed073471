"""The module's training step, with its defaults and without them.

    python benchmarks/module_step.py [--patterns axial,block,longformer,strided,random]
        [--side 64] [--batch 2] [--repeats 5]

EnhancedSparseAttention(256, 256, num_heads=8) in training mode on a
batch x 256 x side x side map: forward and backward of the whole module
(projections, norm and skip included). "defaults" is the module as built
(relative position bias, dropout 0.1, statistics on); "plain" has none of
the three. Prints a markdown table of medians, in ms, with the thread count."""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from sparse_attention import EnhancedSparseAttention  # noqa: E402


def step_ms(module, x, repeats):
    times = []
    for _ in range(repeats + 1):  # the first call builds the layout
        start = time.perf_counter()
        module(x).sum().backward()
        times.append(time.perf_counter() - start)
        module.zero_grad(set_to_none=True)
    return 1e3 * statistics.median(times[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patterns", default="axial,block,longformer,strided,random")
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    x = torch.randn(args.batch, 256, args.side, args.side)
    print(f"x {tuple(x.shape)}, 8 heads, torch threads {torch.get_num_threads()}, median of {args.repeats}\n")
    print("| pattern | defaults, ms | plain, ms |")
    print("|---|---|---|")
    for pattern in args.patterns.split(","):
        torch.manual_seed(0)
        defaults = EnhancedSparseAttention(256, 256, num_heads=8, sparsity_pattern=pattern).train()
        plain = EnhancedSparseAttention(256, 256, num_heads=8, sparsity_pattern=pattern, dropout=0.0,
                                        use_relative_pos=False, track_stats=False).train()
        print(f"| {pattern.upper()} | {step_ms(defaults, x, args.repeats):.0f} | "
              f"{step_ms(plain, x, args.repeats):.0f} |", flush=True)


if __name__ == "__main__":
    main()
