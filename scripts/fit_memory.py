"""What a fit over task vectors holds on one GPU, per granularity: computed, not measured.

For N fine-tunes of a base with P parameters (R rows, T tensors), stack dtype of b bytes:

    stack          (N + 1) * P * b      the start merge and N task vectors (bf16 on CUDA: b = 2)
    merged         2 * P * b            the merged parameters (in the stack's dtype) and their
                                        gradient (the module's own weights are freed)
    coefficients   4 * K * 4            logits, gradient, Adam's two moments (float32);
                                        K = N * P (parameter), N * R (row), N * T (tensor), N
    temporaries    N * P * 4            parameter: delta * tau over the whole flat buffer;
                   N * P_max * 4        row, tensor, model: merged tensor by tensor (P_max: the
                                        largest tensor)
    + activations  (not counted: batch x sequence x layers; less with `checkpointing: true`)

Run: python scripts/fit_memory.py [--models 2] [--dtype-bytes 2]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GIB = 1e9  # GPU sizes are sold in GB (10^9 bytes)
GPUS = {"80 GB": 80, "141 GB": 141}


@dataclass(frozen=True)
class Llama:
    """A Llama-style decoder's tensor shapes, from its config's sizes."""

    name: str
    vocab: int
    hidden: int
    layers: int
    intermediate: int
    kv_dim: int  # num_key_value_heads * head_dim
    tied: bool

    def shapes(self) -> list[tuple[int, ...]]:
        h, i = self.hidden, self.intermediate
        layer = [(h, h), (self.kv_dim, h), (self.kv_dim, h), (h, h), (i, h), (i, h), (h, i),
                 (h,), (h,)]  # fmt: skip
        head = [] if self.tied else [(self.vocab, h)]
        return [(self.vocab, h), *layer * self.layers, (h,), *head]


MODELS = [
    # Llama 3.2 1B, Llama 2 7B and 13B (their config.json sizes)
    Llama("1B (Llama 3.2 1B)", 128256, 2048, 16, 8192, 512, tied=True),
    Llama("7B (Llama 2 7B)", 32000, 4096, 32, 11008, 4096, tied=False),
    Llama("13B (Llama 2 13B)", 32000, 5120, 40, 13824, 5120, tied=False),
]


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def fit_bytes(shapes: list[tuple[int, ...]], models: int, dtype_bytes: int, granularity: str):
    """The bytes of each item of the module docstring's formula, by name."""
    p = sum(numel(s) for s in shapes)
    groups = {
        "parameter": p,
        "row": sum(s[0] if s else 1 for s in shapes),
        "tensor": len(shapes),
        "model": 1,
    }[granularity]
    k = models * groups
    largest = max(numel(s) for s in shapes)
    return {
        "stack": (models + 1) * p * dtype_bytes,
        "merged": 2 * p * dtype_bytes,
        "coefficients": 4 * k * 4,
        "temporaries": models * (p if granularity == "parameter" else largest) * 4,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=2, help="fine-tunes merged (N)")
    parser.add_argument("--dtype-bytes", type=int, default=2, help="stack dtype: 2 bf16, 4 fp32")
    args = parser.parse_args()
    print(
        f"fit over task vectors, N = {args.models} fine-tunes, stack in "
        f"{'bf16' if args.dtype_bytes == 2 else f'{args.dtype_bytes}-byte floats'}; GB = 1e9 "
        "bytes, activations not included (what is left is for them)"
    )
    columns = ["model", "parameters", "granularity", "stack", "coefficients + Adam", "total"]
    columns += [f"left on {gpu}" for gpu in GPUS]
    print("| " + " | ".join(columns) + " |")
    print("|" + " --- |" * len(columns))
    for model in MODELS:
        shapes = model.shapes()
        p = sum(numel(s) for s in shapes)
        for granularity in ("parameter", "row", "tensor", "model"):
            items = fit_bytes(shapes, args.models, args.dtype_bytes, granularity)
            total = sum(items.values())
            left = [f"{size - total / GIB:.1f}" for size in GPUS.values()]
            row = [model.name, f"{p / 1e9:.2f} B", granularity, f"{items['stack'] / GIB:.1f}",
                   f"{items['coefficients'] / GIB:.2f}", f"{total / GIB:.1f}", *left]  # fmt: skip
            print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
