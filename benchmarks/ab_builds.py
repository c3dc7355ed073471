"""Two builds of the package timed against each other in one process.

    python benchmarks/ab_builds.py OLD_PACKAGE_DIR NEW_PACKAGE_DIR [--patterns longformer,strided]
        [--side 64] [--rounds 15] [--threads 2] [--backward] [--stats] [--dropout P] [--bias] [--module]

Each directory is a built copy of sparse_attention/ (with its _C extension).
Patterns are built-in names or ``module:name`` for a rule or a builder
(``custom_layouts:dilated_7_by_2``).
They are copied under two other package names, with the custom operators'
namespace renamed so that each copy keeps its own operators (eager calls,
which this times, do not go through them). Every round times one call of
each, the order alternating (the second call of a round finds the inputs in
the caches; always running one build second showed a false 10% gain). Prints
the median of the per-round ratios new / old; an A/A run gives about 0.98-1.03
on the 2-core development machine. With --module it times a training step of
EnhancedSparseAttention(256, 256, num_heads=8) with its defaults (relative
position bias, dropout 0.1, statistics) on a 2 x 256 x side x side map."""

import argparse
import importlib
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch


def import_copy(package_dir, name, workdir):
    target = os.path.join(workdir, name)
    shutil.copytree(package_dir, target, ignore=shutil.ignore_patterns("__pycache__"))
    for root, _, files in os.walk(target):
        for file in files:
            if file.endswith(".py"):
                path = os.path.join(root, file)
                with open(path) as f:
                    text = f.read()
                with open(path, "w") as f:
                    f.write(text.replace("sparse_attention::", f"{name}::"))
    return importlib.import_module(name)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--patterns", default="longformer,strided")
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backward", action="store_true", help="time forward+backward too")
    parser.add_argument("--stats", action="store_true", help="ask for the row statistics (as the module does)")
    parser.add_argument("--dropout", type=float, default=0.0, help="dropout_p, with a fixed seed")
    parser.add_argument("--bias", action="store_true", help="a relative position bias table (M = 16) with its gradient")
    parser.add_argument("--module", action="store_true", help="time the module's training step instead")
    args = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix="sa_ab_")
    sys.path.insert(0, workdir)
    builds = {"old": import_copy(args.old, "sa_build_old", workdir),
              "new": import_copy(args.new, "sa_build_new", workdir)}
    torch.set_num_threads(args.threads)
    for package in builds.values():
        package.set_num_threads(args.threads)
    if args.module:
        time_module_steps(builds, args)
        shutil.rmtree(workdir, ignore_errors=True)
        return

    torch.manual_seed(0)
    n = args.side * args.side
    q, k, v = (torch.randn(2, 8, n, 32, requires_grad=True) for _ in range(3))
    options = {"return_stats": args.stats}
    if args.dropout > 0:
        options.update(dropout_p=args.dropout, dropout_seed=1234)
    if args.bias:
        options.update(rel_pos_bias=torch.randn(8, 33, 33, requires_grad=True))

    def attend(package, layout):
        result = package.sparse_scaled_dot_product_attention(q, k, v, layout, **options)
        return result[0] if isinstance(result, tuple) else result

    for pattern in args.patterns.split(","):
        layouts = {tag: layout_in(p, pattern, args.side) for tag, p in builds.items()}

        def call(tag, backward):
            package, layout = builds[tag], layouts[tag]
            start = time.perf_counter()
            if backward:
                attend(package, layout).sum().backward()
            else:
                with torch.no_grad():
                    attend(package, layout)
            return time.perf_counter() - start

        for backward in ([False, True] if args.backward else [False]):
            outs = {tag: None for tag in builds}
            with torch.no_grad():  # the two builds must agree before their times mean anything
                for tag, package in builds.items():
                    outs[tag] = attend(package, layouts[tag])
            diff = (outs["old"] - outs["new"]).abs().max().item()
            what = "fwd+bwd" if backward else "fwd"
            alternate(f"{pattern} {args.side}x{args.side} {what}", lambda tag: call(tag, backward), args.rounds, diff)
            for q_ in (q, k, v):
                q_.grad = None
    shutil.rmtree(workdir, ignore_errors=True)


def layout_in(package, pattern, side):
    """A build's layout of a built-in pattern, or of ``module:name`` (a rule or
    a builder importable from here, e.g. custom_layouts:dilated_7_by_2),
    read by that build's own pattern_from_spec."""
    if ":" not in pattern:
        return package.build_layout(pattern, side, side)
    custom = importlib.import_module(package.__name__ + ".custom_layouts")
    layout = custom.layout_of(custom.pattern_from_spec(pattern), side, side)
    if not isinstance(layout, package.Layout):  # a builder makes its layouts with the package it imports
        layout = custom.layout_from_csr(side, side, layout.indptr, layout.indices, name=layout.name)
    return layout


def alternate(label, timed, rounds, diff):
    """timed(tag) -> seconds, for tag "old" and "new": a warm-up call of each,
    then `rounds` rounds in alternating order; prints the median ratio."""
    for tag in ("old", "new"):
        timed(tag)
    ratios, times = [], {"old": [], "new": []}
    for round_ in range(rounds):
        order = ("old", "new") if round_ % 2 else ("new", "old")
        took = {tag: timed(tag) for tag in order}
        for tag in took:
            times[tag].append(took[tag])
        ratios.append(took["new"] / took["old"])
    print(f"{label}: new/old {statistics.median(ratios):.3f} (old {1e3 * statistics.median(times['old']):.1f} ms, "
          f"new {1e3 * statistics.median(times['new']):.1f} ms, max |out diff| {diff:.1e})", flush=True)


def time_module_steps(builds, args):
    x = torch.randn(2, 256, args.side, args.side)
    for pattern in args.patterns.split(","):
        modules = {}
        for tag, package in builds.items():
            torch.manual_seed(0)  # the same weights in both
            modules[tag] = package.EnhancedSparseAttention(256, 256, num_heads=8, sparsity_pattern=pattern).train()

        def step(tag):
            torch.manual_seed(1)  # the same dropout seed in both
            start = time.perf_counter()
            modules[tag](x).sum().backward()
            return time.perf_counter() - start

        with torch.no_grad():
            torch.manual_seed(1)
            first = modules["old"](x)
            torch.manual_seed(1)
            diff = (first - modules["new"](x)).abs().max().item()
        alternate(f"{pattern} {args.side}x{args.side} module training step", step, args.rounds, diff)


if __name__ == "__main__":
    main()
