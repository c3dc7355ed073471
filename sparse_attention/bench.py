"""CPU benchmark against the peers a user would otherwise pick.

For every pattern and map size, on the same tensors in one run: dense
``scaled_dot_product_attention`` (the 1.00x baseline), SDPA with a boolean mask
of the pattern, FlexAttention with the same mask (compiled, where it runs),
our pure-PyTorch path and our native kernels; op level (q, k, v given) and
module level (EnhancedSparseAttention). Forward, forward+backward and peak
memory; medians of repeats after a warm-up.

    python -m sparse_attention bench --out benchmarks/results
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

from ._measure import PeakMemory

PATTERNS = ["axial", "block", "longformer", "strided", "random"]
# dense N x N peers are skipped when their score matrix would pass this many bytes
DENSE_MATRIX_LIMIT = 3 * 2**30


def cpu_model():
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


@functools.lru_cache(maxsize=None)
def _fma_probe_binary():
    """benchmarks/fma_probe.c built once per process with the system compiler, or None."""
    here = os.path.dirname(os.path.abspath(__file__))
    source = os.path.join(os.path.dirname(here), "benchmarks", "fma_probe.c")
    compiler = shutil.which("cc") or shutil.which("gcc")
    if not (os.path.exists(source) and compiler):
        return None
    binary = os.path.join("/tmp" if os.path.isdir("/tmp") else here, "sparse_attention_fma_probe")
    try:
        subprocess.run([compiler, "-O3", "-march=native", "-pthread", source, "-o", binary],
                       check=True, capture_output=True)
    except (subprocess.CalledProcessError, OSError):
        return None
    return binary


def fma_peak(threads):
    """Runs benchmarks/fma_probe.c on 1 and `threads` threads, or returns None."""
    binary = _fma_probe_binary()
    if binary is None:
        return None
    try:
        out = subprocess.run([binary, str(threads)], check=True, capture_output=True, text=True)
        return json.loads(out.stdout)
    except (subprocess.CalledProcessError, OSError, ValueError):
        return None


def core_sharing_warning(peak, threads):
    """A warning when the FMA probe's threads did not scale (another job had
    part of the cores, so the run's ratios may be off), else None."""
    if not peak or threads < 2:
        return None
    one, many = peak.get("threads_1"), peak.get(f"threads_{threads}")
    if not one or not many:
        return None
    scaling = many / one
    if scaling >= 0.85 * threads:
        return None
    return (f"the FMA probe ran {scaling:.2f}x faster on {threads} threads than on 1 (about "
            f"{threads}x when the cores are free): another job shared them, so this run's times "
            "and ratios may be off")


