"""Scattered keys on the row kernels: the gather kernels against the generic
row kernels, against themselves on whole rows, and dense SDPA, CPU, float32.

    python benchmarks/gather_rows.py [--sides 64,128] [--ratios 0.02,0.05,0.1]
        [--dims 16,32,64] [--heads 4] [--batch 1] [--rounds 5] [--out DIR]

RANDOM at each ratio (its tile plan is too sparse for the tile kernels, so
the rows run it), on batch x heads x side^2 x dim tensors. Each round times,
one after another, our op on the gather kernels as they choose (in key
blocks where a head's K and V outrun half an L2), on the gather kernels
held to whole rows (C.set_gather_blocking(-1)), on the generic row kernels
(C.set_gather_kernels(False)) and dense
``torch.nn.functional.scaled_dot_product_attention``, forward under no_grad
and forward+backward; prints the medians over rounds of the per-round ratios
gather / whole rows, gather / generic and gather / dense, and the gather
kernels' median time. "blocks" says whether the gather kernels chose key
blocks.
With ``--out`` writes ``gather_rows.md``."""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from markdown_table import MarkdownTable  # noqa: E402
from sparse_attention import _stencil, build_layout, get_num_threads  # noqa: E402
from sparse_attention import sparse_scaled_dot_product_attention as attention  # noqa: E402
from sparse_attention._native import C  # noqa: E402


def seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def forward_and_backward(call, inputs):
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    call(*leaves).sum().backward()


def measure(layout, inputs, rounds):
    """{(kind, "fwd" | "f+b"): [seconds per round]} for kind gather, whole, generic, dense."""
    ours = lambda q, k, v: attention(q, k, v, layout)  # noqa: E731
    dense = lambda q, k, v: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
    found = {}
    for round_index in range(rounds):
        # the first two swap places every round: the first call of a round found
        # the caches cold after dense SDPA (an A/A pair read 1.36 at 4.7 ms)
        pair = ("gather", "whole") if round_index % 2 == 0 else ("whole", "gather")
        for kind in (*pair, "generic", "dense"):
            call = dense if kind == "dense" else ours
            C.set_gather_kernels(kind != "generic")
            C.set_gather_blocking(-1 if kind == "whole" else 0)
            with torch.no_grad():
                found.setdefault((kind, "fwd"), []).append(seconds(lambda: call(*inputs)))
            found.setdefault((kind, "f+b"), []).append(seconds(lambda: forward_and_backward(call, inputs)))
    C.set_gather_kernels(True)
    C.set_gather_blocking(0)
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", default="64,128")
    parser.add_argument("--ratios", default="0.02,0.05,0.1")
    parser.add_argument("--dims", default="16,32,64")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    sides = [int(s) for s in args.sides.split(",")]
    ratios = [float(r) for r in args.ratios.split(",")]
    dims = [int(d) for d in args.dims.split(",")]
    if min(sides) < 1 or min(dims) < 1 or args.rounds < 1 or not all(0 < r <= 1 for r in ratios):
        raise SystemExit("--sides, --dims and --rounds must be positive, --ratios in (0, 1]")
    head = [f"RANDOM, float32, B={args.batch}, {args.heads} heads, {get_num_threads()} threads; median of "
            f"{args.rounds} rounds of per-round ratios (gather kernels / themselves on whole rows, / generic rows, "
            f"/ dense SDPA)", "", "| grid | ratio | D | route | blocks | fwd / whole | f+b / whole | fwd / generic | "
            "f+b / generic | fwd / dense | f+b / dense | gather fwd (ms) | gather f+b (ms) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    table = MarkdownTable(head, args.out, "gather_rows.md")
    for side in sides:
        for ratio in ratios:
            layout = build_layout("random", side, side, attention_ratio=ratio)
            route = _stencil.cpu_route_name(layout)
            for dim in dims:
                gen = torch.Generator().manual_seed(dim)
                inputs = [torch.randn(args.batch, args.heads, side * side, dim, generator=gen) for _ in range(3)]
                blocked_before = C.cpu_gather_blocked_calls()
                found = measure(layout, inputs, args.rounds)
                blocks = "yes" if C.cpu_gather_blocked_calls() > blocked_before else "no"

                def ratio_of(kind, step):
                    return statistics.median(a / b for a, b in zip(found["gather", step], found[kind, step]))
                table.add(f"| {side}x{side} | {ratio} | {dim} | {route} | {blocks} | {ratio_of('whole', 'fwd'):.2f} | "
                          f"{ratio_of('whole', 'f+b'):.2f} | {ratio_of('generic', 'fwd'):.2f} | "
                          f"{ratio_of('generic', 'f+b'):.2f} | {ratio_of('dense', 'fwd'):.2f} | "
                          f"{ratio_of('dense', 'f+b'):.2f} | "
                          f"{statistics.median(found['gather', 'fwd']) * 1e3:.1f} | "
                          f"{statistics.median(found['gather', 'f+b']) * 1e3:.1f} |")
    table.write()


if __name__ == "__main__":
    main()
