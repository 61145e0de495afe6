"""LoRA over a bf16 base: the same numbers as PEFT's own layers, without a float32 copy of each input saved.

A small bf16 block with three projections of one input (as q, k and v share theirs), with PEFT's float32 LoRA
weights: `upcast_lora_inputs` must leave the forward and every gradient bit for bit as PEFT computes them, and
the tensors autograd keeps for the backward pass must shrink by exactly the three float32 casts of the input,
less the one bf16 input they share.
"""

from __future__ import annotations

import copy

import peft
import torch

from claas_ray.training.lora_precision import UpcastInputLinear, upcast_lora_inputs


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = torch.nn.Linear(64, 64, bias=False)
        self.k = torch.nn.Linear(64, 32, bias=False)
        self.up = torch.nn.Linear(64, 128, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(x).float().sum(-1) + self.k(x).float().square().sum(-1) + torch.nn.functional.silu(self.up(x)).float().sum(-1)


def _lora_pair():
    torch.manual_seed(0)
    model = peft.get_peft_model(_Block().to(torch.bfloat16), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "k", "up"]))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.1)  # B non-zero, so the LoRA path changes the output
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    upcast = copy.deepcopy(model)
    upcast_lora_inputs(m for m in upcast.modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    return model, upcast


def _saved_bytes(model, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The output, and the bytes of the distinct storages autograd saved for the backward pass."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(x)
    return out, sum(storages.values())


def test_same_forward_and_gradients_as_peft():
    plain, upcast = _lora_pair()
    assert sum(isinstance(m, UpcastInputLinear) for m in upcast.modules()) == 3
    assert sorted(n for n, _ in plain.named_parameters()) == sorted(n for n, _ in upcast.named_parameters())
    x = torch.randn(2, 10, 64).to(torch.bfloat16)
    grads = []
    for model in (plain, upcast):
        leaf = x.clone().requires_grad_()
        out = model(leaf)
        out.sum().backward()
        grads.append((out.detach(), leaf.grad, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (out_a, x_a, params_a), (out_b, x_b, params_b) = grads
    assert torch.equal(out_a, out_b)
    assert torch.equal(x_a, x_b)
    assert params_a.keys() == params_b.keys() and len(params_a) == 6
    for name in params_a:
        assert torch.equal(params_a[name], params_b[name]), name
        assert float(params_a[name].abs().sum()) > 0, name


def test_no_float32_copy_of_the_input_is_saved():
    plain, upcast = _lora_pair()
    x = torch.randn(2, 10, 64).to(torch.bfloat16).requires_grad_()
    _, plain_bytes = _saved_bytes(plain, x)
    _, upcast_bytes = _saved_bytes(upcast, x)
    # PEFT casts the shared input once per projection and keeps each float32 copy (3 x 1,280 floats); the frozen
    # base projections keep no input (their weights need no gradient), so the upcast layers keep the bf16 input
    # once, one tensor for all three.
    assert plain_bytes - upcast_bytes == 3 * x.numel() * 4 - x.numel() * 2


def test_float32_inputs_take_the_plain_path():
    _, upcast = _lora_pair()
    upcast.float()
    x = torch.randn(2, 10, 64, requires_grad=True)
    upcast(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