def timed(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timed_pair(fn_a, fn_b, repeats, warmup=1):
    """(median of a's times, median of b's, median of the per-round ratios a / b),
    a and b run alternately, their order flipped every round: a change in the
    machine's load from round to round reaches both sides of each ratio."""
    for _ in range(warmup):
        fn_a()
        fn_b()
    times_a, times_b = [], []
    for round_ in range(repeats):
        order = [(fn_a, times_a), (fn_b, times_b)]
        for fn, times in (order if round_ % 2 == 0 else order[::-1]):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    ratios = [a / b for a, b in zip(times_a, times_b)]
    return statistics.median(times_a), statistics.median(times_b), statistics.median(ratios)


def measure_paired(fn_ours, fn_dense, leaves, repeats):
    """measure() for ours and dense SDPA in alternation: (ours, dense, ratios), ours
    and dense as measure() returns them (dense without memory) and ratios the
    medians of the per-round ratios ours / dense, forward and forward+backward."""
    import torch

    with torch.no_grad():
        ours_fwd, dense_fwd, ratio_fwd = timed_pair(fn_ours, fn_dense, repeats)
    ours_step, dense_step = _training_step(fn_ours, leaves), _training_step(fn_dense, leaves)
    ours_both, dense_both, ratio_both = timed_pair(ours_step, dense_step, repeats)
    _fresh_buffers()
    with PeakMemory() as memory:
        ours_step()
    return ((ours_fwd, ours_both, memory.megabytes), (dense_fwd, dense_both, None),
            (ratio_fwd, ratio_both))


def _fresh_buffers():
    """Empties our op's buffer cache, so that a memory reading counts the
    buffers a step needs, not just those the cache could not serve."""
    from . import empty_buffer_cache

    empty_buffer_cache()


def _training_step(fn_forward, leaves):
    """One forward and backward of fn_forward, leaving no gradients behind."""
    import torch

    def step():
        out = fn_forward()
        out.backward(torch.ones_like(out))
        for leaf in leaves:
            leaf.grad = None
    return step


def measure(fn_forward, leaves, repeats):
    """(forward s, forward+backward s, peak RSS increase in MB of one forward+backward).

    The backward entries are None (and the reason is raised) where a peer has
    no backward; callers keep the forward time."""
    import torch

    with torch.no_grad():
        forward = timed(fn_forward, repeats)
    step = _training_step(fn_forward, leaves)
    try:
        both = timed(step, repeats)
    except (NotImplementedError, RuntimeError) as error:
        raise BackwardUnsupported(forward, error) from error
    _fresh_buffers()
    with PeakMemory() as memory:
        step()
    return forward, both, memory.megabytes


class BackwardUnsupported(Exception):
    def __init__(self, forward, error):
        super().__init__(str(error))
        self.forward = forward


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m sparse_attention bench",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--sides", default="32,64,128", help="map sides (tokens = side^2)")
    parser.add_argument("--patterns", default=",".join(PATTERNS),
                        help="comma-separated built-in names, or module:name for a pattern of your own "
                             "(a rule, a builder or a CustomPattern, importable from here)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="0: every core")
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--no-module", action="store_true")
    parser.add_argument("--pair-limit", type=float, default=5.0,
                        help="time dense SDPA again beside each pattern, alternating with ours, "
                             "where one dense forward+backward takes at most this many seconds "
                             "(0: never)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from . import EnhancedSparseAttention, set_num_threads, get_num_threads
    from . import sparse_scaled_dot_product_attention as sparse_attention
    from . import _torch_impl
    from .custom_layouts import layout_of, pattern_from_spec

    set_num_threads(args.threads)
    threads = get_num_threads()
    torch.set_num_threads(threads)
    os.makedirs(args.out, exist_ok=True)
    machine = (f"{cpu_model()}, {os.cpu_count()} logical CPUs, {threads} threads, "
               f"torch {torch.__version__}, Python {platform.python_version()}")
    print(f"machine: {machine}", flush=True)
    peak = fma_peak(threads)
    if peak:
        print(f"fp32 FMA peak (probe): {peak}", flush=True)

    flex, flex_status = None, "not tried (--no-flex)"
    if not args.no_flex:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            flex = torch.compile(flex_attention, dynamic=False)
            flex_status = "compiled with inductor"
        except Exception as error:  # noqa: BLE001 - record why
            flex_status = f"unavailable: {type(error).__name__}: {error}"

    records = []
    b, h, d = args.batch, args.heads, args.dim
    for side in (int(s) for s in args.sides.split(",")):
        n = side * side
        gen = torch.Generator().manual_seed(side)
        q, k, v = (torch.randn(b, h, n, d, generator=gen).requires_grad_(True) for _ in range(3))
        dense_bytes = b * h * n * n * 4
        dense_fits = dense_bytes <= DENSE_MATRIX_LIMIT
        base = measure(lambda: F.scaled_dot_product_attention(q, k, v), [q, k, v], args.repeats)
        print(f"\n{side}x{side} ({n} tokens): dense SDPA fwd {base[0] * 1e3:.1f} ms, "
              f"fwd+bwd {base[1] * 1e3:.1f} ms", flush=True)
        for spec in args.patterns.split(","):
            chosen = pattern_from_spec(spec)
            pattern = spec if ":" not in spec else chosen.name
            layout = layout_of(chosen, side, side)
            row = dict(side=side, tokens=n, pattern=pattern, density=layout.density, nnz=layout.nnz,
                       level="op", dense=base)
            if dense_fits:
                mask = torch.from_numpy(layout.to_dense())
                row["masked_sdpa"] = measure(
                    lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), [q, k, v],
                    args.repeats)
                del mask
            else:
                row["masked_sdpa_note"] = f"skipped: the {dense_bytes / 2**30:.1f} GiB score matrix"
            if flex is not None:
                try:
                    dense_mask = torch.from_numpy(layout.to_dense())
                    block_mask = create_block_mask(lambda bb, hh, qi, kj: dense_mask[qi, kj], None,
                                                   None, n, n, device="cpu")
                    try:
                        row["flex"] = measure(lambda: flex(q, k, v, block_mask=block_mask), [q, k, v],
                                              args.repeats)
                    except (NotImplementedError, BackwardUnsupported) as error:
                        # FlexAttention on the CPU refuses inputs that require grad: forward only
                        qd, kd, vd = q.detach(), k.detach(), v.detach()
                        with torch.no_grad():
                            forward = timed(lambda: flex(qd, kd, vd, block_mask=block_mask), args.repeats)
                        row["flex"] = (forward, None, None)
                        row["flex_note"] = f"forward only: {str(error)[:120]}"
                except Exception as error:  # noqa: BLE001
                    row["flex_note"] = f"failed: {type(error).__name__}: {str(error)[:200]}"
            # the PyTorch path's largest tensors: a float per plan slot (over the
            # tile plan) or a gathered key row per pair (without one)
            plan = layout.full_tile_plan() if _torch_impl.use_tile_plan else None
            if plan is not None:
                torch_bytes, what = b * h * plan.num_slots * 4, "scores: B x heads x plan slots"
            else:
                torch_bytes, what = b * h * layout.nnz * d * 4, "gathers: B x heads x nnz x D"
            if torch_bytes <= DENSE_MATRIX_LIMIT / 3:
                row["ours_torch"] = measure(
                    lambda: sparse_attention(q, k, v, layout, backend="torch"), [q, k, v], args.repeats)
            else:
                row["ours_torch_note"] = f"skipped: {what} ({torch_bytes / 2**30:.1f} GiB per tensor)"
            ours_fn = lambda: sparse_attention(q, k, v, layout)  # noqa: E731
            if base[1] <= args.pair_limit:
                # dense again, in alternation with ours: the ratio the goals are stated in
                row["ours"], paired_dense, ratios = measure_paired(
                    ours_fn, lambda: F.scaled_dot_product_attention(q, k, v), [q, k, v], args.repeats)
                row["dense"] = (paired_dense[0], paired_dense[1], base[2])
                row["dense_at_start"] = base
                row["ours_paired_ratio"] = ratios
            else:
                row["ours"] = measure(ours_fn, [q, k, v], args.repeats)
                ratios = (row["ours"][0] / base[0], row["ours"][1] / base[1])
            fwd_flops = 4.0 * layout.nnz * d * b * h
            row["ours_fwd_gflops"] = fwd_flops / row["ours"][0] / 1e9
            row["ours_bwd_gflops"] = 2.5 * fwd_flops / (row["ours"][1] - row["ours"][0]) / 1e9
            for key in ("fwd", "both"):
                row[f"flop_bound_fraction_{key}"] = layout.density / ratios[0 if key == "fwd" else 1]
            records.append(row)
            print(f"  {pattern:10s} density {layout.density:.4f}: ours fwd "
                  f"{row['ours'][0] * 1e3:.2f} ms ({1 / ratios[0]:.1f}x dense), "
                  f"fwd+bwd {row['ours'][1] * 1e3:.2f} ms ({1 / ratios[1]:.1f}x); "
                  f"{row['ours_fwd_gflops']:.1f} GFLOP/s fwd; "
                  f"FLOP-bound fraction fwd {row['flop_bound_fraction_fwd']:.2f}, "
                  f"f+b {row['flop_bound_fraction_both']:.2f}", flush=True)
            if not args.no_module and side <= 64:
                torch.manual_seed(0)
                module = EnhancedSparseAttention(h * d, h * d, num_heads=h, sparsity_pattern=chosen,
                                                 dropout=0.0)
                dense_module = EnhancedSparseAttention(h * d, h * d, num_heads=h,
                                                       sparsity_pattern="dense", dropout=0.0)
                x = torch.randn(b, h * d, side, side, requires_grad=True)
                records.append(dict(side=side, tokens=n, pattern=pattern, density=layout.density,
                                    level="module",
                                    dense=measure(lambda: dense_module(x), [x], args.repeats),
                                    ours=measure(lambda: module(x), [x], args.repeats)))

    # again at the end: a core taken by another job partway through shows here
    peak_end = fma_peak(threads)
    if peak_end:
        print(f"fp32 FMA peak (probe, end of run): {peak_end}", flush=True)
    write_outputs(records, args, machine, dict(start=peak, end=peak_end, threads=threads), flex_status)


def _ratio(row, key, index):
    if key == "ours" and "ours_paired_ratio" in row:
        return f"{row['ours_paired_ratio'][index]:.2f}x"
    value = row.get(key)
    if value is None or value[index] is None:
        return "n/a"
    return f"{value[index] / row['dense'][index]:.2f}x"


def write_outputs(records, args, machine, probe, flex_status):
    """probe: the FMA probe's readings at the start and end of the run ("start",
    "end") and the thread count ("threads")."""
    peak = probe["start"]
    warnings = [w for w in (core_sharing_warning(probe[when], probe["threads"]) for when in ("start", "end"))
                if w]
    command = "python -m sparse_attention bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:])
    lines = [f"Machine: {machine}.", f"FlexAttention: {flex_status}.",
             f"B={args.batch}, heads={args.heads}, D={args.dim}, fp32; median of {args.repeats}; "
             "times relative to dense SDPA on the same tensors (lower is better). Where a dense "
             f"forward+backward takes at most {args.pair_limit:g} s, dense SDPA is timed again "
             "beside each pattern, alternating with ours, and ours is the median of those "
             "per-round ratios; the peers are relative to that dense time too.",
             f"Command: `{command.strip()}`", "",
             "Memory: peak RSS increase of one forward+backward, sampled every 5 ms (MB; coarse for "
             "runs of a few ms).", "",
             "| tokens | pattern | density | ours fwd | ours f+b | ours / dense / masked MB | "
             "masked SDPA fwd | masked SDPA f+b | Flex fwd | Flex f+b | PyTorch path fwd | "
             "PyTorch path f+b |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if r["level"] != "op":
            continue
        masked_mb = f"{r['masked_sdpa'][2]:.0f}" if r.get("masked_sdpa") else "n/a"
        memory = f"{r['ours'][2]:.0f} / {r['dense'][2]:.0f} / {masked_mb}"
        lines.append(
            f"| {r['side']}x{r['side']} | {r['pattern']} | {r['density']:.4f} | {_ratio(r, 'ours', 0)} | "
            f"{_ratio(r, 'ours', 1)} | {memory} | {_ratio(r, 'masked_sdpa', 0)} | "
            f"{_ratio(r, 'masked_sdpa', 1)} | {_ratio(r, 'flex', 0)} | {_ratio(r, 'flex', 1)} | "
            f"{_ratio(r, 'ours_torch', 0)} | {_ratio(r, 'ours_torch', 1)} |")
    notes = sorted({f"{key}: {r[key]}" for r in records for key in ("flex_note", "ours_torch_note",
                                                                     "masked_sdpa_note") if key in r})
    lines += [""] + [f"- {note}" for note in notes]
    lines += ["", "Dense SDPA absolute times (ms; fwd / f+b): " + "; ".join(
        f"{r['side']}x{r['side']} {r['pattern']}: {r['dense'][0] * 1e3:.1f} / {r['dense'][1] * 1e3:.1f}"
        for r in records if r["level"] == "op")]
    lines += ["", "Efficiency of our kernels (forward 4 x nnz x D flops per batch-head, backward 2.5x that):",
              f"machine fp32 FMA peak from benchmarks/fma_probe.c: {peak} at the start, "
              f"{probe['end']} at the end"] + [f"- Warning: {w}." for w in warnings] + ["",
              "| tokens | pattern | fwd GFLOP/s | bwd GFLOP/s | FLOP-bound fraction fwd | f+b |",
              "|---|---|---|---|---|---|"]
    for r in records:
        if r["level"] == "op":
            lines.append(f"| {r['side']}x{r['side']} | {r['pattern']} | {r['ours_fwd_gflops']:.1f} | "
                         f"{r['ours_bwd_gflops']:.1f} | {r['flop_bound_fraction_fwd']:.2f} | "
                         f"{r['flop_bound_fraction_both']:.2f} |")
    module_rows = [r for r in records if r["level"] == "module"]
    if module_rows:
        lines += ["", "Module level (EnhancedSparseAttention with the DENSE layout = 1.00x):", "",
                  "| tokens | pattern | fwd | f+b |", "|---|---|---|---|"]
        for r in module_rows:
            lines.append(f"| {r['side']}x{r['side']} | {r['pattern']} | {_ratio(r, 'ours', 0)} | "
                         f"{_ratio(r, 'ours', 1)} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "cpu_bench.md"), "w") as fh:
        fh.write(text)
    with open(os.path.join(args.out, "cpu_bench.json"), "w") as fh:
        json.dump(dict(machine=machine, fma_peak=peak, fma_peak_end=probe["end"], warnings=warnings,
                       flex=flex_status, records=records), fh, indent=1)
    plot(records, os.path.join(args.out, "cpu_bench.png"), machine)
    print("\n" + text)
    print(f"wrote {args.out}/cpu_bench.md, cpu_bench.json, cpu_bench.png")


def plot(records, path, machine):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in records if r["level"] == "op"]
    fig, ax = plt.subplots(figsize=(7, 5))
    dense = sorted({r["tokens"]: statistics.median(x["dense"][1] for x in rows if x["tokens"] == r["tokens"])
                    for r in rows}.items())
    ax.plot([t for t, _ in dense], [s * 1e3 for _, s in dense], "k-o", label="dense SDPA")
    for pattern in sorted({r["pattern"] for r in rows}):
        mine = sorted((r["tokens"], r["ours"][1]) for r in rows if r["pattern"] == pattern)
        ax.plot([t for t, _ in mine], [s * 1e3 for _, s in mine], "-o", label=f"ours {pattern}")
        masked = sorted((r["tokens"], r["masked_sdpa"][1]) for r in rows
                        if r["pattern"] == pattern and "masked_sdpa" in r)
        if masked:
            ax.plot([t for t, _ in masked], [s * 1e3 for _, s in masked], ":", alpha=0.6,
                    label=f"masked SDPA {pattern}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens (H x W)")
    ax.set_ylabel("forward + backward time (ms)")
    ax.set_title(machine[:90], fontsize=7)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
