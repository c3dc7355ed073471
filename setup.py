"""Build of sparse_attention._C: C11 sources from csrc/, and CUDA C from cuda/
when nvcc is found.

SPARSE_ATTENTION_CUDA=0 builds without CUDA, =1 makes a missing nvcc an error;
unset, CUDA is built when nvcc is found. The CUDA runtime is linked statically
(libcudart_static), so the extension imports and runs its CPU path on machines
with no GPU and no driver: the runtime looks for the driver only when a CUDA
kernel is first called.
"""
import concurrent.futures
import os
import shutil
import subprocess
import sys
import sysconfig

import numpy
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
C_SOURCES = ["csrc/module.c", "csrc/dlpack_bridge.c", "csrc/layout.c", "csrc/attention_cpu.c",
             "csrc/attention_cpu_tiled.c", "csrc/attention_cpu_stencil.c", "csrc/attention_cpu_window.c",
             "csrc/attention_cpu_gather.c", "csrc/threads.c",
             "csrc/tile_plan.c", "csrc/host_pool.c", "csrc/dropout_mask.c"]
CUDA_SOURCES = ["cuda/attention_cuda.cu", "cuda/attention_tiled.cu", "cuda/attention_tiled_lean.cu"]
CUDA_ARCHS = os.environ.get("SPARSE_ATTENTION_CUDA_ARCHS", "80;90")


def find_nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [os.path.join(home, "bin", "nvcc")] if home else []
    candidates.append(shutil.which("nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return os.path.realpath(path)
    return None


def find_cuda_home(nvcc):
    """The toolkit root holding the CUDA libraries (nvcc may be a wrapper elsewhere)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                  os.path.dirname(os.path.dirname(nvcc)), "/usr/local/cuda"]
    for home in candidates:
        if home and any(os.path.exists(os.path.join(home, sub, "libcudart_static.a"))
                        for sub in ("lib64", "lib")):
            return home
    sys.exit(f"nvcc found at {nvcc}, but no libcudart_static.a beside it; set CUDA_HOME")


def cuda_wanted():
    setting = os.environ.get("SPARSE_ATTENTION_CUDA", "").strip()
    nvcc = find_nvcc()
    if setting == "0":
        return None
    if setting == "1" and nvcc is None:
        sys.exit("SPARSE_ATTENTION_CUDA=1 but nvcc was not found (set CUDA_HOME or PATH)")
    return nvcc


def gencode_flags():
    flags = []
    archs = [a.strip() for a in CUDA_ARCHS.split(";") if a.strip()]
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    # PTX of the newest target, so later GPUs can JIT it
    flags += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
    return flags


class BuildExt(build_ext):
    def build_extensions(self):
        nvcc = cuda_wanted()
        ext = self.extensions[0]
        if nvcc:
            cuda_home = find_cuda_home(nvcc)
            objects, pending = [], []
            build_dir = os.path.join(self.build_temp, "cuda")
            os.makedirs(build_dir, exist_ok=True)
            for source in CUDA_SOURCES:
                obj = os.path.join(build_dir, os.path.basename(source) + ".o")
                objects.append(obj)
                inputs = [source] + [os.path.join("csrc", h) for h in os.listdir("csrc")
                                     if h.endswith(".h")] + [
                    os.path.join("cuda", h) for h in os.listdir("cuda") if h.endswith(".cuh")]
                if os.path.exists(obj) and all(os.path.getmtime(obj) > os.path.getmtime(f)
                                               for f in inputs):
                    continue
                cmd = [nvcc, "-c", source, "-o", obj, "-O3", "-std=c++17", "--use_fast_math",
                       "-Xcompiler", "-fPIC", "-Icsrc", "-DSA_WITH_CUDA",
                       "--expt-relaxed-constexpr"] + gencode_flags()
                print(" ".join(cmd))
                pending.append((source, subprocess.Popen(cmd, cwd=HERE)))
            # the sources compile side by side: nvcc uses one core per file
            failed = [source for source, job in pending if job.wait() != 0]
            if failed:
                sys.exit(f"nvcc failed on {', '.join(failed)}")
            ext.extra_objects = objects
            # setuptools relinks when a source or a dependency is newer than the
            # extension, not an extra object: a CPU-only build would stand
            ext.depends = list(ext.depends) + objects
            ext.define_macros.append(("SA_WITH_CUDA", "1"))
            libdir = os.path.join(cuda_home, "lib64")
            if not os.path.isdir(libdir):
                libdir = os.path.join(cuda_home, "lib")
            ext.library_dirs.append(libdir)
            ext.libraries += ["cudart_static", "dl", "rt", "pthread", "stdc++"]
        self._compile_sources_side_by_side()
        super().build_extensions()

    def _compile_sources_side_by_side(self):
        """The C sources compiled one per core (setuptools compiles an
        extension's sources one after another): each call of the compiler's
        compile() is given one source, in a pool of threads."""
        jobs = min(len(C_SOURCES), os.cpu_count() or 1)
        if jobs < 2:
            return
        one_by_one = self.compiler.compile

        def side_by_side(sources, *args, **kwargs):
            with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
                parts = list(pool.map(lambda source: one_by_one([source], *args, **kwargs), sources))
            return [obj for part in parts for obj in part]

        self.compiler.compile = side_by_side


extra_compile_args = ["-std=c11", "-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
                      "-ffp-contract=fast",
                      "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers",
                      "-Wno-cast-function-type"]
if os.environ.get("SPARSE_ATTENTION_SANITIZE"):
    extra_compile_args += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-O1",
                           "-DSA_NO_CLONES", "-DSA_EXACT_HOST_BLOCKS"]

extension = Extension(
    "sparse_attention._C",
    sources=C_SOURCES,
    include_dirs=[numpy.get_include(), "csrc"],
    depends=sorted(os.path.join("csrc", name) for name in os.listdir(os.path.join(HERE, "csrc"))
                   if name.endswith(".h")),
    extra_compile_args=extra_compile_args,
    extra_link_args=["-pthread", "-fopenmp"] + (["-fsanitize=address,undefined"]
                                    if os.environ.get("SPARSE_ATTENTION_SANITIZE") else []),
    define_macros=[("NPY_TARGET_VERSION", "NPY_1_22_API_VERSION")],
)

setup(ext_modules=[extension], cmdclass={"build_ext": BuildExt})
