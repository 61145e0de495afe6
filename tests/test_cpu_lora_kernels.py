"""The grouped CPU LoRA kernels: the same arithmetic as vLLM's torch ops, with index -1 meaning no LoRA, and
installed in vLLM through its general-plugin entry point."""

from __future__ import annotations

import pytest
import torch
from vllm.lora.ops.torch_ops import lora_ops as vllm_ops

from claas_ray.serving import cpu_lora_kernels as grouped

SLOTS, RANK, HIDDEN, OUT = 4, 8, 64, 96


def per_token(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The definition, one token at a time in float64, rounded to float32: `inputs[t] @ weights[slot].T`, zero where slot is -1."""
    weights = weights.squeeze(1).double()
    rows = [torch.zeros(weights.shape[1], dtype=torch.float64) if slot == -1 else weights[slot] @ inputs[t].double()
            for t, slot in enumerate(indices.tolist())]
    return torch.stack(rows).float()


@pytest.fixture
def weights():
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(SLOTS, 1, RANK, HIDDEN, generator=generator),
            torch.randn(SLOTS, 1, OUT, RANK, generator=generator))


@pytest.mark.parametrize("indices", [[2] * 7, [0, 0, 3, 3, 3, 1, 0], [3, 0, 2, 1, 3, 2, 0]], ids=["one", "runs", "mixed"])
def test_grouped_kernels_equal_vllms_torch_ops(weights, indices):
    lora_a, lora_b = weights
    indices = torch.tensor(indices)
    inputs = torch.randn(len(indices), HIDDEN)
    shrunk = {}
    for name, ops in (("vllm", vllm_ops), ("grouped", grouped)):
        shrunk[name] = torch.zeros(len(indices), RANK)
        ops.bgmv_shrink(inputs, lora_a, shrunk[name], indices, 0.5)
    torch.testing.assert_close(shrunk["grouped"], shrunk["vllm"])
    torch.testing.assert_close(shrunk["grouped"], 0.5 * per_token(inputs, lora_a, indices))

    base = torch.randn(len(indices), OUT + 16)
    expanded = {name: base.clone() for name in ("vllm", "grouped")}
    sliced = {name: base.clone() for name in ("vllm", "grouped")}
    for name, ops in (("vllm", vllm_ops), ("grouped", grouped)):
        ops.bgmv_expand(shrunk["vllm"], lora_b, expanded[name], indices, True)
        ops.bgmv_expand_slice(shrunk["vllm"], lora_b, sliced[name], indices, 8, OUT, True)
    torch.testing.assert_close(expanded["grouped"], expanded["vllm"])
    torch.testing.assert_close(sliced["grouped"], sliced["vllm"])


def test_prefill_kernels_expand_per_sequence_indices(weights):
    """sgmv_*: three sequences of 3, 1 and 4 tokens on adapters 1, -1 and 2."""
    lora_a, lora_b = weights
    seq_lens, slots = torch.tensor([3, 1, 4]), torch.tensor([1, -1, 2])
    tokens = torch.repeat_interleave(slots, seq_lens)
    inputs = torch.randn(8, HIDDEN)
    shrunk = torch.zeros(8, RANK)
    grouped.sgmv_shrink(inputs, lora_a, shrunk, None, seq_lens, slots, 3, 4, 8, 2.0)
    torch.testing.assert_close(shrunk, 2.0 * per_token(inputs, lora_a, tokens))
    out = torch.ones(8, OUT)
    grouped.sgmv_expand(shrunk, lora_b, out, None, seq_lens, slots, 3, 4, 8, True)
    torch.testing.assert_close(out, 1.0 + per_token(shrunk, lora_b, tokens))
    assert torch.equal(out[3], torch.ones(OUT))  # the base-model sequence is untouched


def test_no_lora_tokens_are_untouched_where_vllms_ops_apply_the_last_slot(weights):
    """A base-model request batched beside one on the adapter in the last slot: vLLM's torch ops index
    weights[-1] and change it; the grouped kernels leave it alone, as vLLM's GPU kernels do."""
    lora_a, _ = weights
    indices = torch.tensor([SLOTS - 1, -1])
    inputs = torch.randn(2, HIDDEN)
    theirs, ours = torch.zeros(2, RANK), torch.zeros(2, RANK)
    vllm_ops.bgmv_shrink(inputs, lora_a, theirs, indices, 1.0)
    grouped.bgmv_shrink(inputs, lora_a, ours, indices, 1.0)
    assert theirs[1].abs().sum() > 0
    assert torch.equal(ours[1], torch.zeros(RANK)) and torch.allclose(ours[0], theirs[0])


def test_vllm_loads_the_kernels_as_a_general_plugin():
    from importlib.metadata import entry_points

    from vllm.lora.punica_wrapper import punica_cpu
    from vllm.plugins import load_general_plugins

    assert "claas_ray_cpu_lora_kernels" in {plugin.name for plugin in entry_points(group="vllm.general_plugins")}
    load_general_plugins()  # what vLLM runs in its engine-core and worker processes
    assert all(getattr(punica_cpu, name) is kernel for name, kernel in grouped.KERNELS.items())
