"""Our neighbourhood attention against NATTEN's on the CPU, at NAT's and DiNAT's shapes.

    python benchmarks/natten_cpu.py [--cases 56:2:1,56:2:8,28:4:1,...] [--batch 4] [--rounds 5] [--out DIR]

A case is GRID:HEADS:DILATION[:STRIDE]: GRID is SIDE (a SIDE x SIDE feature
map, a 7 x 7 kernel) or DEPTHxSIDE (a DEPTH x SIDE x SIDE video or volume,
a 3 x 7 x 7 kernel, NATTEN's ``na3d`` against neighborhood_layout_3d);
D=32; DILATION and STRIDE (1 unless given: NATTEN's generalised
neighbourhood, runs of STRIDE queries share one window) act on the two
spatial axes. The defaults are the stages of NAT-Mini and DiNAT-Mini at
224 x 224 input: 56x56 with 2 heads, 28x28 with 4, 14x14 with 8, 7x7 with
16, each undilated and with DiNAT's dilation for that stage.

NATTEN (``pip install natten``; without its CUDA library it runs Flex
Attention) takes ``[B, H, W, heads, D]``; ours takes ``[B, heads, H*W, D]``.
Each op gets its own layout, made contiguous before timing, so neither pays
for a transpose. Before timing, the two outputs are compared (max |diff|,
float32) and the case is refused if they differ by more than 1e-4. Every
round times, one after the other: ours, NATTEN, and dense
``scaled_dot_product_attention`` on our tensors; forward under no_grad, then
forward+backward (sum of outputs); a step NATTEN refuses (it has no
backward on the CPU) is shown as "-" with its reason. Prints median milliseconds and the median
over rounds of the per-round ratios ours / NATTEN and ours / dense. NATTEN's
compiled Flex path needs a CUDA device (its own check refuses the CPU), so
the CPU path of NATTEN is the one timed here. With ``--out`` it writes
``natten_cpu.md``."""

import argparse
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from sparse_attention import _stencil, neighborhood_layout, neighborhood_layout_3d  # noqa: E402
from sparse_attention import sparse_scaled_dot_product_attention as attention  # noqa: E402
from markdown_table import MarkdownTable  # noqa: E402

KERNEL, DEPTH_KERNEL, HEAD_DIM, AGREEMENT = 7, 3, 32, 1e-4
DEFAULT_CASES = "56:2:1,56:2:8,28:4:1,28:4:4,14:8:1,14:8:2,7:16:1"


def parse_cases(text):
    """(grid, heads, dilation, stride) per case; grid is (side, side) or (depth, side, side)."""
    cases = []
    for item in text.split(","):
        try:
            grid, *numbers = item.split(":")
            *depth, side = (int(part) for part in grid.split("x"))
            heads, dilation, *stride = (int(part) for part in numbers)
            (stride,) = stride or [1]
            if len(depth) > 1:
                raise ValueError
        except ValueError:
            raise SystemExit(f"--cases: expected [DEPTHx]SIDE:HEADS:DILATION[:STRIDE] items, got {item!r}")
        if side < KERNEL * dilation or (depth and depth[0] < DEPTH_KERNEL):
            raise SystemExit(f"--cases: {item!r} needs SIDE >= {KERNEL} * DILATION and DEPTH >= {DEPTH_KERNEL} "
                             f"(NATTEN's rule)")
        if not 1 <= stride <= KERNEL:
            raise SystemExit(f"--cases: {item!r} needs 1 <= STRIDE <= {KERNEL}")
        cases.append(((*depth, side, side), heads, dilation, stride))
    return cases


def seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def heads_first(t):
    batch, *grid, heads, dim = t.shape
    return t.reshape(batch, -1, heads, dim).transpose(1, 2).contiguous()


def steps(run, tensors):
    def forward():
        with torch.no_grad():
            run(*tensors)

    def training():
        leaves = [t.clone().requires_grad_() for t in tensors]
        run(*leaves).sum().backward()
    return forward, training


