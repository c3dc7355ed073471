"""The CPU benchmark's bookkeeping: paired timing and the files it writes."""

import json
import re

import pytest

from sparse_attention import bench


class FakeClock:
    """perf_counter for bench.time: it moves only when a timed function says so."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


def test_timed_pair_alternates_and_takes_the_median_of_per_round_ratios(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(bench.time, "perf_counter", clock.perf_counter)
    calls = []
    # the machine slows down after round 1, for both sides: the per-round ratios (2, 3, 2)
    # keep the rounds apart, where the ratio of the medians (30 / 10) would mix them
    a_costs, b_costs = iter([0, 2, 30, 40]), iter([0, 1, 10, 20])  # the first of each warms up

    def fn_a():
        calls.append("a")
        clock.now += next(a_costs)

    def fn_b():
        calls.append("b")
        clock.now += next(b_costs)

    median_a, median_b, ratio = bench.timed_pair(fn_a, fn_b, repeats=3)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then order flips per round
    assert (median_a, median_b, ratio) == (30, 10, 2)


def test_bench_writes_tables_with_paired_dense_ratios(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "fma_peak", lambda threads: None)
    bench.main(["--sides", "8", "--patterns", "block,longformer", "--repeats", "2", "--no-flex",
                "--no-module", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "cpu_bench.json").read_text())
    rows = data["records"]
    assert [r["pattern"] for r in rows] == ["block", "longformer"]
    for row in rows:
        fwd_ratio, both_ratio = row["ours_paired_ratio"]
        assert fwd_ratio > 0 and both_ratio > 0
        assert row["flop_bound_fraction_fwd"] == pytest.approx(row["density"] / fwd_ratio)
        assert row["dense"][:2] != row["dense_at_start"][:2]  # dense timed again beside ours
    table = (tmp_path / "cpu_bench.md").read_text()
    assert f"| 8x8 | block | {rows[0]['density']:.4f} | {rows[0]['ours_paired_ratio'][0]:.2f}x |" in table
    assert (tmp_path / "cpu_bench.png").stat().st_size > 0


def test_core_sharing_warning_follows_the_probes_scaling():
    assert bench.core_sharing_warning({"threads_1": 110.0, "threads_2": 220.0}, 2) is None
    assert bench.core_sharing_warning({"threads_1": 110.0, "threads_2": 190.0}, 2) is None  # 1.73x: 86%
    warning = bench.core_sharing_warning({"threads_1": 110.0, "threads_2": 132.0}, 2)
    assert "1.20x faster on 2 threads" in warning
    assert bench.core_sharing_warning({"threads_1": 110.0}, 1) is None
    assert bench.core_sharing_warning(None, 2) is None


def test_bench_probes_the_cores_at_both_ends_and_warns(tmp_path, monkeypatch):
    readings = iter([{"threads_1": 100.0, "threads_2": 199.0}, {"threads_1": 100.0, "threads_2": 121.0}])
    monkeypatch.setattr(bench, "fma_peak", lambda threads: next(readings))
    bench.main(["--sides", "8", "--patterns", "block", "--repeats", "1", "--threads", "2", "--no-flex",
                "--no-module", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "cpu_bench.json").read_text())
    assert data["fma_peak"]["threads_2"] == 199.0 and data["fma_peak_end"]["threads_2"] == 121.0
    assert len(data["warnings"]) == 1 and "1.21x faster on 2 threads" in data["warnings"][0]
    assert "- Warning: the FMA probe ran 1.21x faster" in (tmp_path / "cpu_bench.md").read_text()


def test_bench_skips_the_pairing_past_its_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "fma_peak", lambda threads: None)
    bench.main(["--sides", "8", "--patterns", "block", "--repeats", "1", "--no-flex", "--no-module",
                "--pair-limit", "0", "--out", str(tmp_path)])
    row = json.loads((tmp_path / "cpu_bench.json").read_text())["records"][0]
    assert "ours_paired_ratio" not in row and "dense_at_start" not in row
    assert row["flop_bound_fraction_fwd"] == pytest.approx(
        row["density"] / (row["ours"][0] / row["dense"][0]))


def test_ab_builds_times_two_copies_of_the_package_side_by_side():
    """benchmarks/ab_builds.py imports two builds under other package names and
    times them against each other: an A/A call on the package as built runs
    and reports identical outputs for every pattern and direction."""
    import os
    import subprocess
    import sys

    import sparse_attention

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    package = os.path.dirname(os.path.abspath(sparse_attention.__file__))
    result = subprocess.run(
        [sys.executable, os.path.join(root, "benchmarks", "ab_builds.py"), package, package,
         "--patterns", "axial,longformer", "--side", "8", "--rounds", "3", "--threads", "1", "--backward"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 4  # two patterns, forward and forward+backward
    for line in lines:
        match = re.search(r"new/old (\d+\.\d+) .*max \|out diff\| (\S+)\)", line)
        assert match, line
        assert float(match.group(2)) == 0.0


def test_gpu_module_step_script_runs_on_the_cpu(tmp_path):
    """benchmarks/gpu_module_step.py waits for a GPU; its --device cpu smoke
    run keeps it from rotting meanwhile: it writes both files, a row per
    pattern."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "benchmarks", "gpu_module_step.py")
    done = subprocess.run([sys.executable, script, "--device", "cpu", "--side", "6", "--channels", "16",
                           "--batch", "1", "--repeats", "1", "--rounds", "1", "--patterns", "axial,block",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=root))
    assert done.returncode == 0, done.stderr[-2000:]
    records = json.loads((tmp_path / "module_step.json").read_text())
    assert [r["pattern"] for r in records] == ["axial", "block"]
    assert all(r["extras_on_ms"] > 0 and r["extras_off_ms"] > 0 for r in records)
    assert "| axial |" in (tmp_path / "module_step.md").read_text()


