"""Few (batch, head)s on the gather kernels: ranges sized to the thread count
against ranges of 1024 rows, CPU, float32, with a relative position bias.

    python benchmarks/gather_ranges.py [--cases 1x1x32,1x2x32,1x1x64,2x4x64]
        [--ratio 0.1] [--dim 32] [--rounds 7]

A case is BATCHxHEADSxSIDE: RANDOM at the ratio on SIDE x SIDE tokens (its
rows run on the gather kernels). With a bias the dQ pass runs in ranges of
rows of one (batch, head), and a head's keys in blocks where they outrun
half an L2; each round times forward+backward (and the forward under
no_grad) with the ranges as the kernels size them (halved from 1024 rows
until every thread has four) and with 1024 rows forced
(``C.set_gather_blocking(0, 1024)``), in alternating order. Prints the
median over rounds of the per-round ratio sized / 1024 rows and both
medians."""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from sparse_attention import build_layout, get_num_threads  # noqa: E402
from sparse_attention import sparse_scaled_dot_product_attention as attention  # noqa: E402
from sparse_attention._native import C  # noqa: E402


def parse_case(text):
    try:
        batch, heads, side = (int(part) for part in text.split("x"))
    except ValueError:
        raise SystemExit(f"--cases: expected BATCHxHEADSxSIDE, got {text!r}")
    if min(batch, heads, side) < 1:
        raise SystemExit(f"--cases: every part of {text!r} must be positive")
    return batch, heads, side


def seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(batch, heads, side, ratio, dim, rounds):
    layout = build_layout("random", side, side, attention_ratio=ratio, seed=0)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, layout.num_tokens, dim, generator=gen) for _ in range(3))
    bias = torch.randn(heads, 33, 33, generator=gen)

    def forward():
        with torch.no_grad():
            attention(q, k, v, layout, rel_pos_bias=bias)

    def training():
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v, bias)]
        attention(*leaves[:3], layout, rel_pos_bias=leaves[3]).sum().backward()

    times = {(kind, step): [] for kind in ("sized", "1024") for step in ("fwd", "f+b")}
    settings = C.set_gather_blocking(0, 0)
    try:
        training()  # warm-up: the layout's plans and buffers
        for round_index in range(rounds):
            order = ("sized", "1024") if round_index % 2 == 0 else ("1024", "sized")
            for kind in order:
                C.set_gather_blocking(0, 0 if kind == "sized" else 1024)
                times[kind, "fwd"].append(seconds(forward))
                times[kind, "f+b"].append(seconds(training))
    finally:
        C.set_gather_blocking(*settings)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="1x1x32,1x2x32,1x1x64,2x4x64")
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    if args.dim < 1 or args.rounds < 1 or not 0 < args.ratio <= 1:
        raise SystemExit("--dim and --rounds must be positive, --ratio in (0, 1]")
    cases = [parse_case(text) for text in args.cases.split(",")]
    threads = get_num_threads()
    print(f"RANDOM {args.ratio:g}, D={args.dim}, a 33 x 33 bias, float32, {threads} threads; "
          f"median of {args.rounds} rounds")
    print("| case | ranges per head, sized / 1024 | fwd sized / 1024 | f+b sized / 1024 "
          "| f+b sized (ms) | f+b 1024 (ms) |")
    print("|---|---|---|---|---|---|")
    for batch, heads, side in cases:
        times = measure(batch, heads, side, args.ratio, args.dim, args.rounds)
        ratio = {step: statistics.median(a / b for a, b in zip(times["sized", step], times["1024", step]))
                 for step in ("fwd", "f+b")}
        sized_ranges = C.gather_ranges_per_head(batch * heads, side * side)
        print(f"| {batch}x{heads}x{side} | {sized_ranges} / {-(-side * side // 1024)} | {ratio['fwd']:.2f} "
              f"| {ratio['f+b']:.2f} | {1e3 * statistics.median(times['sized', 'f+b']):.1f} "
              f"| {1e3 * statistics.median(times['1024', 'f+b']):.1f} |", flush=True)


if __name__ == "__main__":
    main()
