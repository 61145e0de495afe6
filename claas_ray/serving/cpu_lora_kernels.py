"""LoRA kernels for vLLM's CPU backend, grouped by adapter.

vLLM's CPU punica ops (`vllm/lora/ops/torch_ops`) gather every token's LoRA matrices (`weights[indices]`, one
`[out, rank]` copy per token) and multiply token by token. A 3,500-token prompt on an adapter copied its LoRA
weights 3,500 times in every layer: prefill took about 10x the base model's. These kernels do the same arithmetic
with one matmul per adapter present in the batch.

They also honour vLLM's convention that index -1 means "no LoRA" (its GPU kernels skip such tokens): the torch ops
index `weights[-1]`, the last LoRA slot, so a base-model request batched beside a request for the adapter in that
slot was changed by it.

Installed as a vLLM general plugin (the `vllm.general_plugins` entry point in pyproject.toml), which vLLM loads in
each of its processes, the engine's workers included; it changes nothing off the CPU platform.
"""

from __future__ import annotations

import torch

NO_LORA = -1


def _grouped(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`inputs[t] @ weights[indices[t]].T` for every token t, one matmul per adapter; rows of NO_LORA are zero.

    weights: `[slots, out, in]` or `[slots, 1, out, in]`, as vLLM stacks them."""
    if weights.dim() == 4:
        weights = weights.squeeze(1)
    inputs = inputs.to(dtype)
    first = int(indices[0])
    if bool((indices == first).all()):  # the usual case: one adapter (or none) for the whole batch
        if first == NO_LORA:
            return inputs.new_zeros(inputs.shape[0], weights.shape[1])
        return inputs @ weights[first].to(dtype).T
    outputs = inputs.new_zeros(inputs.shape[0], weights.shape[1])
    for slot in torch.unique(indices).tolist():
        if slot == NO_LORA:
            continue
        rows = (indices == slot).nonzero().squeeze(1)
        outputs[rows] = inputs[rows] @ weights[slot].to(dtype).T
    return outputs


def _per_token(indices: torch.Tensor, seq_len_tensor: torch.Tensor) -> torch.Tensor:
    """The prefill metadata's per-sequence adapter indices, one per token."""
    return torch.repeat_interleave(indices, seq_len_tensor)


def bgmv_shrink(inputs: torch.Tensor, lora_a_weights: torch.Tensor, output_tensor: torch.Tensor,
                lora_indices_tensor: torch.Tensor, scaling: float = 1.0) -> None:
    outputs = _grouped(inputs, lora_a_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(inputs: torch.Tensor, lora_b_weights: torch.Tensor, output_tensor: torch.Tensor,
                lora_indices_tensor: torch.Tensor, add_inputs: bool = True) -> None:
    outputs = _grouped(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = 1 if outputs.shape[0] == 1 and output_tensor.shape[0] != 1 else output_tensor.shape[0]
    common = min(outputs.shape[1], output_tensor.shape[1])  # the adapter and the model may pad differently
    if add_inputs:
        output_tensor[:, :common] += outputs[:limit, :common]
    else:
        output_tensor[:, :common] = outputs[:limit, :common]


def bgmv_expand_slice(inputs: torch.Tensor, lora_b_weights: torch.Tensor, output_tensor: torch.Tensor,
                      lora_indices_tensor: torch.Tensor, slice_offset: int, slice_size: int,
                      add_inputs: bool = True) -> None:
    outputs = _grouped(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset: slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset: slice_offset + slice_size] = outputs


def sgmv_shrink(inputs: torch.Tensor, lora_a_weights: torch.Tensor, output_tensor: torch.Tensor,
                b_seq_start_loc: torch.Tensor, seq_len_tensor: torch.Tensor, lora_indices_tensor: torch.Tensor,
                batches: int, max_seq_length: int, token_nums: int, scaling: float) -> None:
    bgmv_shrink(inputs, lora_a_weights, output_tensor, _per_token(lora_indices_tensor, seq_len_tensor), scaling)


def sgmv_expand(inputs: torch.Tensor, lora_b_weights: torch.Tensor, output_tensor: torch.Tensor,
                b_seq_start_loc: torch.Tensor, seq_len_tensor: torch.Tensor, lora_indices_tensor: torch.Tensor,
                batches: int, max_seq_length: int, token_nums: int, add_inputs: bool = False) -> None:
    bgmv_expand(inputs, lora_b_weights, output_tensor, _per_token(lora_indices_tensor, seq_len_tensor), add_inputs)


def sgmv_expand_slice(inputs: torch.Tensor, lora_b_weights: torch.Tensor, output_tensor: torch.Tensor,
                      b_seq_start_loc: torch.Tensor, seq_len_tensor: torch.Tensor, lora_indices_tensor: torch.Tensor,
                      batches: int, max_seq_length: int, token_nums: int, slice_offset: int, slice_size: int,
                      add_inputs: bool = False) -> None:
    bgmv_expand_slice(inputs, lora_b_weights, output_tensor, _per_token(lora_indices_tensor, seq_len_tensor),
                      slice_offset, slice_size, add_inputs)


KERNELS = {kernel.__name__: kernel for kernel in (bgmv_shrink, bgmv_expand, bgmv_expand_slice, sgmv_shrink,
                                                   sgmv_expand, sgmv_expand_slice)}


def install() -> None:
    """vLLM general-plugin hook: point vLLM's CPU punica wrapper at these kernels (idempotent; CPU only)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.lora.punica_wrapper import punica_cpu

    for name, kernel in KERNELS.items():
        setattr(punica_cpu, name, kernel)
