"""Row kernels against tile kernels on the CPU, per layout, with each plan's fill.

    python benchmarks/cpu_kernel_choice.py [--rounds 5] [--head-dim 64] [--heads 12] [--out DIR] [SPEC ...]

SPEC is PATTERN:SIDE[:knob=value...], e.g. ``random:32:attention_ratio=0.1``.
For every layout this times the float32 CPU op (12 heads, D=64 unless
``--heads`` and ``--head-dim`` say otherwise, a batch that
makes about 1568 query rows per head, as 8 images of 14 x 14) on the row
kernels and on the tile kernels, stencils off, forward under no_grad and
forward+backward, alternating within each round, and prints the median over
rounds of (tiles / rows) next to the CPU plan's ``fill`` (share of its
64 x 64 slots) and ``cpu_fill`` (share of the slots the CPU kernels compute). The
last column says which kernels ``_stencil.cpu_kernel_choice`` takes for the
layout with stencils off (rule: tiles from ``_tiles.cpu_min_fill``), marked
"(slower)" where the other kernels were more than 5% faster forward+backward.
With ``--out`` it writes ``cpu_kernel_choice.md`` there."""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from sparse_attention import _stencil, _tiles, build_layout  # noqa: E402
from sparse_attention import sparse_scaled_dot_product_attention as attention  # noqa: E402
from markdown_table import MarkdownTable  # noqa: E402

DEFAULT_SPECS = [
    "axial:4", "axial:8", "axial:14", "axial:24", "axial:32",
    "random:4", "random:14", "random:32:attention_ratio=0.1", "random:32:attention_ratio=0.05",
    "random:64:attention_ratio=0.02",
    "block:14:block_size=3", "block:32:block_size=5",
    "longformer:14", "longformer:32", "longformer:64",
    "strided:14", "strided:32", "strided:64",
]
HEADS, HEAD_DIM, ROWS_PER_HEAD = 12, 64, 8 * 196


def parse_spec(spec):
    pattern, side, *knobs = spec.split(":")
    values = {}
    for knob in knobs:
        name, value = knob.split("=")
        values[name] = float(value) if "." in value else int(value)
    return pattern, int(side), values


def seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_on(kernels, fn):
    """fn() with the CPU's choice forced to ``kernels`` ("rows" or "tiles")."""
    saved = _tiles.CPU_MIN_FILL, _stencil.use_stencil_cpu_kernel
    _tiles.CPU_MIN_FILL = 0.0 if kernels == "tiles" else float("inf")
    _stencil.use_stencil_cpu_kernel = False
    try:
        return fn()
    finally:
        _tiles.CPU_MIN_FILL, _stencil.use_stencil_cpu_kernel = saved


def measure(spec, rounds, head_dim=HEAD_DIM, heads=HEADS):
    pattern, side, knobs = parse_spec(spec)
    layout = build_layout(pattern, side, side, **knobs)
    plan = layout.cpu_tile_plan()
    batch = max(1, ROWS_PER_HEAD // layout.num_tokens)
    q, k, v = (torch.randn(batch, heads, layout.num_tokens, head_dim) for _ in range(3))

    def forward():
        with torch.no_grad():
            attention(q, k, v, layout)

    def training():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        attention(*leaves, layout).sum().backward()

    times = {(kernels, step): [] for kernels in ("rows", "tiles") for step in ("forward", "training")}
    for kernels in ("rows", "tiles"):  # warm: caches and plans
        run_on(kernels, training)
    for _ in range(rounds):
        for kernels in ("rows", "tiles"):
            times[kernels, "forward"].append(run_on(kernels, lambda: seconds(forward)))
            times[kernels, "training"].append(run_on(kernels, lambda: seconds(training)))
    ratio = {step: statistics.median(t / r for t, r in zip(times["tiles", step], times["rows", step]))
             for step in ("forward", "training")}
    saved = _stencil.use_stencil_cpu_kernel
    _stencil.use_stencil_cpu_kernel = False
    try:
        chosen = "tiles" if _stencil.cpu_kernel_choice(layout, head_dim) == "tiles" else "rows"
    finally:
        _stencil.use_stencil_cpu_kernel = saved
    # within 5% either way is a tie
    slower = ratio["training"] > 1.05 if chosen == "tiles" else ratio["training"] < 0.95
    return (f"| {spec} | {batch} | {plan.fill:.3f} | {plan.cpu_fill:.3f} | {ratio['forward']:.2f} "
            f"| {ratio['training']:.2f} | {statistics.median(times['rows', 'training']) * 1e3:.1f} "
            f"| {chosen}{' (slower)' if slower else ''} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="*", default=DEFAULT_SPECS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--head-dim", type=int, default=HEAD_DIM)
    parser.add_argument("--heads", type=int, default=HEADS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    lines = [f"CPU_MIN_FILL = {_tiles.CPU_MIN_FILL} (x {_tiles.GATHER_FILL_FACTOR} on the gather kernels); "
             f"{args.heads} heads, D={args.head_dim}, float32, "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.rounds} rounds",
             "",
             "| layout | batch | fill | cpu_fill | tiles/rows forward | tiles/rows fwd+bwd | rows fwd+bwd ms | rule takes |",
             "|---|---|---|---|---|---|---|---|"]
    table = MarkdownTable(lines, args.out, "cpu_kernel_choice.md")
    for spec in args.specs:
        table.add(measure(spec, args.rounds, args.head_dim, args.heads))
    table.write()


if __name__ == "__main__":
    main()
