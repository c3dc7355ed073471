"""A training step of the module, eager against torch.compile, on the same tensors.

    python benchmarks/compile_step.py [--cases 16:axial,64:longformer] [--rounds 15] [--backend inductor]

Times forward + backward of ``EnhancedSparseAttention(64, 64, num_heads=4)``
(B=2, float32, default options: statistics, dropout, bias), alternating eager
and compiled calls after three warm-up steps each, and prints the medians and
eager / compiled (above 1: compiling pays). Graph breaks split a compiled
module into pieces with eager Python between them; this shows what that
costs and what a whole graph gains."""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from sparse_attention import EnhancedSparseAttention  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="16:axial,64:longformer", help="side:pattern, comma separated")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--backend", default="inductor", help="torch.compile's backend")
    args = parser.parse_args()
    for case in args.cases.split(","):
        side, pattern = case.split(":")
        torch.manual_seed(0)
        module = EnhancedSparseAttention(64, 64, num_heads=4, sparsity_pattern=pattern, kernel_size=7)
        compiled = torch.compile(module, backend=args.backend)
        x = torch.randn(2, 64, int(side), int(side))

        def step(fn):
            start = time.perf_counter()
            fn(x).sum().backward()
            return time.perf_counter() - start

        for _ in range(3):
            step(compiled)
            step(module)
        eager, graph = [], []
        for _ in range(args.rounds):
            eager.append(step(module))
            graph.append(step(compiled))
        e, g = statistics.median(eager), statistics.median(graph)
        breaks = torch._dynamo.explain(module)(x).graph_break_count
        print(f"{pattern} {side}x{side}: eager {e * 1e3:.2f} ms, compiled {g * 1e3:.2f} ms, "
              f"eager/compiled {e / g:.2f}, graph breaks {breaks}", flush=True)


if __name__ == "__main__":
    main()