def test_torch_path_forms_script_prints_a_row_per_pattern():
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "benchmarks", "torch_path_forms.py")
    done = subprocess.run([sys.executable, script, "--side", "6", "--rounds", "1", "--patterns", "random,axial"],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=root))
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| RANDOM") or line.startswith("| AXIAL")]
    assert len(rows) == 2
    for row in rows:
        assert len(re.findall(r"\d+\.\d\dx", row)) == 4, row


def run_script(name, *args):
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, os.path.join(root, "benchmarks", name), *args], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONPATH=root))
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_compile_step_script_reports_a_whole_graph():
    out = run_script("compile_step.py", "--cases", "5:axial", "--rounds", "1", "--backend", "aot_eager")
    assert re.search(r"axial 5x5: eager [\d.]+ ms, compiled [\d.]+ ms, eager/compiled [\d.]+, graph breaks 0",
                     out), out


def test_torch_path_dropout_script_counts_what_backward_keeps():
    recompute = run_script("torch_path_dropout.py", "random", "16", "train")
    keep = run_script("torch_path_dropout.py", "random", "16", "train", "keep")
    kept = [float(re.search(r"saved for backward ([\d.]+) MiB", out).group(1)) for out in (recompute, keep)]
    # q, k, v: 1.5 MiB; the scores of every pair of the 16 x 16 grid: 4 MiB
    assert kept[0] <= 1.6 and kept[1] >= 4.0, kept
    assert "random 16 infer" in run_script("torch_path_dropout.py", "random", "16", "infer")


def test_cpu_kernel_choice_script_writes_a_row_per_layout(tmp_path):
    out = run_script("cpu_kernel_choice.py", "--rounds", "1", "--out", str(tmp_path), "axial:4",
                     "random:12:attention_ratio=0.02")
    table = (tmp_path / "cpu_kernel_choice.md").read_text()
    for spec, fill, taken in (("axial:4", "0.438", "tiles"), ("random:12:attention_ratio=0.02", r"0\.\d+", "rows")):
        row = rf"\| {re.escape(spec)} \| \d+ \| [\d.]+ \| {fill} \| [\d.]+ \| [\d.]+ \| [\d.]+ \| {taken}( \(slower\))? \|"
        assert re.search(row, out) and re.search(row, table), (row, out)


