"""LoRA on a bf16 base without a float32 copy of every LoRA input kept for the backward pass.

PEFT keeps LoRA weights in float32 over a bf16 base and casts each LoRA layer's input up before its
`lora_A` matmul, which keeps that float32 copy for the weight gradient: one per projection, so q, k and v
keep three copies of the same input, and a decoder layer about 20 kB per token (0.6 MB per token on the
embedded model), as much as the base model's own saved activations. `UpcastInputLinear` computes exactly
what PEFT computes (the input cast to the weight's dtype, then the matmul) but keeps the input as it came, in
bf16 and one tensor for the projections that share it, and casts it again in the backward pass.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class _UpcastMatmul(torch.autograd.Function):
    """`x.to(w.dtype) @ w.T`, saving `x` as it came: one bf16 tensor for the projections that share an input."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return torch.nn.functional.linear(x.to(weight.dtype), weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, weight = ctx.saved_tensors
        grad_x = (grad @ weight).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1]).to(weight.dtype)
        return grad_x, grad_weight


class UpcastInputLinear(torch.nn.Linear):
    """A bias-free `nn.Linear` (a LoRA `A` matrix) that takes its input in a lower precision than its weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype:
            return torch.nn.functional.linear(x, self.weight)
        return _UpcastMatmul.apply(x, self.weight)


def upcast_lora_inputs(lora_layers: Iterable[torch.nn.Module]) -> None:
    """Make PEFT's LoRA linear layers pass their input to `lora_A` uncast, and `lora_A` upcast it itself.

    The parameters stay the same objects under the same names (the state dict and the optimizer see no change).
    """
    for layer in lora_layers:
        lora_a = getattr(layer, "lora_A", None)
        if not isinstance(lora_a, torch.nn.ModuleDict) or not hasattr(layer, "cast_input_dtype_enabled"):
            continue
        if not all(type(linear) is torch.nn.Linear and linear.bias is None for linear in lora_a.values()):
            continue  # not PEFT's plain LoRA: its own cast stays
        for name, linear in list(lora_a.items()):
            replacement = UpcastInputLinear(linear.in_features, linear.out_features, bias=False, device="meta")
            replacement.weight = linear.weight
            replacement.train(linear.training)
            lora_a[name] = replacement
        layer.cast_input_dtype_enabled = False
