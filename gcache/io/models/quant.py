"""Weight-only reduced precision for a frozen model's linear layers: ``weights="fp32" | "bf16" | "int8"``.

A one-row decode step reads every weight once, and on a CPU it is bound by memory:
the bytes of the weights set its floor. ``bf16`` stores each swapped ``nn.Linear``'s
weight in bfloat16 (half the bytes) and runs the product in bfloat16, where oneDNN
uses AMX tiles on CPUs that have them; ``int8`` stores int8 weights with one float32
scale per output channel (a quarter of the bytes) and multiplies through
``torch._weight_int8pack_mm``. In both, the activations that enter and leave a
linear are float32: norms, attention, residuals, the KV-cache and the latent
realignment stay float32 (a whole-model bfloat16 run was slower here, because its
non-matmul ops cost more in bfloat16 than the matmuls save).

Which layers are swapped is the ``DEFAULT_SCOPE`` chosen by measurement (see
benchmarks/decode.py); embeddings are never swapped (a lookup reads one row).
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

WEIGHTS = ("fp32", "bf16", "int8")  # the weight-only precisions of a linear layer
# What `gcache run --weights` / load_model(weights=) accept: a precision for the whole model, or
# ``int8-decode``: float32 for prompts and latent steps, a second copy with int8 linears for the
# decoding steps (gcache.io.models.local.from_hf).
MODEL_WEIGHTS = (*WEIGHTS, "int8-decode")


def check_weights(weights: str, allowed: tuple[str, ...] = WEIGHTS) -> str:
    """``weights`` itself when it is one of ``allowed``; raises ValueError naming it otherwise."""
    if not isinstance(weights, str) or weights not in allowed:
        raise ValueError(f"weights: expected one of {list(allowed)}, got {weights!r}")
    return weights


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8: weight [N, K] -> (q [N, K] int8 in [-127, 127], scale [N] float32).

    q = round(w / scale) with scale = max |w[n]| / 127 (1 for an all-zero row), so
    |dequantize_int8(q, scale) - w| <= scale[n] / 2 elementwise.
    """
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"weight: expected a matrix [N, K], got {shape}")
    w = weight.detach().float()
    absmax = w.abs().amax(dim=1)  # [N]
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))  # [N]
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: Tensor, scale: Tensor) -> Tensor:
    """q [N, K] int8, scale [N] -> float32 [N, K]."""
    return q.float() * scale[:, None]


class WeightOnlyLinear(nn.Module):
    """``y = x W^T + b`` with W held in bfloat16 or int8 (+ float32 per-channel scales); x and y float32.

    Built from a frozen ``nn.Linear`` by ``from_linear``; it holds buffers, not parameters
    (nothing to train). The output has the input's dtype.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, weights: str) -> None:
        super().__init__()
        if check_weights(weights) == "fp32":
            raise ValueError("weights: a WeightOnlyLinear holds 'bf16' or 'int8' weights, got 'fp32'")
        self.weights = weights
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        if weights == "bf16":
            self.register_buffer("weight", weight.detach().to(torch.bfloat16).contiguous())
            self.register_buffer("scale", None)
            self.register_buffer("scale_bf16", None)
        else:
            q, scale = quantize_int8(weight)
            self.register_buffer("weight", q.contiguous())
            self.register_buffer("scale", scale.to(weight.device))
            # the kernel takes its scales in the activations' dtype (bfloat16: it was faster than float32 here)
            self.register_buffer("scale_bf16", self.scale.to(torch.bfloat16))
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    @classmethod
    def from_linear(cls, linear: nn.Linear, weights: str) -> "WeightOnlyLinear":
        return cls(linear.weight, linear.bias, weights)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights={self.weights}"

    def forward(self, x: Tensor) -> Tensor:  # [..., K] -> [..., N]
        lead = x.shape[:-1]
        if self.weights == "bf16":
            y = F.linear(x.to(torch.bfloat16), self.weight)
        else:
            rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
            y = torch._weight_int8pack_mm(rows, self.weight, self.scale_bf16)
            y = y.reshape(*lead, self.out_features)
        y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)


# Which linears to swap, by the last part of their module name; by measurement (benchmarks/decode.py).
DEFAULT_SCOPE = ("lm_head", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize_linears(model: nn.Module, weights: str, scope: Iterable[str] = DEFAULT_SCOPE) -> int:
    """Swap the model's ``nn.Linear`` modules named in ``scope`` for WeightOnlyLinear (in place); returns how many.

    weights 'fp32' swaps nothing. A linear whose weight is shared with another module
    (a tied lm_head and embedding) gets its own reduced copy; the other keeps the float32
    one. Raises ValueError on unknown ``weights``.
    """
    if check_weights(weights) == "fp32":
        return 0
    names = set(scope)
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and name in names:
                setattr(parent, name, WeightOnlyLinear.from_linear(child, weights))
                swapped += 1
    return swapped


def weight_bytes(model: nn.Module) -> int:
    """Bytes a forward reads of the model's matmul weights: every linear (float32 or reduced), not the embeddings."""
    total = 0
    for m in model.modules():
        if isinstance(m, WeightOnlyLinear):
            total += m.weight.numel() * m.weight.element_size()
            total += 0 if m.scale is None else m.scale_bf16.numel() * m.scale_bf16.element_size()
        elif isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total


__all__ = [
    "DEFAULT_SCOPE",
    "MODEL_WEIGHTS",
    "WEIGHTS",
    "WeightOnlyLinear",
    "check_weights",
    "dequantize_int8",
    "quantize_int8",
    "quantize_linears",
    "weight_bytes",
]
