"""Near-dense custom windows on the CPU: the window kernel or the tiles?

    python benchmarks/window_or_tiles.py [--cases 7:7,9:7,13:11] [--rounds 7] [--out DIR]

A neighbourhood (``neighborhood_layout``) whose box covers much of a small
grid (NAT's last stage: 7 x 7 tokens, a 7 x 7 kernel) runs on the window
kernel as a stencil or a clamped stencil; the tiles may run it faster. For
each side:kernel case this times the float32 op forward+backward with the
stencil, tile and row kernels forced in turn (benchmarks/custom_layouts.py's
``forced``), alternating with dense ``scaled_dot_product_attention`` on the
same tensors, and prints the median of ours / dense per family beside the
layout's CPU tile plan fill (``cpu_fill``) and what ``cpu_kernel_choice``
takes. B = max(1, 8192 // N), 8 heads, D=32. With ``--out`` it writes
``window_or_tiles.md``."""

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from custom_layouts import forced, seconds  # noqa: E402

from sparse_attention import _stencil, neighborhood_layout  # noqa: E402
from sparse_attention import sparse_scaled_dot_product_attention as attention  # noqa: E402
from markdown_table import MarkdownTable  # noqa: E402

FAMILIES = ("stencil", "tiles", "rows")
CASES = "3:3,5:5,6:5,7:7,8:7,9:7,10:7,11:9,12:11,13:11,14:13"


def measure(side, kernel, rounds):
    layout = neighborhood_layout(side, side, kernel)
    n = side * side
    batch = max(1, 8192 // n)
    q, k, v = (torch.randn(batch, 8, n, 32) for _ in range(3))

    def training(run):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        run(*leaves).sum().backward()

    def ours():
        training(lambda *t: attention(*t, layout))

    for family in FAMILIES:  # warm: plans and caches
        forced(family, ours)
    ratios = {family: [] for family in FAMILIES}
    for _ in range(rounds):
        base = seconds(lambda: training(F.scaled_dot_product_attention))
        for family in FAMILIES:
            ratios[family].append(forced(family, lambda: seconds(ours)) / base)
    cells = " | ".join(f"{statistics.median(ratios[f]):.2f}" for f in FAMILIES)
    stencil = layout.stencil()
    kind = "clamped" if stencil is not None and _stencil.is_clamped(stencil) else "stencil"
    return (f"| {side}x{side} | {kernel} | {layout.density:.2f} | {layout.cpu_tile_plan().cpu_fill:.2f} | {kind} "
            f"| {cells} | {_stencil.cpu_kernel_choice(layout)} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=CASES)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    lines = [f"ours / dense SDPA forward+backward, median of {args.rounds} rounds; B = max(1, 8192 // N), 8 heads, "
             f"D=32, float32, torch {torch.__version__}, {torch.get_num_threads()} threads",
             "",
             "| grid | k | density | cpu_fill | as | stencil | tiles | rows | rule takes |",
             "|---|---|---|---|---|---|---|---|---|"]
    table = MarkdownTable(lines, args.out, "window_or_tiles.md")
    for case in args.cases.split(","):
        side, kernel = (int(x) for x in case.split(":"))
        table.add(measure(side, kernel, args.rounds))
    table.write()


if __name__ == "__main__":
    main()
