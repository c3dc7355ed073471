"""Custom layouts on the CPU: each kernel family against dense SDPA.

    python benchmarks/custom_layouts.py [--sides 32,64] [--rounds 5] [--out DIR]

For a few patterns of one's own (built with ``layout_from_rule``), this times
the float32 CPU op forward (no_grad) and forward+backward on every kernel
family that can take the layout: the stencil kernels (the window kernel where
C takes the offsets, else the strip kernel; for a window with more pairs in
some rows, the window kernel and then the tiles for the rest), the tile
kernels and the row kernels, each forced in turn, alternating with dense
``scaled_dot_product_attention`` on the same tensors within every round. It
prints the median over rounds of (ours / dense) per family and the family
``_stencil.cpu_kernel_choice`` takes. B = max(1, 8192 // N), 8 heads, D=32.
With ``--out`` it writes ``custom_layouts.md`` there."""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from sparse_attention import _stencil, _tiles, layout_from_rule  # noqa: E402
from sparse_attention import sparse_scaled_dot_product_attention as attention  # noqa: E402
from markdown_table import MarkdownTable  # noqa: E402

HEADS, HEAD_DIM, ROWS = 8, 32, 8192


def neighborhood_7(yi, xi, yj, xj):
    """A 7 x 7 window clipped at the borders (LONGFORMER without a global token)."""
    return (abs(yi - yj) <= 3) & (abs(xi - xj) <= 3)


def dilated_7_by_2(yi, xi, yj, xj):
    """A 7 x 7 window over every other row and column (a 13 x 13 reach)."""
    dy, dx = yi - yj, xi - xj
    return (abs(dy) <= 6) & (abs(dx) <= 6) & (dy % 2 == 0) & (dx % 2 == 0)


def causal_window_7(yi, xi, yj, xj):
    """The rows above and the query's own row of a 7 x 7 window."""
    return (yj <= yi) & (abs(yi - yj) <= 3) & (abs(xi - xj) <= 3)


def cross_11(yi, xi, yj, xj):
    """The query's row and column, 5 tokens either way."""
    return ((yi == yj) & (abs(xi - xj) <= 5)) | ((xi == xj) & (abs(yi - yj) <= 5))


def axial_rule(yi, xi, yj, xj):
    """AXIAL's rule, as a custom pattern (a stencil of 2H + 2W - 3 offsets)."""
    return (yi == yj) | (xi == xj)


def window_15(yi, xi, yj, xj):
    """A 15 x 15 window, past the window kernel's 13 x 13 box."""
    return (abs(yi - yj) <= 7) & (abs(xi - xj) <= 7)


