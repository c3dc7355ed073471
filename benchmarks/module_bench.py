"""Module-level costs: statistics tracking overhead and pruned heads.

    python benchmarks/module_bench.py [--pattern axial] [--side 32] [--repeats 15]

Times EnhancedSparseAttention forward passes (eval mode) with statistics on and
off, interleaved so that machine noise hits both alike, and with 8, 4 and 2
heads kept; prints medians and ratios."""

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from sparse_attention import EnhancedSparseAttention, sparse_scaled_dot_product_attention  # noqa: E402
from sparse_attention.bench import timed as median_time  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pattern", default="axial")
    parser.add_argument("--side", type=int, default=32)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    module = EnhancedSparseAttention(args.channels, args.channels, num_heads=8,
                                     sparsity_pattern=args.pattern).eval()
    x = torch.randn(args.batch, args.channels, args.side, args.side)
    print(f"{args.pattern}, x {tuple(x.shape)}, 8 heads, torch threads {torch.get_num_threads()}")

    on, off = [], []
    with torch.no_grad():
        for _ in range(args.repeats):
            module.track_stats = True
            on.append(median_time(lambda: module(x), 3))
            module.track_stats = False
            off.append(median_time(lambda: module(x), 3))
    t_on, t_off = statistics.median(on), statistics.median(off)
    print(f"module forward: statistics on {t_on * 1e3:.2f} ms, off {t_off * 1e3:.2f} ms, "
          f"overhead {100 * (t_on / t_off - 1):+.1f}%")

    layout = module.layout_for(args.side, args.side)
    q = torch.randn(args.batch, 8, args.side * args.side, args.channels // 8)
    op_on, op_off = [], []
    for _ in range(args.repeats):
        op_on.append(median_time(lambda: sparse_scaled_dot_product_attention(q, q, q, layout, return_stats=True), 3))
        op_off.append(median_time(lambda: sparse_scaled_dot_product_attention(q, q, q, layout), 3))
    print(f"op forward: statistics on {statistics.median(op_on) * 1e3:.2f} ms, off "
          f"{statistics.median(op_off) * 1e3:.2f} ms, overhead "
          f"{100 * (statistics.median(op_on) / statistics.median(op_off) - 1):+.1f}%")

    module.track_stats = False
    for kept in (8, 4, 2):
        with torch.no_grad():
            module.head_mask.fill_(True)
        module.prune_heads(range(kept, 8))
        active = torch.zeros(8, dtype=torch.bool)
        active[:kept] = True
        with torch.no_grad():
            t_module = median_time(lambda: module(x), args.repeats)
        t_op = median_time(lambda: sparse_scaled_dot_product_attention(q, q, q, layout, head_active=active),
                           args.repeats)
        print(f"{kept} heads kept: module forward {t_module * 1e3:.2f} ms, attention op {t_op * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