def test_gather_rows_script_compares_blocks_whole_rows_generic_and_dense(tmp_path):
    out = run_script("gather_rows.py", "--sides", "12", "--ratios", "0.1", "--dims", "8", "--heads", "1",
                     "--rounds", "1", "--out", str(tmp_path))
    row = r"\| 12x12 \| 0\.1 \| 8 \| rows \| no( \| [\d.]+){8} \|"
    assert re.search(row, out) and re.search(row, (tmp_path / "gather_rows.md").read_text()), out


def test_gather_bias_script_times_the_step_with_and_without_a_bias():
    out = run_script("gather_bias.py", "--side", "12", "--ratio", "0.2", "--dim", "8", "--heads", "1",
                     "--rounds", "1")
    assert re.search(r"RANDOM 0\.2 at 12x12, D=8, 1 heads, nnz \d+: forward\+backward \d+ ms without a bias, "
                     r"\d+ ms with one; peak RSS \d+ MB", out), out


def test_gather_ranges_script_compares_sized_ranges_with_1024_rows():
    out = run_script("gather_ranges.py", "--cases", "1x1x12,2x1x9", "--ratio", "0.3", "--dim", "8",
                     "--rounds", "1")
    assert "| 1x1x12 | 3 / 1 |" in out and "| 2x1x9 | 2 / 1 |" in out, out
    assert len(re.findall(r"\| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \|$", out, flags=re.MULTILINE)) == 2, out


def test_small_maps_script_compares_every_pattern_with_dense():
    out = run_script("small_maps.py", "--side", "5", "--batch", "1", "--rounds", "1", "--patterns", "axial,random")
    for pattern in ("axial", "random"):
        assert re.search(rf"\| {pattern} \| [\d.]+ \| (tiles|rows|stencil|split) \| [\d.]+x \| [\d.]+ "
                         rf"\| [\d.]+x \| [\d.]+ \|", out), out


def test_custom_layouts_script_times_every_family_against_dense(tmp_path):
    out = run_script("custom_layouts.py", "--sides", "8", "--rounds", "1", "--rules",
                     "dilated_7_by_2,checkerboard_16", "--out", str(tmp_path))
    ratio = r"[\d.]+ / [\d.]+"
    # the dilated window is a stencil: all three families; the checkerboard's
    # blocks shift no offsets at 16 a side, but on an 8 x 8 grid it is one block, a stencil too
    for rule in ("dilated_7_by_2", "checkerboard_16"):
        assert re.search(rf"\| {rule} \| 8x8 \| [\d.]+ \| {ratio} \| {ratio} \| {ratio} \| "
                         rf"(stencil \((window|strip)\)|tiles|rows) \| (stencil|tiles|rows) \|", out), out
    assert (tmp_path / "custom_layouts.md").read_text().count("| 8x8 |") == 2


def test_strip_bias_backward_script_compares_with_what_ran_before():
    out = run_script("strip_bias_backward.py", "--rounds", "1", "--sides", "10")
    assert re.search(r"\| strided 10x10 \| (tiles|rows) \| [\d.]+ \| [\d.]+-[\d.]+ \|", out), out
    assert re.search(r"\| dilated_7_by_2 64x64 \| rows \| [\d.]+ \|", out), out


def test_clamped_window_script_compares_with_what_ran_before(tmp_path):
    out = run_script("clamped_window.py", "--sides", "9,16", "--kernels", "5", "--rounds", "1", "--out",
                     str(tmp_path))
    three = r"[\d.]+ / [\d.]+ / [\d.]+"
    for side, before in (("9", "tiles"), ("16", "window \\+ tiles")):
        row = rf"\| {side}x{side} \| 5 \| [\d.]+ \| {three} \| {three} \| {three} \| {three} \| {before} \|"
        assert re.search(row, out), (row, out)
    assert (tmp_path / "clamped_window.md").read_text().count("| 5 |") == 2