def checkerboard_16(yi, xi, yj, xj):
    """Keys of the query's colour in its 16 x 16 block (not a stencil: blocks do not shift)."""
    return (yi // 16 == yj // 16) & (xi // 16 == xj // 16) & ((yi + xi) % 2 == (yj + xj) % 2)


def swin_window_7(yi, xi, yj, xj):
    """Swin's non-overlapping 7 x 7 windows (BLOCK with block_size 7, as a
    rule so that earlier builds can time it too; not in RULES): they
    straddle 8 x 8 tiles."""
    return (yi // 7 == yj // 7) & (xi // 7 == xj // 7)


def _strided_neighborhood(stride):
    """NATTEN's 7 x 7 neighbourhood with ``stride`` (runs of ``stride``
    queries share their middle member's window) as a builder over a rule, so
    that earlier builds can time it too; not in RULES."""
    def build(height, width):
        def starts(coords, size):
            leader = np.minimum(coords // stride * stride + stride // 2, size - 1)
            return np.clip(leader - 3, 0, size - 7)

        def rule(yi, xi, yj, xj):
            top, left = starts(yi, height), starts(xi, width)
            return (yj >= top) & (yj < top + 7) & (xj >= left) & (xj < left + 7)
        return layout_from_rule(rule, height, width, max_offset=6 + stride, name=f"neighborhood_7_stride_{stride}")
    build.builds_layouts = True
    build.__name__ = f"neighborhood_7_stride_{stride}"
    return build


neighborhood_7_stride_2 = _strided_neighborhood(2)
neighborhood_7_stride_4 = _strided_neighborhood(4)


def shifted_window_7(height, width):
    """A 7 x 7 window shifted inward at the borders, so that every query has 49
    keys (NATTEN's neighbourhood): not a stencil, since the offsets change
    near the borders. A builder (height, width) -> Layout, the rule needs the grid."""
    size_y, size_x = min(7, height), min(7, width)

    def rule(yi, xi, yj, xj):
        y0 = np.clip(yi - 3, 0, height - size_y)
        x0 = np.clip(xi - 3, 0, width - size_x)
        return (yj >= y0) & (yj < y0 + size_y) & (xj >= x0) & (xj < x0 + size_x)

    return layout_from_rule(rule, height, width, max_offset=6, name="shifted_window_7")


shifted_window_7.builds_layouts = True


def dilated_neighborhood_7_by_2(height, width):
    """DiNAT's dilated neighbourhood: within each class of tokens modulo 2 (a
    grid of every other row and column), the 7 x 7 neighbourhood slid
    inward at the class's edges (neighborhood_layout(..., 7, dilation=2),
    written as a rule so that earlier builds can time it too). Needs 14
    tokens a side."""
    def starts(coords, size):
        residue, position = coords % 2, coords // 2
        return np.clip(position - 3, 0, (size - residue + 1) // 2 - 7)

    def rule(yi, xi, yj, xj):
        top, left = starts(yi, height), starts(xi, width)
        same_class = (yi % 2 == yj % 2) & (xi % 2 == xj % 2)
        return same_class & (yj // 2 >= top) & (yj // 2 < top + 7) & (xj // 2 >= left) & (xj // 2 < left + 7)

    return layout_from_rule(rule, height, width, max_offset=12, name="dilated_neighborhood_7_by_2")


dilated_neighborhood_7_by_2.builds_layouts = True
RULES = [neighborhood_7, dilated_7_by_2, causal_window_7, cross_11, axial_rule, window_15, checkerboard_16,
         shifted_window_7, dilated_neighborhood_7_by_2]


def forced(family, fn):
    """fn() with the CPU's kernels forced to ``family`` (stencil, tiles or rows)."""
    saved = (_stencil.use_stencil_cpu_kernel, _tiles.CPU_MIN_FILL, _stencil.CUSTOM_STENCIL_MAX_FILL,
             _stencil.CUSTOM_WINDOW_MAX_FILL)
    _stencil.use_stencil_cpu_kernel = family == "stencil"
    _stencil.CUSTOM_STENCIL_MAX_FILL = _stencil.CUSTOM_WINDOW_MAX_FILL = float("inf")
    _tiles.CPU_MIN_FILL = 0.0 if family in ("tiles", "stencil") else float("inf")
    try:
        return fn()
    finally:
        (_stencil.use_stencil_cpu_kernel, _tiles.CPU_MIN_FILL, _stencil.CUSTOM_STENCIL_MAX_FILL,
         _stencil.CUSTOM_WINDOW_MAX_FILL) = saved


def seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(rule, side, rounds):
    layout = rule(side, side) if getattr(rule, "builds_layouts", False) else layout_from_rule(rule, side, side)
    n = layout.num_tokens
    batch = max(1, ROWS // n)
    q, k, v = (torch.randn(batch, HEADS, n, HEAD_DIM) for _ in range(3))
    # a window plus more pairs in some rows runs as a split (window kernel, then tiles)
    split = layout.stencil() is None and layout.stencil_split() is not None
    families = (["stencil"] if layout.stencil() is not None or split else []) + ["tiles", "rows"]

    def step(run):
        def forward():
            with torch.no_grad():
                run(q, k, v)

        def training():
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            run(*leaves).sum().backward()
        return forward, training

    ours = step(lambda *t: attention(*t, layout))
    dense = step(lambda *t: F.scaled_dot_product_attention(*t))
    for family in families:  # warm: plans and caches
        forced(family, ours[1])
    dense[1]()
    ratios = {(family, s): [] for family in families for s in (0, 1)}
    for _ in range(rounds):
        for s in (0, 1):
            base = seconds(dense[s])
            for family in families:
                ratios[family, s].append(forced(family, lambda: seconds(ours[s])) / base)
    chosen = _stencil.cpu_kernel_choice(layout) or "rows"
    chosen = "stencil" if chosen in ("stencil", "split") else chosen
    window = ""
    if split:
        window = " (window + tiles)"
    elif layout.stencil() is not None:
        window = " (window)" if _stencil.window_takes(layout.stencil(), HEAD_DIM) else " (strip)"
    cells = []
    for family in ("stencil", "tiles", "rows"):
        if family in families:
            cells.append(f"{statistics.median(ratios[family, 0]):.2f} / {statistics.median(ratios[family, 1]):.2f}")
        else:
            cells.append("-")
    best = min(families, key=lambda f: statistics.median(ratios[f, 1]))
    return (f"| {rule.__name__} | {side}x{side} | {layout.density:.4f} | {' | '.join(cells)} "
            f"| {chosen}{window if chosen == 'stencil' else ''} | {best} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", default="32,64")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rules", default=",".join(r.__name__ for r in RULES))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    by_name = {r.__name__: r for r in RULES}
    rules = [by_name[name] for name in args.rules.split(",")]
    lines = [f"ours / dense SDPA, forward / forward+backward, median of {args.rounds} rounds; B = max(1, {ROWS} // N), "
             f"{HEADS} heads, D={HEAD_DIM}, float32, torch {torch.__version__}, {torch.get_num_threads()} threads",
             "",
             "| rule | grid | density | stencil | tiles | rows | rule takes | fastest f+b |",
             "|---|---|---|---|---|---|---|---|"]
    table = MarkdownTable(lines, args.out, "custom_layouts.md")
    for side in (int(s) for s in args.sides.split(",")):
        for rule in rules:
            table.add(measure(rule, side, args.rounds))
    table.write()


if __name__ == "__main__":
    main()
