"""NATTEN's neighbourhood (a window clamped to the grid) on the CPU.

    python benchmarks/clamped_window.py [--sides 12,14,16,24,32,64] [--kernels 7] [--rounds 7] [--out DIR]

Every query attends a whole k x k box of keys, moved inward at the grid's
edges. This times the float32 CPU op on that layout three ways, alternating
with dense ``scaled_dot_product_attention`` on the same tensors in every
round: the window kernel with the clamped stencil (what runs now), the same
layout built with ``_stencil.use_clamped_window`` off (what ran before: the
clipped window on the window kernel plus a tile pass for the pairs beyond it
where those are few enough, else the tiles), and the clipped k x k window
(LONGFORMER without a global token, fewer pairs at the edges) as the floor.
Forward (no_grad), forward+backward, and forward+backward with a relative
position bias (M = 7, whose gradient the window kernel sums per anchor of the
shifted blocks). Prints the median over rounds of ours / dense; B = max(1,
8192 // N), 8 heads, D=32. With ``--out`` it writes ``clamped_window.md``."""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from sparse_attention import _stencil, build_layout, neighborhood_layout  # noqa: E402
from sparse_attention import sparse_scaled_dot_product_attention as attention  # noqa: E402
from markdown_table import MarkdownTable  # noqa: E402

HEADS, HEAD_DIM, ROWS, BIAS_SIDE = 8, 32, 8192, 15


def seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def layouts(side, kernel):
    clamped = neighborhood_layout(side, side, kernel)
    _stencil.use_clamped_window = False
    try:
        before = neighborhood_layout(side, side, kernel)
        before.stencil(), before.stencil_split()  # built now, with the switch off
    finally:
        _stencil.use_clamped_window = True
    clipped = build_layout("longformer", side, side, kernel_size=kernel, num_global_tokens=0)
    return {"clamped": clamped, "before": before, "clipped": clipped}


def measure(side, kernel, rounds):
    ways = layouts(side, kernel)
    n = side * side
    batch = max(1, ROWS // n)
    gen = torch.Generator().manual_seed(side)
    q, k, v = (torch.randn(batch, HEADS, n, HEAD_DIM, generator=gen) for _ in range(3))
    bias = torch.randn(HEADS, BIAS_SIDE, BIAS_SIDE, generator=gen)

    def steps(run):
        def forward():
            with torch.no_grad():
                run(q, k, v, None)

        def training():
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            run(*leaves, None).sum().backward()

        def training_biased():
            leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
            run(*leaves).sum().backward()
        return forward, training, training_biased

    ours = {name: steps(lambda q, k, v, b, layout=layout: attention(q, k, v, layout, rel_pos_bias=b))
            for name, layout in ways.items()}
    dense = steps(lambda q, k, v, b: F.scaled_dot_product_attention(q, k, v))
    for fns in list(ours.values()) + [dense]:  # warm: plans and caches
        for fn in fns:
            fn()
    ratios = {(name, s): [] for name in ways for s in range(3)}
    for _ in range(rounds):
        for s in range(3):
            base = seconds(dense[s])
            for name in ways:
                ratios[name, s].append(seconds(ours[name][s]) / base)
    cells = []
    for name in ways:
        cells.append(" / ".join(f"{statistics.median(ratios[name, s]):.2f}" for s in range(3)))
    speedup = " / ".join(f"{statistics.median(b / a for a, b in zip(ratios['clamped', s], ratios['before', s])):.2f}"
                         for s in range(3))
    return (f"| {side}x{side} | {kernel} | {ways['clamped'].density:.4f} | {' | '.join(cells)} | {speedup} "
            f"| {_stencil.cpu_route_name(ways['before'])} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", default="12,14,16,24,32,64")
    parser.add_argument("--kernels", default="7")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    lines = [f"ours / dense SDPA, forward / forward+backward / forward+backward with a bias, median of {args.rounds} "
             f"rounds; B = max(1, {ROWS} // N), {HEADS} heads, D={HEAD_DIM}, float32, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads; speedup = before / clamped, per round",
             "",
             "| grid | k | density | clamped window | before | clipped window (floor) | speedup | before ran |",
             "|---|---|---|---|---|---|---|---|"]
    table = MarkdownTable(lines, args.out, "clamped_window.md")
    for kernel in (int(x) for x in args.kernels.split(",")):
        for side in (int(x) for x in args.sides.split(",")):
            if side < kernel:
                continue
            table.add(measure(side, kernel, args.rounds))
    table.write()


if __name__ == "__main__":
    main()
