"""The CPU kernels' software prefetches survive compilation.

GCC may find that a helper whose only statements are `__builtin_prefetch`
calls has no side effects and delete every call to it (the tiled kernels
lost their gathered-row prefetches that way, silently, for a long while:
BLOCK's forward ran 1.25x slower than with them). Each C source that asks
for prefetches is compiled to assembly with the extension's flags twice,
with and without the dead-code pass; the first must hold no fewer prefetch
instructions than the second."""

import ast
import concurrent.futures
import os
import platform
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")


def setup_compile_args():
    """setup.py's extra_compile_args as written there (setup.py itself cannot
    be imported without running setup())."""
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "extra_compile_args" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py no longer assigns extra_compile_args")


# the extension's flags without its warnings, with one clone of each kernel
# instead of three: a third of the compile time
FLAGS = [flag for flag in setup_compile_args() if not flag.startswith("-W")] + [
    "-fPIC", "-g0", "-DSA_NO_CLONES", "-march=x86-64-v3", "-I", CSRC]


def sources_with_prefetches():
    found = []
    for name in sorted(os.listdir(CSRC)):
        if name.endswith(".c"):
            with open(os.path.join(CSRC, name)) as f:
                if "__builtin_prefetch" in f.read():
                    found.append(name)
    return found


def prefetch_count(compiler, source, extra):
    result = subprocess.run([compiler, *FLAGS, *extra, "-S", source, "-o", "-"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return len(re.findall(r"^\s*prefetch", result.stdout, flags=re.MULTILINE))


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="counts x86 prefetch instructions")
@pytest.mark.parametrize("name", sources_with_prefetches())
def test_no_prefetch_is_removed_as_dead_code(name):
    compiler = shutil.which("gcc")
    source = os.path.join(CSRC, name)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        kept, without_dce = pool.map(lambda extra: prefetch_count(compiler, source, extra), ([], ["-fno-tree-dce"]))
    assert without_dce > 0
    # more may survive with the pass than without: other passes then copy a
    # loop a different number of times (unswitching, peeling)
    assert kept >= without_dce, (f"{name}: {without_dce - kept} of {without_dce} prefetch instructions "
                                 f"were removed as dead code; call __builtin_prefetch directly or "
                                 f"from an always-inline helper (SA_INLINE)")


def test_the_check_finds_the_kernels():
    assert "attention_cpu_tiled.c" in sources_with_prefetches()
    assert "-O3" in FLAGS and "-ffp-contract=fast" in FLAGS
