"""Runs the fuzz harness (tests/fuzz/fuzz_native.py) for a bounded time over the
committed corpus. FUZZ_SECONDS overrides the default of 30 (60 until the
suite neared CI's 20 minutes; the corpus is replayed whole either way)."""

import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("atheris", reason="atheris is not installed (pip install atheris)")


def test_fuzz_layout_builder_and_argument_checks(tmp_path):
    here = os.path.dirname(os.path.abspath(__file__))
    corpus = tmp_path / "corpus"
    shutil.copytree(os.path.join(here, "fuzz", "corpus"), corpus)
    seconds = int(os.environ.get("FUZZ_SECONDS", "30"))
    root = os.path.dirname(here)
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, os.path.join(here, "fuzz", "fuzz_native.py"), f"-max_total_time={seconds}",
         "-rss_limit_mb=4096", str(corpus)],
        capture_output=True, text=True, env=env, timeout=seconds + 120)
    done = [line for line in result.stderr.splitlines() if line.startswith("Done")]
    assert result.returncode == 0, result.stderr[-3000:]
    assert done, result.stderr[-2000:]
    print(done[-1])
