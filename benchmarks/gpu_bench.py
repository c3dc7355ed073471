"""GPU benchmark: our CUDA op against dense SDPA and FlexAttention (same mask).

bf16, B=1, 8 heads, D=64, at 64x64 and 128x128 tokens; forward and
forward+backward; median of repeats timed with CUDA events. Writes
gpu_bench.md and gpu_bench.json into --out.

    python benchmarks/gpu_bench.py --out results/

Patterns of one's own, not run by default, by name in --patterns (and
--flex-patterns for FlexAttention): dilated, causal, cross (rules from
custom_layouts.py) and neighborhood (NATTEN's 7 x 7 neighbourhood, against
FlexAttention with the same clamped window as a mask_mod).
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sparse_attention import build_layout, layout_from_rule, neighborhood_layout  # noqa: E402
from sparse_attention import sparse_scaled_dot_product_attention as sparse_attention  # noqa: E402
from sparse_attention import _torch_ops  # noqa: E402
from sparse_attention.patterns import global_tokens  # noqa: E402

PATTERNS = ["axial", "block", "longformer", "strided", "random"]
# patterns of one's own that --patterns may also name (not run by default)
CUSTOM = {"dilated": "dilated_7_by_2", "causal": "causal_window_7", "cross": "cross_11"}
# NATTEN's neighbourhood (neighborhood_layout), kernel size
NEIGHBORHOOD = 7


def layout_of(pattern, side):
    """The built-in pattern's layout, a custom rule's from custom_layouts.py, or
    NATTEN's neighbourhood."""
    if pattern == "neighborhood":
        return neighborhood_layout(side, side, NEIGHBORHOOD)
    if pattern in CUSTOM:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import custom_layouts

        return layout_from_rule(getattr(custom_layouts, CUSTOM[pattern]), side, side)
    return build_layout(pattern, side, side, attention_ratio=0.1 if pattern == "random" else 0.5)


