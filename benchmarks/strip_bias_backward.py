"""The strips' own bias gradient against the kernels that gave it before.

    python benchmarks/strip_bias_backward.py [--rounds 9] [--out DIR]

For stencils of offsets alone that the window kernel does not take (STRIDED
on grids of 8 to 19 a side, a 15 x 15 window, custom dilated windows and
crosses), times a float32 CPU forward+backward with a relative position bias
(B = max(1, 8192 // N), 8 heads, D=32, M=16) with the strip backward summing
the bias gradient (``_stencil.use_strip_bias_backward``) and without it (the
layout's tile plan, or the row kernels where that plan is too sparse),
alternating in one process, and prints the median of the per-round ratios
with their range. With ``--out`` it writes ``strip_bias_backward.md`` there."""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from custom_layouts import cross_11, dilated_7_by_2  # noqa: E402
from sparse_attention import _stencil, _torch_ops, build_layout, layout_from_rule  # noqa: E402
from sparse_attention import sparse_scaled_dot_product_attention as attention  # noqa: E402
from markdown_table import MarkdownTable  # noqa: E402


def cases(sides):
    for side in sides:
        yield f"strided {side}x{side}", lambda s=side: build_layout("strided", s, s)
    yield "window 15x15 on 32x32", lambda: build_layout("longformer", 32, 32, kernel_size=15, num_global_tokens=0)
    for side in (32, 64):
        yield f"dilated_7_by_2 {side}x{side}", lambda s=side: layout_from_rule(dilated_7_by_2, s, s)
    yield "cross_11 32x32", lambda: layout_from_rule(cross_11, 32, 32)


def measure(layout, rounds):
    n = layout.num_tokens
    batch = max(1, 8192 // n)
    q, k, v = (torch.randn(batch, 8, n, 32) for _ in range(3))
    bias = torch.randn(8, 33, 33)

    def timed(strips):
        _stencil.use_strip_bias_backward = strips
        leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
        start = time.perf_counter()
        attention(*leaves[:3], layout, rel_pos_bias=leaves[3]).sum().backward()
        return time.perf_counter() - start

    saved = _stencil.use_strip_bias_backward
    try:
        timed(True)
        before = _torch_ops.tiled_backwards_run
        timed(False)
        other = "tiles" if _torch_ops.tiled_backwards_run > before else "rows"
        ratios = [timed(True) / timed(False) for _ in range(rounds)]
    finally:
        _stencil.use_strip_bias_backward = saved
    return other, ratios


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--sides", default="10,14,19")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    lines = [f"strips with the bias gradient / before, float32 forward+backward with a bias, median of "
             f"{args.rounds} rounds (min-max); torch {torch.__version__}, {torch.get_num_threads()} threads", "",
             "| layout | before | strips / before | range |", "|---|---|---|---|"]
    table = MarkdownTable(lines, args.out, "strip_bias_backward.md")
    for name, build in cases(int(s) for s in args.sides.split(",")):
        other, ratios = measure(build(), args.rounds)
        table.add(f"| {name} | {other} | {statistics.median(ratios):.2f} | {min(ratios):.2f}-{max(ratios):.2f} |")
    table.write()


if __name__ == "__main__":
    main()
