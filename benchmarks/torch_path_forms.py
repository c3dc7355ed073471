"""The PyTorch path's forms against dense SDPA, on the same tensors.

    python benchmarks/torch_path_forms.py [--side 64] [--patterns random,dense]
        [--rounds 5] [--ratio 0.5]

The PyTorch path (``use_cuda_kernel=False``, devices without our kernels,
double backward, torch.func transforms) computes a layout over its tile plan
or, where that plan fills at least half of the grid's pairs, in strips of
query rows. This times both forms (B=2, 8 heads, D=32, float32) forward and
forward+backward, each round alternating with dense
``scaled_dot_product_attention``, and prints the median over rounds of
(our time / dense time) per form, with dense's own median in ms."""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from sparse_attention import _torch_impl, build_layout  # noqa: E402
from sparse_attention import sparse_scaled_dot_product_attention as attention  # noqa: E402

FORMS = {"strips": 0.0, "plan": float("inf")}  # strip_min_plan_fill that forces each form


def seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def call(fn, tensors, grad_out, train):
    leaves = [t.clone().requires_grad_(train) for t in tensors]
    out = fn(*leaves)
    if train:
        torch.autograd.grad(out, leaves, grad_out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--patterns", default="random,dense")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ratio", type=float, default=0.5, help="RANDOM's attention_ratio")
    args = parser.parse_args()
    torch.manual_seed(0)
    n = args.side * args.side
    tensors = [torch.randn(2, 8, n, 32) for _ in range(3)]
    grad_out = torch.randn(2, 8, n, 32)
    dense = torch.nn.functional.scaled_dot_product_attention
    print(f"{args.side}x{args.side} tokens, B=2, 8 heads, D=32, float32, torch threads "
          f"{torch.get_num_threads()}, median of {args.rounds} rounds\n")
    print("| pattern | plan fill | strips fwd / f+b | plan fwd / f+b | dense SDPA fwd / f+b, ms |")
    print("|---|---|---|---|---|")
    saved = _torch_impl.strip_min_plan_fill
    try:
        for pattern in args.patterns.split(","):
            layout = build_layout(pattern, args.side, args.side, attention_ratio=args.ratio)
            ours = lambda q, k, v: attention(q, k, v, layout, backend="torch")  # noqa: E731
            cells, dense_ms = {}, []
            for train in (False, True):
                ratios = {form: [] for form in FORMS}
                base = []
                for round_index in range(args.rounds):
                    base.append(seconds(lambda: call(dense, tensors, grad_out, train)))
                    for form, fill in FORMS.items():
                        _torch_impl.strip_min_plan_fill = fill
                        if round_index == 0:
                            call(ours, tensors, grad_out, train)  # builds the plan and caches
                        ratios[form].append(seconds(lambda: call(ours, tensors, grad_out, train)) / base[-1])
                for form in FORMS:
                    cells.setdefault(form, []).append(f"{statistics.median(ratios[form]):.2f}x")
                dense_ms.append(f"{1e3 * statistics.median(base):.0f}")
            fill = _torch_impl._plan_fill(layout)
            print(f"| {pattern.upper()} | {fill:.2f} | {' / '.join(cells['strips'])} | "
                  f"{' / '.join(cells['plan'])} | {' / '.join(dense_ms)} |", flush=True)
    finally:
        _torch_impl.strip_min_plan_fill = saved


if __name__ == "__main__":
    main()
