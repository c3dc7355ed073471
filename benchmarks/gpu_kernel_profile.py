"""One forward call per (pattern, kernel) at 128x128 tokens, bf16, B=1, 8 heads,
D=64, for a kernel profiler (Nsight Compute) to read the tensor-core kernels'
counters: the lean kernel first, then the general one on the same call.

    ncu -k regex:forward_ python benchmarks/gpu_kernel_profile.py
"""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sparse_attention import build_layout  # noqa: E402
from sparse_attention import sparse_scaled_dot_product_attention as sparse_attention  # noqa: E402


def main():
    side = int(sys.argv[1]) if len(sys.argv) > 1 else 128
    patterns = sys.argv[2].split(",") if len(sys.argv) > 2 else ["axial", "longformer", "block"]
    n = side * side
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 8, n, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
               for _ in range(3))
    with torch.no_grad():
        for pattern in patterns:
            layout = build_layout(pattern, side, side)
            for kernel in ("lean", "general"):
                if kernel == "general":
                    os.environ["SPARSE_ATTENTION_TILED_KERNEL"] = "general"
                sparse_attention(q, k, v, layout)
                torch.cuda.synchronize()
                os.environ.pop("SPARSE_ATTENTION_TILED_KERNEL", None)
                print(f"{pattern} {kernel}: done", flush=True)


if __name__ == "__main__":
    main()
