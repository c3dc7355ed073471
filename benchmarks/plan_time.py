"""What a layout costs before its first CPU call: building it, then choosing
its kernels (stencil checks, tile plans), at each thread count.

    python benchmarks/plan_time.py [--sides 128,256] [--patterns axial,strided,random]
                                   [--threads 1,2] [--repeats 3] [--trees DIR,DIR] [--out DIR]

Layouts and plans are cached per process, so every measurement runs in a
fresh interpreter: one per (side, thread count, repeat), building each
pattern in turn. RANDOM uses attention_ratio 0.01. ``--trees`` compares
checkouts (each a directory holding a built ``sparse_attention``; by default
this one), measured in alternation. Prints the median seconds
of the build and of the choice, and the route taken; with ``--out`` writes
``plan_time.md``."""

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from markdown_table import MarkdownTable  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

CHILD = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
import sparse_attention as sa
from sparse_attention import _stencil, build_layout
sa.set_num_threads(int(sys.argv[2]))
side, found = int(sys.argv[3]), {}
for pattern in sys.argv[4].split(","):
    start = time.perf_counter()
    layout = build_layout(pattern, side, side, attention_ratio=0.01)
    built = time.perf_counter()
    route = _stencil.cpu_route_name(layout)
    found[pattern] = (built - start, time.perf_counter() - built, route)
print(json.dumps(found))
"""


def describe(tree):
    """A checkout by its commit (and whether it has changes), not by where it lies."""
    found = subprocess.run(["git", "-C", tree, "describe", "--always", "--dirty"], capture_output=True, text=True)
    return found.stdout.strip() or "(not a git checkout)"


def measure(side, threads, patterns, root=ROOT):
    result = subprocess.run([sys.executable, "-c", CHILD, root, str(threads), str(side), ",".join(patterns)],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", default="128,256")
    parser.add_argument("--patterns", default="axial,strided,random")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trees", default=None, help="checkouts to compare, comma-separated (default: this one)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    sides = [int(s) for s in args.sides.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    patterns = args.patterns.split(",")
    if args.repeats < 1 or min(sides) < 1 or min(threads) < 1:
        raise SystemExit("--repeats, --sides and --threads must be at least 1")
    trees = args.trees.split(",") if args.trees else [ROOT]
    named = len(trees) > 1
    lines = [f"seconds, median of {args.repeats} fresh processes; RANDOM at attention_ratio 0.01", ""]
    if named:
        lines += [f"tree {k}: {describe(tree)}" for k, tree in enumerate(trees)] + [""]
    lines += ["| grid | pattern | threads |" + (" tree |" if named else "") + " build (s) | kernel choice (s) | route |",
              "|---|---|---|" + ("---|" if named else "") + "---|---|---|"]
    table = MarkdownTable(lines, args.out, "plan_time.md")
    for side in sides:
        runs = {(t, k): [] for t in threads for k in range(len(trees))}
        for repeat in range(args.repeats):
            for t in threads:  # alternating, so drift falls on every thread count and tree alike
                for k, tree in enumerate(trees):
                    runs[t, k].append(measure(side, t, patterns, tree))
                print(f"# {side}x{side}, {t} threads, repeat {repeat + 1}/{args.repeats}", file=sys.stderr,
                      flush=True)
        for pattern in patterns:
            for t in threads:
                for k in range(len(trees)):
                    build = statistics.median(run[pattern][0] for run in runs[t, k])
                    choice = statistics.median(run[pattern][1] for run in runs[t, k])
                    table.add(f"| {side}x{side} | {pattern} | {t} |" + (f" {k} |" if named else "") +
                              f" {build:.3f} | {choice:.3f} | {runs[t, k][0][pattern][2]} |")
    table.write()


if __name__ == "__main__":
    main()