def test_window_or_tiles_script_times_the_three_families(tmp_path):
    out = run_script("window_or_tiles.py", "--cases", "7:7,10:7", "--rounds", "1", "--out", str(tmp_path))
    assert re.search(r"\| 7x7 \| 7 \| 1\.00 \| 0\.88 \| stencil( \| [\d.]+){3} \| tiles \|", out), out
    assert re.search(r"\| 10x10 \| 7 \| 0\.49 \| 0\.67 \| clamped( \| [\d.]+){3} \| stencil \|", out), out
    assert (tmp_path / "window_or_tiles.md").read_text().count("| 7 |") == 2


def test_natten_script_checks_agreement_and_says_what_natten_refuses(tmp_path):
    pytest.importorskip("natten")
    out = run_script("natten_cpu.py", "--cases", "7:2:1,14:2:2,16:2:1:3", "--batch", "1", "--rounds", "1", "--out",
                     str(tmp_path))
    for grid, dilation, stride, route in (("7x7", 1, 1, "tiles"), ("14x14", 2, 1, "window"),
                                          ("16x16", 1, 3, "tiles")):
        # agreement under 1e-4, times for each op, ratios; NATTEN's backward may be refused ("-")
        row = (rf"\| {grid} \| 2 \| {dilation} \| {stride} \| {route} \| [\d.]+e-\d\d \| [\d.]+ / [\d.]+ \| [\d.]+ / ([\d.]+|-) "
               rf"\| [\d.]+ / [\d.]+ \| [\d.]+ / ([\d.]+|-) \| [\d.]+ / [\d.]+ \|")
        assert re.search(row, out), (row, out)
    assert (tmp_path / "natten_cpu.md").read_text().count("x") >= 3


def test_natten_script_refuses_bad_cases():
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "natten_cpu.py")
    for cases, message in (("7:2", "SIDE:HEADS:DILATION"), ("13:2:2", "SIDE >= 7 * DILATION"),
                           ("14:2:1:8", "1 <= STRIDE <= 7")):
        done = subprocess.run([sys.executable, script, "--cases", cases], capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and message in done.stderr, done.stderr


@pytest.mark.parametrize("pattern", ["axial", "block", "longformer", "strided", "random", "dilated", "cross",
                                     "neighborhood"])
def test_gpu_bench_mask_mods_equal_the_layouts(pattern):
    """FlexAttention gets the same mask as our op in the GPU benchmark: its
    mask_mod, evaluated on every pair of a small grid on the CPU, is the layout."""
    import importlib
    import os
    import sys

    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    gpu_bench = importlib.import_module("gpu_bench")
    layout = gpu_bench.layout_of(pattern, 13)
    n = layout.num_tokens
    queries, keys = torch.arange(n)[:, None], torch.arange(n)[None, :]
    mask = gpu_bench.mask_mod_for(pattern, layout, "cpu")(None, None, queries, keys)
    assert torch.equal(mask.expand(n, n), torch.from_numpy(layout.to_dense()))


@pytest.mark.parametrize("side", [14, 15, 23])
def test_the_benchmarks_dilated_neighbourhood_rule_is_neighborhood_layout(side):
    """benchmarks/custom_layouts.py writes DiNAT's layout as a rule (so that
    ab_builds.py can time earlier builds on it): the same pairs."""
    import os
    import sys

    import numpy as np

    from sparse_attention import neighborhood_layout

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    from custom_layouts import dilated_neighborhood_7_by_2

    built = dilated_neighborhood_7_by_2(side, side)
    assert np.array_equal(built.indptr, neighborhood_layout(side, side, 7, dilation=2).indptr)
    assert np.array_equal(built.indices, neighborhood_layout(side, side, 7, dilation=2).indices)
