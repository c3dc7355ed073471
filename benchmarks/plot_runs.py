"""One log-log plot (forward+backward time against tokens) from several
benchmark runs, e.g. the 32x32 / 64x64 run and the 128x128 run, which are
made separately because the larger one takes longer than the rest together.

    python benchmarks/plot_runs.py OUT.png RUN_DIR [RUN_DIR ...]

Each RUN_DIR holds the cpu_bench.json of `python -m sparse_attention bench`."""

import json
import os
import sys

from sparse_attention.bench import plot


def main(argv):
    if len(argv) < 2:
        raise SystemExit(__doc__)
    out, runs = argv[0], argv[1:]
    records, machine = [], None
    for run in runs:
        with open(os.path.join(run, "cpu_bench.json")) as fh:
            data = json.load(fh)
        records.extend(data["records"])
        machine = machine or data["machine"]
    plot(records, out, machine)
    print(f"wrote {out} from {len(records)} records of {len(runs)} runs")


if __name__ == "__main__":
    main(sys.argv[1:])