def time_cuda(fn, repeats, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def capture_graph(fn):
    """fn captured in a CUDA graph, after a warm-up on a side stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def time_graph(fn, repeats):
    """Median time of fn replayed from a CUDA graph: the GPU time without the
    Python and launch overhead of an eager call. None if capture fails."""
    try:
        return time_cuda(capture_graph(fn).replay, repeats)
    except Exception as error:  # noqa: BLE001 - report and go on
        print(f"    graph capture failed: {type(error).__name__}: {str(error)[:120]}")
        return None


def set_module_value(name, value):
    """A context manager factory that sets _torch_ops.<name> to value."""
    @contextlib.contextmanager
    def changed():
        before = getattr(_torch_ops, name)
        setattr(_torch_ops, name, value)
        try:
            yield
        finally:
            setattr(_torch_ops, name, before)
    return changed


def flip_module_switch(name):
    """A context manager factory that flips the boolean _torch_ops.<name>."""
    return set_module_value(name, not getattr(_torch_ops, name))


def eager_both_ways(fn, variant, repeats, rounds=5):
    """(default, variant): medians over alternating rounds of fn's eager time
    as it is and inside variant() (for forward+backward, which is not graphed)."""
    times = [[], []]
    try:
        for _ in range(rounds):
            for slot, context in enumerate((contextlib.nullcontext, variant)):
                with context():
                    times[slot].append(time_cuda(fn, repeats))
    except Exception as error:  # noqa: BLE001 - report and go on
        print(f"    variant failed: {type(error).__name__}: {str(error)[:120]}")
        return None, None
    return statistics.median(times[0]), statistics.median(times[1])


def graphs_both_ways(fn, variant, repeats, rounds=5):
    """(default, variant): medians of fn's graphed time as it is and inside the
    context manager variant(), the two graphs replayed in alternating rounds so
    that drift on the device touches both alike."""
    graphs = []
    try:
        for context in (contextlib.nullcontext, variant):
            with context(), torch.no_grad():
                fn()  # anything made on first use (a second stream) is made outside the capture
                graphs.append(capture_graph(fn))
    except Exception as error:  # noqa: BLE001 - report and go on
        print(f"    graph capture failed: {type(error).__name__}: {str(error)[:120]}")
        return None, None
    times = [[], []]
    for _ in range(rounds):
        for slot, graph in enumerate(graphs):
            times[slot].append(time_cuda(graph.replay, repeats))
    return statistics.median(times[0]), statistics.median(times[1])


def kernel_times(fn, label, calls=10):
    """(label, kernel name, mean GPU microseconds per call) for each kernel fn
    launches; [] when the profiler cannot see the GPU."""
    try:
        from torch.profiler import ProfilerActivity, profile

        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
        rows = []
        for event in prof.key_averages():
            total = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
            if total > 0:
                rows.append((label, event.key[:90].replace("|", "/"), total / calls))
        return sorted(rows, key=lambda r: -r[2])
    except Exception as error:  # noqa: BLE001 - the table goes on without it
        print(f"    profiler failed: {type(error).__name__}: {str(error)[:120]}")
        return []


def host_time_per_call(fn, profile_path, calls=200):
    """Microseconds of wall time per eager call (no grad) over back-to-back
    calls with one synchronisation at the end: the host's cost per call where it
    exceeds the kernels'. Also writes a cProfile of such calls to profile_path."""
    import cProfile
    import pstats

    with torch.no_grad():
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        per_call = (time.perf_counter() - start) / calls * 1e6
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        profiler.disable()
    with open(profile_path, "w") as fh:
        fh.write(f"{calls} eager calls, no grad; {per_call:.1f} us per call unprofiled\n")
        pstats.Stats(profiler, stream=fh).strip_dirs().sort_stats("tottime").print_stats(30)
    return per_call


def mask_mod_for(pattern, layout, device):
    """FlexAttention mask_mod equal to the layout (tested against it below)."""
    w = layout.width
    if pattern == "axial":
        return lambda b, h, qi, kj: (qi // w == kj // w) | (qi % w == kj % w)
    if pattern == "block":
        bs = layout.params["block_size"]
        return lambda b, h, qi, kj: ((qi // w) // bs == (kj // w) // bs) & ((qi % w) // bs == (kj % w) // bs)
    if pattern in ("longformer", "strided"):
        r = layout.params["kernel_size"] // 2

        def window(qi, kj):
            return ((qi // w - kj // w).abs() <= r) & ((qi % w - kj % w).abs() <= r)

        if pattern == "strided":
            s = layout.params["stride"]
            return lambda b, h, qi, kj: window(qi, kj) | (((qi // w - kj // w) % s == 0) & ((qi % w - kj % w) % s == 0))
        is_global = torch.zeros(layout.num_tokens, dtype=torch.bool, device=device)
        is_global[torch.from_numpy(global_tokens(layout.num_tokens, layout.params["num_global_tokens"]))] = True
        return lambda b, h, qi, kj: window(qi, kj) | is_global[qi] | is_global[kj]
    if pattern == "dilated":  # custom_layouts.dilated_7_by_2
        def dilated(b, h, qi, kj):
            dy, dx = qi // w - kj // w, qi % w - kj % w
            return (dy.abs() <= 6) & (dx.abs() <= 6) & (dy % 2 == 0) & (dx % 2 == 0)

        return dilated
    if pattern == "neighborhood":  # NATTEN's window, slid inward at the edges
        k, height = NEIGHBORHOOD, layout.height

        def neighborhood(b, h, qi, kj):
            top = (qi // w - k // 2).clamp(0, height - k)
            left = (qi % w - k // 2).clamp(0, w - k)
            dy, dx = kj // w - top, kj % w - left
            return (dy >= 0) & (dy < k) & (dx >= 0) & (dx < k)

        return neighborhood
    dense = torch.from_numpy(layout.to_dense()).to(device)
    return lambda b, h, qi, kj: dense[qi, kj]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    parser.add_argument("--sides", default="64,128")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--patterns", default=",".join(PATTERNS))
    parser.add_argument("--flex-patterns", default="axial,longformer,block",
                        help="patterns to run FlexAttention on (each costs a compile)")
    parser.add_argument("--flex-sides", default="64,128", help="sides to run FlexAttention at")
    parser.add_argument("--segment-keys", default="256",
                        help="other segment lengths of the long rows (LONGFORMER's global token) "
                             "to time the graphed forward with, besides the default")
    parser.add_argument("--host-sides", default="64",
                        help="sides whose eager calls are timed back to back for the host's cost per call")
    parser.add_argument("--profile-sides", default="128",
                        help="sides whose forward is broken down per kernel (torch.profiler)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    print(f"device: {name}, torch {torch.__version__}", flush=True)
    flex = None
    if not args.no_flex:
        try:
            from torch import _dynamo
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            # one compile per (mask, shape, grad mode); the default limit of 8
            # would silently fall back to the unfused, N x N implementation
            _dynamo.config.recompile_limit = 256
            _dynamo.config.cache_size_limit = 256
            flex = torch.compile(flex_attention, dynamic=False)
        except Exception as error:  # noqa: BLE001 - record why the peer is missing
            print(f"FlexAttention unavailable: {error}")
    rows, raw, kernel_rows = [], [], []
    flex_sides = {int(x) for x in args.flex_sides.split(",") if x}
    profile_sides = {int(x) for x in args.profile_sides.split(",") if x}
    host_sides = {int(x) for x in args.host_sides.split(",") if x}
    batch, heads, dim, dtype = 1, 8, 64, torch.bfloat16
    for side in (int(s) for s in args.sides.split(",")):
        n = side * side
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(batch, heads, n, dim, device=device, dtype=dtype, generator=gen)
                   .requires_grad_(True) for _ in range(3))
        grad = torch.randn_like(q)

        def fwd_bwd(fn):
            def run():
                out = fn()
                torch.autograd.backward(out, grad)
            return run

        with torch.no_grad():
            sdpa_fwd = time_cuda(lambda: F.scaled_dot_product_attention(q, k, v), args.repeats)
            sdpa_graph = time_graph(lambda: F.scaled_dot_product_attention(q, k, v), args.repeats)
        sdpa_fb = time_cuda(fwd_bwd(lambda: F.scaled_dot_product_attention(q, k, v)), args.repeats)
        print(f"{side}x{side} dense SDPA: fwd {sdpa_fwd:.3f} ms, fwd+bwd {sdpa_fb:.3f} ms", flush=True)
        for pattern in args.patterns.split(","):
            t0 = time.time()
            layout = layout_of(pattern, side)
            t_plan = time.perf_counter()
            plan = layout.tile_plan()
            plan_s = time.perf_counter() - t_plan
            passes = 0 if plan is None else len(plan)
            with torch.no_grad():
                ours_fwd = time_cuda(lambda: sparse_attention(q, k, v, layout), args.repeats)
            ours_fb = time_cuda(fwd_bwd(lambda: sparse_attention(q, k, v, layout)), args.repeats)
            with torch.no_grad():
                ours_graph = time_graph(lambda: sparse_attention(q, k, v, layout), args.repeats)
            # the general tensor-core kernel on the same call (bias, dropout and
            # statistics need it; this call would otherwise take the lean one)
            os.environ["SPARSE_ATTENTION_TILED_KERNEL"] = "general"
            try:
                with torch.no_grad():
                    general_graph = time_graph(lambda: sparse_attention(q, k, v, layout), args.repeats)
            finally:
                del os.environ["SPARSE_ATTENTION_TILED_KERNEL"]
            # the switches of the planned forward, each timed as it is and flipped
            switch_graphs = {}
            call = lambda: sparse_attention(q, k, v, layout)  # noqa: E731
            if layout.tile_plan() is not None and len(layout.tile_plan().long_rows):
                switch_graphs["long_rows_beside flipped"] = graphs_both_ways(
                    call, flip_module_switch("long_rows_beside"), args.repeats)
                for keys in (int(x) for x in args.segment_keys.split(",") if x):
                    switch_graphs[f"{keys} keys per long-row segment"] = graphs_both_ways(
                        call, set_module_value("split_segment_keys", keys), args.repeats)
            if layout.tile_plan() is not None:
                # forward+backward, eager: the tensor-core backward against the row and column kernels
                switch_graphs["fwd+bwd (eager), use_tiled_cuda_backward flipped"] = eager_both_ways(
                    fwd_bwd(call), flip_module_switch("use_tiled_cuda_backward"), args.repeats)
                # what EnhancedSparseAttention trains with by default: a learnable
                # relative position bias (clamp 32) and dropout 0.1; the extras
                # switch takes that backward to tensor cores too
                table = torch.zeros(heads, 65, 65, device=device, dtype=dtype, requires_grad=True)
                training = lambda: sparse_attention(q, k, v, layout, rel_pos_bias=table,  # noqa: E731
                                                    dropout_p=0.1)
                switch_graphs["fwd+bwd with bias and dropout (eager), use_tiled_cuda_backward_extras "
                              "flipped"] = eager_both_ways(
                    fwd_bwd(training), flip_module_switch("use_tiled_cuda_backward_extras"), args.repeats)
            if layout.tile_plan() is not None and len(layout.tile_plan()) > 1:
                switch_graphs["overlap_passes flipped"] = graphs_both_ways(
                    call, flip_module_switch("overlap_passes"), args.repeats)
                # with statistics (the module tracks them by default): the passes
                # merging them on tensor cores, or the whole forward on the row kernels
                stats_call = lambda: sparse_attention(q, k, v, layout, return_stats=True)  # noqa: E731
                switch_graphs["forward with statistics, merge_stats_cuda_passes flipped"] = graphs_both_ways(
                    stats_call, flip_module_switch("merge_stats_cuda_passes"), args.repeats)
            host_us = None
            if side in host_sides:
                host_us = host_time_per_call(call, os.path.join(args.out, f"host_profile_{side}_{pattern}.txt"))
            if side in profile_sides:
                with torch.no_grad():
                    kernel_rows.extend(kernel_times(lambda: sparse_attention(q, k, v, layout),
                                                    f"{side}x{side} {pattern}"))
            # the same op without the tensor-core forward (the lanes-over-keys kernels)
            _torch_ops.use_tiled_cuda_kernel = False
            try:
                with torch.no_grad():
                    lanes_fwd = time_cuda(lambda: sparse_attention(q, k, v, layout), args.repeats)
                    lanes_graph = time_graph(lambda: sparse_attention(q, k, v, layout), args.repeats)
            finally:
                _torch_ops.use_tiled_cuda_kernel = True
            flex_fwd = flex_fb = None
            flex_note = ""
            if flex is not None and pattern in args.flex_patterns.split(",") and side in flex_sides:
                try:
                    block_mask = create_block_mask(mask_mod_for(pattern, layout, device), None, None,
                                                   n, n, device=device)
                    check = flex(q[:, :1, :512].float(), k[:, :1].float(), v[:, :1].float(),
                                 block_mask=create_block_mask(mask_mod_for(pattern, layout, device),
                                                              None, None, 512, n, device=device))
                    ours = sparse_attention(q[:, :1].float(), k[:, :1].float(), v[:, :1].float(), layout)[:, :, :512]
                    flex_note = f"max |flex - ours| {((check - ours).abs().max().item()):.1e}"
                    with torch.no_grad():
                        flex_fwd = time_cuda(lambda: flex(q, k, v, block_mask=block_mask), args.repeats)
                    flex_fb = time_cuda(fwd_bwd(lambda: flex(q, k, v, block_mask=block_mask)), args.repeats)
                except Exception as error:  # noqa: BLE001
                    flex_note = f"failed: {type(error).__name__}: {str(error)[:120]}"
            record = dict(side=side, tokens=n, pattern=pattern, density=layout.density,
                          nnz=layout.nnz, sdpa_fwd_ms=sdpa_fwd, sdpa_fwd_bwd_ms=sdpa_fb,
                          ours_fwd_ms=ours_fwd, ours_fwd_bwd_ms=ours_fb, flex_fwd_ms=flex_fwd,
                          lanes_fwd_ms=lanes_fwd, plan_passes=passes, plan_build_s=plan_s,
                          sdpa_graph_fwd_ms=sdpa_graph, ours_graph_fwd_ms=ours_graph,
                          general_graph_fwd_ms=general_graph, lanes_graph_fwd_ms=lanes_graph,
                          switch_defaults=dict(long_rows_beside=_torch_ops.long_rows_beside,
                                               overlap_passes=_torch_ops.overlap_passes,
                                               use_tiled_cuda_backward=_torch_ops.use_tiled_cuda_backward,
                                               tiled_backward_long_rows=_torch_ops.tiled_backward_long_rows,
                                               use_tiled_cuda_backward_extras=(
                                                   _torch_ops.use_tiled_cuda_backward_extras),
                                               merge_stats_cuda_passes=_torch_ops.merge_stats_cuda_passes),
                          switch_graph_fwd_ms=switch_graphs, host_us_per_eager_call=host_us,
                          flex_fwd_bwd_ms=flex_fb, flex_note=flex_note, device=name)
            raw.append(record)
            write_tables(args, name, raw, kernel_rows)
            print(f"  {pattern:10s} density {layout.density:.4f}: ours fwd {ours_fwd:.3f} ms "
                  f"({sdpa_fwd / ours_fwd:.1f}x SDPA), fwd+bwd {ours_fb:.3f} ms "
                  f"({sdpa_fb / ours_fb:.1f}x); lanes kernel fwd {lanes_fwd:.3f} ms; graphed fwd: "
                  f"SDPA {sdpa_graph}, ours {ours_graph}, general kernel {general_graph}, lanes {lanes_graph}; plan {passes} "
                  f"pass(es) built in {plan_s:.2f} s; flex fwd {flex_fwd} fwd+bwd {flex_fb} {flex_note} "
                  f"[{time.time() - t0:.0f}s]", flush=True)

    print("\n".join(write_tables(args, name, raw, kernel_rows)))


def write_tables(args, name, raw, kernel_rows):
    """gpu_bench.md / .json from the records so far (rewritten after each one,
    so a run cut short keeps what it measured)."""
    def fmt(x):
        return "n/a" if x is None else f"{x:.3f}"

    lines = [f"GPU: {name}; bf16, B=1, 8 heads, D=64; median of {args.repeats}, CUDA events.", "",
             "ours = the default path (the lean tensor-core forward where a tile plan exists); "
             "general = the same call on the general tensor-core kernel; lanes = the same op with "
             "the tensor-core forward switched off.", "",
             "| tokens | pattern | density | plan passes | SDPA fwd ms | ours fwd ms | lanes fwd ms | "
             "flex fwd ms | SDPA/ours fwd | SDPA f+b ms | ours f+b ms | flex f+b ms | SDPA/ours f+b |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in raw:
        lines.append(f"| {r['side']}x{r['side']} | {r['pattern']} | {r['density']:.4f} | "
                     f"{r['plan_passes']} | {fmt(r['sdpa_fwd_ms'])} | {fmt(r['ours_fwd_ms'])} | "
                     f"{fmt(r['lanes_fwd_ms'])} | {fmt(r['flex_fwd_ms'])} | "
                     f"{r['sdpa_fwd_ms'] / r['ours_fwd_ms']:.2f}x | {fmt(r['sdpa_fwd_bwd_ms'])} | "
                     f"{fmt(r['ours_fwd_bwd_ms'])} | {fmt(r['flex_fwd_bwd_ms'])} | "
                     f"{r['sdpa_fwd_bwd_ms'] / r['ours_fwd_bwd_ms']:.2f}x |")
    lines += ["", "Forward replayed from a CUDA graph (GPU time without Python and launch overhead), ms:",
              "", "| tokens | pattern | SDPA | ours | general kernel | lanes kernel | SDPA/ours |",
              "|---|---|---|---|---|---|---|"]
    for r in raw:
        ratio = (f"{r['sdpa_graph_fwd_ms'] / r['ours_graph_fwd_ms']:.2f}x"
                 if r["sdpa_graph_fwd_ms"] and r["ours_graph_fwd_ms"] else "n/a")
        lines.append(f"| {r['side']}x{r['side']} | {r['pattern']} | {fmt(r['sdpa_graph_fwd_ms'])} | "
                     f"{fmt(r['ours_graph_fwd_ms'])} | {fmt(r['general_graph_fwd_ms'])} | "
                     f"{fmt(r['lanes_graph_fwd_ms'])} | {ratio} |")
    switched = [r for r in raw if r.get("switch_graph_fwd_ms")]
    if switched:
        lines += ["", "Graphed forward (forward+backward eager where the row says so) as it is (default) "
                  "and with one change, the two replayed in 5 alternating rounds, median of the rounds, "
                  "ms. long_rows_beside: LONGFORMER's global "
                  "rows on a second stream beside the passes; overlap_passes: a merging pass starts while "
                  "the one before it drains; keys per long-row segment: the split of a global row; "
                  "use_tiled_cuda_backward: the backward on tensor cores (timed eager, forward+backward); "
                  "use_tiled_cuda_backward_extras: that backward also for calls with a bias (clamp 32) and "
                  "dropout 0.1, as the module trains; merge_stats_cuda_passes: statistics over AXIAL's "
                  "two passes on tensor cores instead of the whole forward on the row kernels; "
                  "Defaults: "
                  + ", ".join(f"{k} {v}" for k, v in switched[0]["switch_defaults"].items())
                  + f", {_torch_ops.split_segment_keys} keys per segment.",
                  "", "| tokens | pattern | change | ms as default | ms changed | changed / default |",
                  "|---|---|---|---|---|---|"]
        for r in switched:
            for change, (as_is, changed) in r["switch_graph_fwd_ms"].items():
                ratio = f"{changed / as_is:.3f}" if as_is and changed else "n/a"
                lines.append(f"| {r['side']}x{r['side']} | {r['pattern']} | {change} | "
                             f"{fmt(as_is)} | {fmt(changed)} | {ratio} |")
    hosts = [r for r in raw if r.get("host_us_per_eager_call")]
    if hosts:
        lines += ["", "Eager forward calls (no grad) back to back, one synchronisation at the end: wall "
                  "time per call, the host's cost where it exceeds the GPU's (graphed forward beside it), us:",
                  "", "| tokens | pattern | us per eager call | graphed forward us |", "|---|---|---|---|"]
        for r in hosts:
            graphed = "n/a" if r["ours_graph_fwd_ms"] is None else f"{r['ours_graph_fwd_ms'] * 1e3:.1f}"
            lines.append(f"| {r['side']}x{r['side']} | {r['pattern']} | {r['host_us_per_eager_call']:.1f} | "
                         f"{graphed} |")
    if kernel_rows:
        lines += ["", "GPU time per kernel of one forward call (torch.profiler, mean of the calls), us:",
                  "", "| call | kernel | us |", "|---|---|---|"]
        lines += [f"| {call} | {kernel} | {us:.1f} |" for call, kernel, us in kernel_rows]
    with open(os.path.join(args.out, "gpu_bench.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "gpu_bench.json"), "w") as fh:
        json.dump(dict(records=raw, kernels=kernel_rows), fh, indent=1)
    return lines

if __name__ == "__main__":
    main()
