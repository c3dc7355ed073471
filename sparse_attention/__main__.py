"""python -m sparse_attention {demo, bench, info}"""

import sys

USAGE = """usage: python -m sparse_attention <command> [options]

commands:
  demo    train the README's CNN on handwritten digits, once per pattern; draw attention
  bench   benchmark against dense SDPA, masked SDPA and FlexAttention (see --help)
  info    version, build, CPU features, threads, CUDA
"""


def info():
    import os
    import platform

    from . import __version__, get_num_threads
    from ._native import C

    print(f"sparse_attention {__version__}")
    print(f"python {platform.python_version()} on {platform.machine()}, {platform.system()}")
    print(f"extension built by: {C.COMPILER}")
    print(f"CUDA kernels compiled in: {'yes' if C.WITH_CUDA else 'no'}; "
          f"CUDA devices visible to them: {C.cuda_device_count()}")
    flags = set()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
        model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                      if line.startswith("model name")), "unknown")
        print(f"CPU: {model}")
    level = "AVX-512" if "avx512f" in flags else "AVX2+FMA" if {"avx2", "fma"} <= flags else "baseline"
    print(f"CPU kernels: vector path in use: {level} (chosen at load time among AVX-512, AVX2, baseline)")
    print(f"CPU kernel threads: {get_num_threads()} (sparse_attention.set_num_threads to change)")
    try:
        import torch

        print(f"torch {torch.__version__}; torch sees a GPU: {torch.cuda.is_available()}")
    except ImportError:
        print("torch: not installed (NumPy arrays work, forward only)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from .demo import main as demo_main

        demo_main(rest)
    elif command == "bench":
        from .bench import main as bench_main

        bench_main(rest)
    elif command == "info":
        info()
    else:
        print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
