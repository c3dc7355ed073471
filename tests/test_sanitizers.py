"""AddressSanitizer + UndefinedBehaviorSanitizer build of the extension, run
against the kernel, bridge, layout and bad-input tests in a subprocess.

SPARSE_ATTENTION_SKIP_SANITIZERS=1 skips it (it rebuilds the C sources and
takes about a minute and a half)."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITES = ["tests/test_layout.py", "tests/test_dlpack.py", "tests/test_op.py", "tests/test_hardening.py",
          "tests/test_cpu_tiled.py", "tests/test_cpu_stencil.py", "tests/test_buffer_cache.py",
          "tests/test_custom_layouts.py", "tests/test_clamped_window.py", "tests/test_cpu_gather.py"]


def runtime(name):
    compiler = shutil.which("gcc")
    if compiler is None:
        return None
    path = subprocess.run([compiler, f"-print-file-name={name}"], capture_output=True,
                          text=True).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


@pytest.mark.skipif(os.environ.get("SPARSE_ATTENTION_SKIP_SANITIZERS") == "1", reason="skipped by request")
@pytest.mark.skipif(sys.platform != "linux" or not runtime("libasan.so") or not runtime("libubsan.so"),
                    reason="needs gcc's libasan and libubsan on Linux")
def test_suites_pass_under_address_and_undefined_behaviour_sanitizers(tmp_path):
    copy = tmp_path / "tree"
    copy.mkdir()
    for name in ("csrc", "sparse_attention", "tests"):
        shutil.copytree(os.path.join(ROOT, name), copy / name,
                        ignore=shutil.ignore_patterns("*.so", "__pycache__", "corpus"))
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(os.path.join(ROOT, name), copy / name)
    env = dict(os.environ, SPARSE_ATTENTION_SANITIZE="1", SPARSE_ATTENTION_CUDA="0")
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=copy,
                           capture_output=True, text=True, env=env)
    assert build.returncode == 0, build.stderr[-3000:]
    symbols = subprocess.run(["nm", "-D", next(str(p) for p in (copy / "sparse_attention").glob("_C*.so"))],
                             capture_output=True, text=True).stdout
    assert "__asan" in symbols and "__ubsan" in symbols, "the build is not instrumented"
    # the buffer cache off: the op's outputs come from torch's allocator, one
    # exact-size block each, so an overrun or a use after free reaches the
    # sanitizer; test_buffer_cache.py turns the cache on, whose blocks are
    # exact sizes in this build
    env = dict(os.environ, PYTHONPATH=str(copy), SPARSE_ATTENTION_BUFFER_CACHE_MB="0",
               LD_PRELOAD=f"{runtime('libasan.so')} {runtime('libubsan.so')}",
               # The quarantine keeps freed blocks out of reuse to catch use after free; by default it
               # holds up to 256 MB, which the RSS test in test_hardening.py would read as a leak.
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:quarantine_size_mb=4",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                             # the window kernels' two largest grids add minutes here and no code path;
                             # the PyTorch path's two forms run no C, and the 16-bit CPU calls run
                             # the float32 kernels the other tests run
                             *SUITES, "-k", "not distributed and not dataloader and not fork"
                             " and not (window and (size4 or size5))"
                             " and not plan_matches_its_gather_form and not half_precision"
                             # the benchmarks folder is not in the copy (and the mask_mods run no C of their own)
                             " and not flex_attention_mask_mods"
                             # the gather kernels' own choice of key blocks on heads the size of L2:
                             # the forced blocks of test_cpu_gather.py's fixture run the same code here
                             " and not key_blocks_by_themselves and not within_three_quarters_of_l2"
                             # the demo's scikit-learn and scikit-image are no C of ours
                             " and not demo_trains"],
                            cwd=copy, capture_output=True, text=True, env=env, timeout=900)
    report = result.stdout[-3000:] + result.stderr[-3000:]
    assert result.returncode == 0, report
    assert "ERROR: AddressSanitizer" not in report and "runtime error" not in report, report
