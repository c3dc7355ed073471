"""A training step of EnhancedSparseAttention as built with its defaults
(relative position bias, dropout 0.1, statistics), on a GPU in bfloat16.

    python benchmarks/gpu_module_step.py [--patterns axial,longformer] [--side 64]
        [--channels 256] [--batch 2] [--repeats 20] [--out DIR] [--device cuda]

For each pattern, forward + backward of the module is timed with its
tensor-core training path on and off, in alternating rounds, CUDA events,
median of the rounds' medians: use_tiled_cuda_backward_extras (the bias and
dropout in the tensor-core backward) and merge_stats_cuda_passes (AXIAL's
statistics on the tensor-core forward), both not yet run on a device and so
off by default. Writes module_step.md / .json under --out. With
--device cpu it runs the same steps on the CPU (a smoke test of the script:
the CPU kernels do not take bfloat16, so the PyTorch path runs)."""

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from sparse_attention import EnhancedSparseAttention, _torch_ops  # noqa: E402
from sparse_attention._native import C  # noqa: E402
from gpu_bench import set_module_value, time_cuda  # noqa: E402  (this folder)


def step_time(step, repeats, device):
    """Median ms of step(): CUDA events on a GPU (gpu_bench.time_cuda), the
    wall clock elsewhere."""
    if device.type == "cuda":
        return time_cuda(step, repeats, warmup=2)
    step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


SWITCHES = ("use_tiled_cuda_backward_extras", "merge_stats_cuda_passes")


@contextlib.contextmanager
def extras(on):
    with contextlib.ExitStack() as stack:
        for name in SWITCHES:
            stack.enter_context(set_module_value(name, on)())
        yield


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patterns", default="axial,longformer,block,strided")
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="benchmarks/gpu_results")
    args = parser.parse_args()
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    dtype = torch.bfloat16
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.channels, args.side, args.side, device=device, dtype=dtype)
    records = []
    for pattern in args.patterns.split(","):
        module = EnhancedSparseAttention(args.channels, args.channels, num_heads=8,
                                         sparsity_pattern=pattern).to(device=device, dtype=dtype).train()

        def step():
            module.zero_grad(set_to_none=True)
            module(x).float().square().mean().backward()

        times = {True: [], False: []}
        for _ in range(args.rounds):
            for on in (True, False):
                with extras(on):
                    times[on].append(step_time(step, args.repeats, device))
        on_ms, off_ms = statistics.median(times[True]), statistics.median(times[False])
        record = dict(pattern=pattern, side=args.side, channels=args.channels, batch=args.batch,
                      extras_on_ms=on_ms, extras_off_ms=off_ms, rounds_on=times[True],
                      rounds_off=times[False],
                      tiled_grad_query_passes_so_far=C.cuda_tiled_grad_query_passes(), device=name)
        records.append(record)
        print(f"{pattern:10s} step with extras {on_ms:.3f} ms, without {off_ms:.3f} ms "
              f"(without / with {off_ms / on_ms:.2f}x)", flush=True)
    lines = [f"EnhancedSparseAttention training step (defaults: bias, dropout 0.1, statistics), "
             f"bf16, x {tuple(x.shape)}, 8 heads, on {name}; median of {args.rounds} alternating "
             f"rounds of {args.repeats} steps each; on = {' and '.join(SWITCHES)}.", "",
             "| pattern | extras on ms | extras off ms | off / on |", "|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['pattern']} | {r['extras_on_ms']:.3f} | {r['extras_off_ms']:.3f} | "
                     f"{r['extras_off_ms'] / r['extras_on_ms']:.2f}x |")
    with open(os.path.join(args.out, "module_step.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "module_step.json"), "w") as f:
        json.dump(records, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