def measure(natten, grid, heads, dilation, stride, batch, rounds):
    gen = torch.Generator().manual_seed(grid[-1] * 100 + dilation)
    natten_qkv = [torch.randn(batch, *grid, heads, HEAD_DIM, generator=gen) for _ in range(3)]
    ours_qkv = [heads_first(t) for t in natten_qkv]
    if len(grid) == 3:
        settings = dict(kernel_size=(DEPTH_KERNEL, KERNEL, KERNEL), dilation=(1, dilation, dilation),
                        stride=(1, stride, stride))
        layout, natten_op = neighborhood_layout_3d(*grid, **settings), natten.na3d
    else:
        settings = dict(kernel_size=KERNEL, dilation=dilation, stride=stride)
        layout, natten_op = neighborhood_layout(*grid, **settings), natten.na2d
    grid_name = "x".join(map(str, grid))

    def run_ours(q, k, v):
        return attention(q, k, v, layout)

    def run_natten(q, k, v):
        return natten_op(q, k, v, **settings)

    with torch.no_grad():
        difference = (run_ours(*ours_qkv) - heads_first(run_natten(*natten_qkv))).abs().max().item()
    if not difference <= AGREEMENT:
        raise SystemExit(f"{grid_name} dilation {dilation} stride {stride}: ours and NATTEN differ by "
                         f"{difference:.3g}")
    ways = {"ours": steps(run_ours, ours_qkv), "natten": steps(run_natten, natten_qkv),
            "dense": steps(F.scaled_dot_product_attention, ours_qkv)}
    refusals = {}
    for name, fns in ways.items():  # warm: layouts, plans, caches
        for s, fn in enumerate(fns):
            try:
                fn()
            except (NotImplementedError, RuntimeError) as error:
                if name != "natten":
                    raise
                refusals[name, s] = f"{type(error).__name__}: {str(error).splitlines()[0][:100]}"
    times = {(name, s): [] for name in ways for s in range(2)}
    for _ in range(rounds):
        for s in range(2):
            for name, fns in ways.items():
                if (name, s) not in refusals:
                    times[name, s].append(seconds(fns[s]))

    def median_ms(name, s):
        return "-" if (name, s) in refusals else f"{1e3 * statistics.median(times[name, s]):.1f}"

    def ratio(other, s):
        if (other, s) in refusals:
            return "-"
        return f"{statistics.median(a / b for a, b in zip(times['ours', s], times[other, s])):.3f}"

    cells = [" / ".join(median_ms(name, s) for s in range(2)) for name in ways]
    ratios = [" / ".join(ratio(other, s) for s in range(2)) for other in ("natten", "dense")]
    row = (f"| {grid_name} | {heads} | {dilation} | {stride} | {_stencil.cpu_route_name(layout)} | {difference:.1e} "
           f"| {' | '.join(cells)} | {' | '.join(ratios)} |")
    return row, set(refusals.values())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=DEFAULT_CASES)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    cases = parse_cases(args.cases)
    if args.batch < 1 or args.rounds < 1:
        raise SystemExit("--batch and --rounds must be at least 1")
    # NATTEN's CPU path is eager Flex Attention, which warns on every call that it is not compiled.
    warnings.filterwarnings("ignore", module=r"torch\.nn\.attention\.flex_attention")
    try:
        import natten
    except ImportError:
        raise SystemExit("NATTEN is not installed: pip install natten (its CPU path needs no CUDA build)")
    lines = [f"{KERNEL} x {KERNEL} neighbourhood ({DEPTH_KERNEL} x {KERNEL} x {KERNEL} on 3-D grids), "
             f"B={args.batch}, D={HEAD_DIM}, float32, median of {args.rounds} rounds; torch {torch.__version__}, NATTEN {natten.__version__}, {torch.get_num_threads()} threads; "
             "times in ms, forward / forward+backward; ratios are medians of per-round ratios",
             "",
             "| grid | heads | dilation | stride | our kernels | max diff | ours (ms) | NATTEN (ms) | dense SDPA (ms) "
             "| ours / NATTEN | ours / dense |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    table = MarkdownTable(lines, args.out, "natten_cpu.md")
    refusals = set()
    for grid, heads, dilation, stride in cases:
        row, refused = measure(natten, grid, heads, dilation, stride, args.batch, args.rounds)
        table.add(row)
        refusals |= refused
    if refusals:
        table.add("")
        for reason in sorted(refusals):
            table.add(f"NATTEN refused (\"-\" above): {reason}")
    table.write()


if __name__ == "__main__":
    main()
