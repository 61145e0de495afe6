"""`SDPOTrainer`: one guarded SDPO step of a LoRA adapter on a PEFT model.

The trainer holds one base model and two LoRA slots, `student` and `teacher` (the EMA teacher). An
adapter's tensors are copied into the slots at the start of every step and read back at the end, so one
trainer serves any number of adapters, and the base weights are never written: only slot parameters are
given to the optimizer, and the "base" passes run with the adapter layers disabled.

A step: the teacher's context (the feedback, with the adapter's earlier feedback, before the user's
message); teacher rollouts mixed in beside the user's own response; the SDPO loss, with unlikelihood on the
loops of those responses and of the student's own greedy answers, and `optimizer_steps` AdamW updates; then
the guards (finite loss and gradients, exact KL to the base, collapse) before the new state is returned.
README, "SDPO: the algorithm and its knobs", walks through it.
"""

from __future__ import annotations

import ctypes
import functools
import math
import re
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from claas_ray.adapters.state import AdapterState
from claas_ray.chat import ChatMessage, render_prompt_ids
from claas_ray.config import LoraConfig, ModelConfig, TrainingConfig
from claas_ray.degeneration import is_degenerate
from claas_ray.models.registry import resolve_model_path
from claas_ray.training.example import TokenizedExample, TrainingExample, tokenize_example
from claas_ray.training.lora_precision import upcast_lora_inputs
from claas_ray.training.sdpo_loss import (
    TeacherTopK,
    feedback_concern,
    guided_topk,
    repeated_ngrams,
    sdpo_loss,
    topk_of_logprobs,
)
from claas_ray.training.teacher import ema_update, hindsight_messages, learn_feedback, remembered_feedback

STUDENT = "student"
COLLAPSE_CHECK_PROMPT_TOKENS = 512  # longer prompts are checked by their last user turn alone
KL_GUARD_CONTEXT_TOKENS = 512  # the KL guard reads at most this much of the conversation before the response
LOGIT_CHUNK_ELEMENTS = 1 << 23  # positions x vocabulary projected at once: 32 MB of float32 logits
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number, from glibc's malloc.h
MMAP_THRESHOLD_BYTES = 4 << 20
SHARED_PREFIX_MIN_TOKENS = 32  # shorter common prefixes of the teacher's and the base's inputs are not worth a cache
LOSS_SUMS = ("loss", "divergence", "kl", "ratio", "clipped", "tokens", "repeated")
TEACHER = "teacher"
Weights = Literal["student", "teacher", "base"]


@dataclass(frozen=True)
class Leash:
    """The leash's view of the base model for one response, and how hard it pulls at each position."""

    base: torch.Tensor | TeacherTopK  # log-probs [T] of the response's tokens (k3), or the top-K distribution
    weights: torch.Tensor | None = None  # [T] factors on kl_weight (training.leash_concern_nats); None: 1

    def rows(self, positions: slice) -> Leash:
        base = self.base.rows(positions) if isinstance(self.base, TeacherTopK) else self.base[positions]
        return Leash(base, None if self.weights is None else self.weights[positions])


@dataclass(frozen=True)
class _Rollout:
    """A teacher rollout with what sampling and scoring it already computed."""

    example: TokenizedExample
    target: TeacherTopK  # from the sampling logits: the distribution the rollout was drawn from (at temperature 1)
    base_hidden: torch.Tensor | None  # [T, H] when the teacher is the base model: its scoring pass was the base pass


@dataclass
class StepResult:
    """Outcome of one step: the new state if accepted, else the unchanged input state and the reason."""

    accepted: bool
    state: AdapterState
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str | None = None


def return_freed_memory() -> None:
    """Make glibc give large freed blocks back to the system at once, in this process.

    glibc raises its mmap threshold each time a large block is freed, so after the first step every activation
    of a long conversation comes from the heap, stays resident when freed, and fragments it: measured on the
    embedded model, a 2,048-token forward and backward peaked at 4.4 GB with the default and 2.4 GB with a
    fixed threshold, and the trainer kept the memory for good. Fixing it (which also stops the raising) at
    4 MB sends a long conversation's activations to mmap, returned when freed, while the small tensors of a
    short one stay on the fast heap: at 128 kB, every allocation of a short step paid for fresh pages.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def trim_freed_memory() -> None:
    """Give the heap's free pages back to the system after a step (the CPU's `torch.cuda.empty_cache`).

    The small tensors of a step come from glibc's heap, which keeps them resident once freed: on the embedded
    model a shipped step left the trainer 0.7 GB larger (1.7 GB against 1.0 GB before it), RAM that a CPU
    inference engine on the same machine could not have. `malloc_trim` returns it in about 0.1 s.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if sys.platform != "linux":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl): nothing to tune
        return None


def pick_device(preference: str) -> torch.device:
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


def pick_dtype(preference: str, device: torch.device) -> torch.dtype:
    if preference == "auto":
        return torch.bfloat16 if device.type == "cuda" or cpu_has_native_bf16() else torch.float32
    return getattr(torch, preference)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (x86 AVX512-BF16 or AMX, Arm's BF16 extension).

    There a step in bf16 took 0.6x to 0.7x the time of fp32 and taught as well (README, "Training dtype");
    elsewhere bf16 is emulated and slower, so fp32 stays.
    """
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16|bf16)\b", cpuinfo) is not None


class SDPOTrainer:
    """Owns the base model for training and turns feedback batches into adapter versions."""

    def __init__(self, model_config: ModelConfig):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        return_freed_memory()
        self.model_config = model_config
        self.base_model_name = model_config.base_model
        path = resolve_model_path(model_config.base_model)
        self.device = pick_device(model_config.device)
        self.dtype = pick_dtype(model_config.dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        base = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype).to(self.device)
        base.eval()
        for parameter in base.parameters():
            parameter.requires_grad_(False)
        self.base = base
        self._checkpointing = False
        self._peft = None
        self._slot_lora: LoraConfig | None = None

    def to_device(self, device: str) -> None:
        """Move the model, e.g. to the GPU after a Modal memory snapshot was taken with it on the CPU."""
        self.device = torch.device(device)
        self.dtype = pick_dtype(self.model_config.dtype, self.device)
        self.base.to(self.device, self.dtype)

    # --- LoRA slots -------------------------------------------------------------------------
    def _ensure_slots(self, lora: LoraConfig):
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model
        from peft.tuners.tuners_utils import BaseTunerLayer

        if self._peft is not None and lora == self._slot_lora:
            return self._peft
        peft_config = PeftLoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        if self._peft is None:
            self._peft = get_peft_model(self.base, peft_config, adapter_name=STUDENT)
        else:
            self._peft.delete_adapter(TEACHER)
            self._peft.add_adapter("_swap", peft_config)  # PEFT refuses to delete the last adapter
            self._peft.delete_adapter(STUDENT)
            self._peft.add_adapter(STUDENT, peft_config)
            self._peft.delete_adapter("_swap")
        self._peft.add_adapter(TEACHER, peft_config)
        self._peft.set_adapter(STUDENT)
        # PEFT's own switches walk every module and check the model's status on each call: a quarter of a
        # step on the embedded model. The LoRA layers are found once and switched directly.
        self._lora_layers = [module for module in self._peft.modules() if isinstance(module, BaseTunerLayer)]
        upcast_lora_inputs(self._lora_layers)
        self._slot_param_cache: dict[str, dict[str, torch.nn.Parameter]] = {}
        self._peft.eval()  # new LoRA modules start in train mode; a step switches to it only for dropout
        # What train mode changes for a step: checkpointing and LoRA dropout. The base model has no dropout in a
        # step, and walking its six thousand modules twice a step cost 5% of a short one. Checkpointing is read
        # where `gradient_checkpointing` is set: on decoder layers in current transformers, the decoder in older.
        self._train_mode_modules = [m for m in self._peft.modules() if hasattr(m, "gradient_checkpointing")] + [
            dropout
            for layer in self._lora_layers
            for dropout in getattr(layer, "lora_dropout", {}).values()
            if isinstance(dropout, torch.nn.Dropout)
        ]
        self._slot_lora = lora.model_copy()
        return self._peft

    def _slot_params(self, slot: str) -> dict[str, torch.nn.Parameter]:
        """Slot parameters under the names PEFT saves them with (adapter name removed); found once per slot."""
        if slot not in self._slot_param_cache:
            marker = f".{slot}."
            self._slot_param_cache[slot] = {
                name.replace(marker, "."): parameter
                for name, parameter in self._peft.named_parameters()
                if marker in name and "lora_" in name
            }
        return self._slot_param_cache[slot]

    @torch.no_grad()
    def _load_slot(self, slot: str, tensors: dict[str, torch.Tensor]) -> None:
        params = self._slot_params(slot)
        _check_layout(params, tensors)
        for name, parameter in params.items():
            parameter.copy_(tensors[name].to(parameter.device, parameter.dtype))

    def _read_slot(self, slot: str) -> dict[str, torch.Tensor]:
        return {name: p.detach().to("cpu", torch.float32).clone() for name, p in self._slot_params(slot).items()}

    def _prepare(self, state: AdapterState, teacher: dict[str, torch.Tensor] | None = None) -> None:
        """Load the adapter into the slots; the teacher slot gets `teacher` where given (the `snapshot` teacher)."""
        self._ensure_slots(state.lora)
        self._load_slot(STUDENT, state.student)
        self._load_slot(TEACHER, teacher or state.teacher or state.student)

    @contextmanager
    def _weights(self, which: Weights) -> Iterator[None]:
        if which == "base":
            # The flag PEFT's forward reads. `enable_adapters` would also reset every slot parameter's
            # `requires_grad` on the way, twice per layer and pass, for passes that run without gradients.
            for layer in self._lora_layers:
                layer._disable_adapters = True
            try:
                yield
            finally:
                for layer in self._lora_layers:
                    layer._disable_adapters = False
        else:
            if which != self._peft.active_adapter:
                for layer in self._lora_layers:
                    layer.set_adapter(which)
                self._peft.active_adapter = self._peft.base_model.active_adapter = which  # as PEFT records it
            yield

    def _select(self, state: AdapterState | None) -> Weights:
        """Load an adapter into the student slot, or pick the bare base model when there is none."""
        if state is None:
            self._ensure_slots(self._slot_lora or LoraConfig())
            return "base"
        self._prepare(state)
        return STUDENT

    # --- adapters ---------------------------------------------------------------------------
    def init_adapter(self, lora: LoraConfig, seed: int = 0) -> AdapterState:
        """A zero-effect adapter: A random (Kaiming-uniform, as PEFT does), B zero, so output == base."""
        self._ensure_slots(lora)
        generator = torch.Generator().manual_seed(seed)
        student: dict[str, torch.Tensor] = {}
        for name, parameter in sorted(self._slot_params(STUDENT).items()):
            weight = torch.empty(parameter.shape, dtype=torch.float32)
            if "lora_A" in name:
                fan_in = weight.shape[1]
                bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) reduces to this bound
                weight.uniform_(-bound, bound, generator=generator)
            else:
                weight.zero_()
            student[name] = weight
        teacher = {name: tensor.clone() for name, tensor in student.items()}
        return AdapterState(lora=lora.model_copy(), base_model=self.base_model_name, student=student, teacher=teacher)

    def check_compatible(self, state: AdapterState) -> None:
        """Raise ValueError unless the state's tensors fit this base model's LoRA layout exactly."""
        self._ensure_slots(state.lora)
        _check_layout(self._slot_params(STUDENT), state.student)
        for name, tensor in state.student.items():
            if not torch.isfinite(tensor).all():
                raise ValueError(f"adapter tensor {name} has non-finite values")

    # --- scoring passes ---------------------------------------------------------------------
    # A pass returns final hidden states [T, H] at the response positions, not logits: the vocabulary
    # projection is the largest tensor of a step (49k floats per position here, 152k for Qwen3), so it is
    # done by `_logits` a chunk of positions at a time and never held for a whole response (README,
    # "Memory and long conversations").
    def _response_hidden(self, input_ids: torch.Tensor, response_len: int) -> torch.Tensor:
        """Final hidden states [T, H] at the positions that predict the last `response_len` tokens of `input_ids`."""
        decoder = self._peft.get_base_model().get_decoder()
        hidden = decoder(input_ids=input_ids.unsqueeze(0).to(self.device), use_cache=False).last_hidden_state
        return hidden[0, -response_len - 1 : -1]

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [n, V] from hidden states [n, H] (as the model's own head computes them)."""
        logits = self._peft.get_base_model().get_output_embeddings()(hidden).float()
        cap = getattr(self.base.config, "final_logit_softcapping", None)
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def _chunks(self, positions: int) -> list[slice]:
        size = max(1, LOGIT_CHUNK_ELEMENTS // self.base.config.vocab_size)
        return [slice(start, min(start + size, positions)) for start in range(0, positions, size)]

    def _chosen_logprobs(self, hidden: torch.Tensor, response_ids: torch.Tensor) -> torch.Tensor:
        """Log-probs [T] of `response_ids` from hidden states [T, H]."""
        ids = response_ids.to(self.device).unsqueeze(-1)
        return torch.cat([
            torch.log_softmax(self._logits(hidden[chunk]), -1).gather(-1, ids[chunk]).squeeze(-1)
            for chunk in self._chunks(hidden.shape[0])
        ])

    def _targets(self, teacher: torch.Tensor, without: torch.Tensor | None, config: TrainingConfig) -> TeacherTopK:
        """The teacher's top-K targets from its hidden states [T, H]; with `training.teacher_guidance`, guided by the
        same weights' hidden states without the feedback."""
        return TeacherTopK.cat([
            self._guided(torch.log_softmax(self._logits(teacher[chunk]), -1), None if without is None else without[chunk], config)
            for chunk in self._chunks(teacher.shape[0])
        ])

    def _guided(self, teacher_logprobs: torch.Tensor, without: torch.Tensor | None, config: TrainingConfig) -> TeacherTopK:
        if without is None or config.teacher_guidance == 1.0:
            return topk_of_logprobs(teacher_logprobs, config.top_k)
        without_logprobs = torch.log_softmax(self._logits(without), -1)
        return guided_topk(teacher_logprobs, without_logprobs, config.top_k, config.teacher_guidance)

    def _leash(self, item: TokenizedExample, base_hidden: torch.Tensor | None, target: TeacherTopK,
               config: TrainingConfig) -> Leash | None:
        """What the loss's leash compares the student with: the base model's top-K distribution at each position
        (`training.leash_top_k`), or its log-probs of the response's own tokens for the k3 estimate; and, with
        `training.leash_concern_nats`, a weight per position that lets go where the feedback moves the teacher."""
        if base_hidden is None or config.kl_weight == 0:
            return None
        ids = item.response_ids.to(self.device).unsqueeze(-1)
        bases: list[torch.Tensor | TeacherTopK] = []
        weights: list[torch.Tensor] = []
        for chunk in self._chunks(base_hidden.shape[0]):
            logprobs = torch.log_softmax(self._logits(base_hidden[chunk]), -1)
            if config.leash_top_k is None:
                bases.append(logprobs.gather(-1, ids[chunk]).squeeze(-1))
            else:
                bases.append(topk_of_logprobs(logprobs, config.leash_top_k))
            if config.leash_concern_nats is not None:
                weights.append(torch.exp(-feedback_concern(logprobs, target.rows(chunk)) / config.leash_concern_nats))
        base = torch.cat(bases) if config.leash_top_k is None else TeacherTopK.cat(bases)
        return Leash(base, torch.cat(weights) if weights else None)

    def _teacher_weights(self, config: TrainingConfig) -> Weights:
        return {"ema": TEACHER, "base": "base", "current": STUDENT, "snapshot": TEACHER}[config.teacher]

    @staticmethod
    def _snapshot(state: AdapterState, examples: Sequence[TrainingExample]) -> dict[str, torch.Tensor]:
        """The `snapshot` teacher's weights for this step: the adapter as it is now when the batch brings feedback
        it was never taught (a new preference starts), else the snapshot taken then, kept in `state.teacher`."""
        fresh = any(example.feedback not in state.learned_feedback for example in examples)
        return state.student if fresh or not state.teacher else state.teacher

    def _tokenize(
        self, examples: Sequence[TrainingExample], config: TrainingConfig, learned: Sequence[str] = ()
    ) -> list[TokenizedExample]:
        return [
            tokenize_example(
                self.tokenizer,
                example,
                hindsight_messages(
                    example.messages,
                    remembered_feedback(learned, example.feedback, config.feedback_memory),
                    config.hindsight_template,
                ),
                append_eos=config.append_eos,
                max_len=min(self.model_config.max_model_len, config.max_step_tokens or self.model_config.max_model_len),
            )
            for example in examples
        ]

    @torch.no_grad()
    def _teacher_and_base(
        self, batch: list[TokenizedExample], config: TrainingConfig, need_base: bool
    ) -> tuple[list[TeacherTopK], list[torch.Tensor | None]]:
        """The teacher's targets and (if needed) the base model's hidden states for the users' own responses.

        With the base model as the teacher (the default) both are passes of the same weights over inputs that
        agree up to the last user turn, where the feedback goes: that prefix, most of an agent's conversation, is
        computed once and its key-value cache serves both continuations. Guidance needs the teacher's weights
        without the feedback, the same pair of passes.
        """
        weights = self._teacher_weights(config)
        guided = config.teacher_guidance != 1.0
        targets: list[TeacherTopK] = []
        base: list[torch.Tensor | None] = []
        for item in batch:
            length = item.response_ids.shape[0]
            without: torch.Tensor | None = None
            with self._weights(weights):
                if guided or (need_base and weights == "base"):
                    without, teacher = self._paired_hidden(item.student_ids, item.teacher_ids, length)
                else:
                    teacher = self._response_hidden(item.teacher_ids, length)
            if not need_base:
                base.append(None)
            else:
                base.append(without if without is not None and weights == "base" else self._base_hidden([item])[0])
            targets.append(self._targets(teacher, without, config))
        return targets, base

    def _paired_hidden(
        self, first: torch.Tensor, second: torch.Tensor, response_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`_response_hidden` of two inputs with the weights already selected, their common prefix computed once."""
        usable = min(first.shape[0], second.shape[0]) - response_len - 1  # each continuation predicts its response
        differs = (first[: max(usable, 0)] != second[: max(usable, 0)]).nonzero()
        shared = int(differs[0, 0]) if differs.numel() else max(usable, 0)
        if shared < SHARED_PREFIX_MIN_TOKENS:
            return self._response_hidden(first, response_len), self._response_hidden(second, response_len)
        decoder = self._peft.get_base_model().get_decoder()
        cache = decoder(input_ids=first[:shared].unsqueeze(0).to(self.device), use_cache=True).past_key_values
        hidden = decoder(input_ids=first[shared:].unsqueeze(0).to(self.device), past_key_values=cache, use_cache=True)
        cache.crop(shared - cache.get_seq_length())  # a negative count: drop the first continuation again
        other = decoder(input_ids=second[shared:].unsqueeze(0).to(self.device), past_key_values=cache, use_cache=True)
        return (hidden.last_hidden_state[0, -response_len - 1 : -1], other.last_hidden_state[0, -response_len - 1 : -1])

    @torch.no_grad()
    def _base_hidden(self, batch: list[TokenizedExample]) -> list[torch.Tensor]:
        """The base model's hidden states [T, H] at each response position: for the leash and the KL guard,
        which project them to the vocabulary chunk by chunk (the head has no LoRA, so this is the base's output)."""
        with self._weights("base"):
            return [self._response_hidden(item.student_ids, item.response_ids.shape[0]) for item in batch]

    # --- the step ---------------------------------------------------------------------------
    def step(self, state: AdapterState, examples: Sequence[TrainingExample], config: TrainingConfig) -> StepResult:
        """One SDPO update from a batch of feedback on the same adapter."""
        try:
            return self._step(state, examples, config)
        finally:
            if self.device.type == "cuda":
                # On a GPU shared with vLLM, memory the step's caching allocator kept would be missing when the
                # engine wakes and takes its weights and KV cache back.
                torch.cuda.empty_cache()
            else:
                trim_freed_memory()

    def _step(self, state: AdapterState, examples: Sequence[TrainingExample], config: TrainingConfig) -> StepResult:
        started = time.perf_counter()
        if not examples:
            raise ValueError("a step needs at least one example")
        torch.manual_seed(config.seed)
        tokenized = self._tokenize(examples, config, state.learned_feedback)
        own = [item.head(config.own_response_tokens) for item in tokenized]
        snapshot = self._snapshot(state, examples) if config.teacher == "snapshot" else None
        self._prepare(state, teacher=snapshot)
        rollouts: list[_Rollout] = []
        rollout_seconds = 0.0
        if config.teacher_rollouts:
            rollout_started = time.perf_counter()
            rollouts = self._teacher_rollouts(own, config)
            rollout_seconds = time.perf_counter() - rollout_started
        batch = own + [rollout.example for rollout in rollouts]
        need_base = config.kl_weight > 0 or config.max_kl_to_base is not None
        own_targets, own_base = self._teacher_and_base(own, config, need_base)
        targets = own_targets + [rollout.target for rollout in rollouts]
        base_hidden: list[torch.Tensor | None] = own_base + [None] * len(rollouts)
        if need_base:
            unscored = iter(self._base_hidden([r.example for r in rollouts if r.base_hidden is None]))
            base_hidden = own_base + [
                next(unscored) if rollout.base_hidden is None else rollout.base_hidden for rollout in rollouts
            ]
        leash = [self._leash(item, hidden, target, config) for item, hidden, target in zip(batch, base_hidden, targets)]

        params = self._slot_params(STUDENT)
        optimizer = _make_optimizer(params, state.optimizer, config)
        total_tokens = sum(item.response_ids.shape[0] for item in batch)
        # Cross-entropy on the kept rollouts' own tokens (`rollout_sample_weight`); never on the user's response.
        sample_weights = [0.0] * len(own) + [config.rollout_sample_weight] * len(rollouts)
        probe_started = time.perf_counter()
        probing = config.repetition_unlikelihood > 0 and config.loop_probe_tokens > 0
        loops = self._greedy_loops(examples, config) if probing else []
        probe_seconds = time.perf_counter() - probe_started
        # The student's own loops are scored for unlikelihood alone (no teacher, no leash, no cross-entropy), and
        # add nothing to the token count the loss is averaged over.
        no_teacher: list[None] = [None] * len(loops)
        trained = batch + loops
        trained_targets, trained_leash = [*targets, *no_teacher], [*leash, *no_teacher]
        sample_weights += [0.0] * len(loops)
        leash_weights = [entry.weights for entry in leash if entry is not None and entry.weights is not None]
        metrics: dict[str, float] = {}
        for update in range(config.optimizer_steps):
            optimizer.zero_grad(set_to_none=True)
            sums = self._backward(trained, trained_targets, trained_leash, sample_weights, config, total_tokens)
            if update == 0:  # the batch as it was scored before any update
                metrics = {
                    "loss": sums["loss"] / total_tokens,
                    "divergence": sums["divergence"] / total_tokens,
                    "kl_to_base": sums["kl"] / total_tokens,
                    "is_ratio_mean": sums["ratio"] / total_tokens,
                    "is_clipped_fraction": sums["clipped"] / total_tokens,
                    "repeated_fraction": sums["repeated"] / total_tokens,
                    "tokens": float(total_tokens),
                    "examples": float(len(own)),
                    "response_tokens": float(sum(item.response_ids.shape[0] for item in tokenized)),
                    "teacher_rollouts": float(len(rollouts)),
                    "loop_probes": float(len(loops)),
                    "loop_probe_seconds": probe_seconds,
                    "rollout_seconds": rollout_seconds,
                    "learning_rate": config.learning_rate,
                    # How much of the leash held, token-mean (training.leash_concern_nats; 1 without it).
                    "leash_weight_mean": float(torch.cat(leash_weights).mean()) if leash_weights else 1.0,
                }
            if not math.isfinite(sums["loss"]):
                return self._reject(state, metrics, started, "loss is not finite")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(list(params.values()), config.max_grad_norm))
            metrics["grad_norm"] = max(grad_norm, metrics.get("grad_norm", 0.0))
            if not math.isfinite(grad_norm):
                return self._reject(state, metrics, started, "gradient norm is not finite")
            optimizer.step()

        if config.max_kl_to_base is not None:
            kl_after = self._kl_to_base(batch, base_hidden)
            metrics["kl_to_base_after"] = kl_after
            if not math.isfinite(kl_after) or kl_after > config.max_kl_to_base:
                return self._reject(
                    state, metrics, started,
                    f"KL to base after the step is {kl_after:.4g} per token, above max_kl_to_base={config.max_kl_to_base}",
                )

        if config.collapse_check_tokens is not None:
            check_started = time.perf_counter()
            degenerate = self._degenerate_answers(examples, config)
            metrics["collapse_check_seconds"] = time.perf_counter() - check_started
            if degenerate:
                return self._reject(
                    state, metrics, started,
                    f"collapse: after the step the adapter's greedy answer is degenerate: {degenerate[0][:160]!r}",
                )

        student = self._read_slot(STUDENT)
        teacher = {name: tensor.clone() for name, tensor in (snapshot or state.teacher or state.student).items()}
        if snapshot is None:
            ema_update(teacher, student, config.ema_rate)
        new_state = AdapterState(
            lora=state.lora,
            base_model=state.base_model,
            student=student,
            teacher=teacher,
            optimizer=_optimizer_tensors(params, optimizer),
            learned_feedback=learn_feedback(state.learned_feedback, [example.feedback for example in examples]),
        )
        metrics["step_seconds"] = time.perf_counter() - started
        return StepResult(accepted=True, state=new_state, metrics=metrics)

    def _backward(
        self,
        batch: list[TokenizedExample],
        targets: list[TeacherTopK | None],
        leash: list[Leash | None],
        sample_weights: list[float],
        config: TrainingConfig,
        total_tokens: int,
    ) -> dict[str, float]:
        """Gradients of the token-mean SDPO loss over the batch, one example at a time; returns the sums.

        A long example is checkpointed (`training.gradient_checkpointing_tokens`): each layer keeps only its
        input and recomputes the rest in the backward pass, so an agent's conversation costs a few hidden vectors
        per token, not every intermediate activation of every layer (README, "Memory and long conversations").
        """
        sums = dict.fromkeys(LOSS_SUMS, 0.0)
        threshold = config.gradient_checkpointing_tokens
        with self._weights(STUDENT):
            self._set_train_mode(True)
            try:
                for item, target, item_leash, sample_weight in zip(batch, targets, leash, sample_weights):
                    self._set_checkpointing(threshold is not None and item.student_ids.shape[0] >= threshold)
                    hidden = self._response_hidden(item.student_ids, item.response_ids.shape[0])
                    item_sums = self._loss_sums(
                        hidden, item, target, item_leash, config, scale=1.0 / total_tokens, sample_weight=sample_weight
                    )
                    for key, value in item_sums.items():
                        sums[key] += value
            finally:
                self._set_train_mode(False)
        return sums

    def _set_train_mode(self, enabled: bool) -> None:
        """Train mode where a step needs it (checkpointing, LoRA dropout), not on every module of the model."""
        for module in self._train_mode_modules:
            module.training = enabled

    def _loss_sums(
        self,
        hidden: torch.Tensor,
        item: TokenizedExample,
        target: TeacherTopK | None,
        leash: Leash | None,
        config: TrainingConfig,
        scale: float | None,
        sample_weight: float = 0.0,
    ) -> dict[str, float]:
        """The SDPO loss of one item from its student hidden states, a chunk of positions at a time.

        With `scale`, the scaled loss is also backpropagated: each chunk's logits are freed after its own
        backward into the hidden states, and the trunk is backpropagated once. The loss is a sum over positions,
        so this is exactly the gradient of the whole at a fraction of the memory.
        """
        leaf = hidden.detach().requires_grad_(scale is not None)
        response = item.response_ids.to(self.device)
        sampling = None if item.sampling_logprobs is None else item.sampling_logprobs.to(self.device)
        repeated = repeated_ngrams(item.response_ids).to(self.device)  # whole (a loop spans chunks), on the host
        sums = dict.fromkeys(LOSS_SUMS, 0.0)
        for chunk in self._chunks(hidden.shape[0]):
            rows = None if leash is None else leash.rows(chunk)
            out = sdpo_loss(
                self._logits(leaf[chunk]),
                response[chunk],
                None if target is None else target.rows(chunk),
                alpha=config.alpha,
                is_clip=config.is_clip,
                kl_weight=config.kl_weight,
                sample_weight=sample_weight,
                repeat_weight=config.repetition_unlikelihood,
                repeated=repeated[chunk],
                base_logprobs=rows.base if rows is not None and isinstance(rows.base, torch.Tensor) else None,
                base_topk=rows.base if rows is not None and isinstance(rows.base, TeacherTopK) else None,
                leash_weights=None if rows is None else rows.weights,
                sampling_logprobs=None if sampling is None else sampling[chunk],
            )
            if scale is not None:
                (out.loss_sum * scale).backward()
            sums["loss"] += float(out.loss_sum.detach())
            sums["divergence"] += out.divergence_sum
            sums["kl"] += out.kl_sum
            sums["ratio"] += out.ratio_sum
            sums["clipped"] += out.clipped_count
            sums["tokens"] += out.token_count
            sums["repeated"] += out.repeated_count
        if scale is not None and leaf.grad is not None:
            hidden.backward(leaf.grad)
        return sums

    def _set_checkpointing(self, enabled: bool) -> None:
        """Gradient checkpointing of the decoder layers (it acts only in train mode), switched per example."""
        if enabled == self._checkpointing:
            return
        if enabled:
            self.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            # Enabling also hooks the embeddings to make their output require grad, which only the reentrant
            # variant needs; the hook would be added again at every switch.
            self.base.disable_input_require_grads()
        else:
            self.base.gradient_checkpointing_disable()
        self._checkpointing = enabled

    @staticmethod
    def _reject(state: AdapterState, metrics: dict[str, float], started: float, reason: str) -> StepResult:
        metrics["step_seconds"] = time.perf_counter() - started
        return StepResult(accepted=False, state=state, metrics=metrics, reason=reason)

    @torch.no_grad()
    def _teacher_rollouts(self, batch: list[TokenizedExample], config: TrainingConfig) -> list[_Rollout]:
        """Responses the teacher samples in its own context, aligned to the student's prompt.

        Trained on with the same loss as the student's response (no importance ratio: they are the teacher's
        own samples, so the forward KL on them is plain sequence-level distillation), plus cross-entropy on their
        own tokens (`rollout_sample_weight`): the kept ones are the teacher's best samples, and distilling only its
        average distribution would cap the student at the teacher's own compliance. Degenerate ones teach
        collapse and are dropped. Of the rest, the ones the feedback explains best are kept (`rollout_keep` in a
        step): the highest mean log-prob gain of the response from seeing the feedback (the same weights with
        and without it), which needs no verifier and knows nothing of what the feedback asks.

        Nothing is computed twice: every item's rollouts are sampled in one batch, the sampling logits are the
        teacher's targets, and with the base model as teacher the pass that scores a rollout without the
        feedback is also its base pass (for the leash and the KL guard).
        """
        weights = self._teacher_weights(config)
        # The budget is per step, shared by the batch's items: a batch of many items costs no more to sample.
        items = batch[: config.teacher_rollouts]
        per_item = config.teacher_rollouts // len(items)
        keep = None if config.rollout_keep is None else max(1, config.rollout_keep // len(items))
        budget = config.rollout_token_budget
        plan: list[tuple[TokenizedExample, int]] = []
        for item in items:
            cost = item.teacher_start + config.rollout_max_tokens
            count = min(per_item, budget // cost)
            if count:
                plan.append((item, count))
                budget -= count * cost
        if not plan:
            return []
        prompts = [item.teacher_ids[: item.teacher_start].tolist() for item, count in plan for _ in range(count)]
        kept: list[_Rollout] = []
        with self._weights(weights):
            samples = iter(self._sample_scored(prompts, config.rollout_max_tokens, config.rollout_temperature, config.seed))
            for item, count in plan:
                scored: list[tuple[float, _Rollout]] = []
                for row, logits in (next(samples) for _ in range(count)):
                    text = self.tokenizer.decode(row, skip_special_tokens=True)
                    if not text.strip() or is_degenerate(text):
                        continue
                    response = torch.tensor(row, dtype=torch.long)
                    example = TokenizedExample(
                        student_ids=torch.cat([item.student_ids[: item.student_start], response]),
                        teacher_ids=torch.cat([item.teacher_ids[: item.teacher_start], response]),
                        response_ids=response,
                        sampling_logprobs=None,
                    )
                    chosen = response.to(self.device).unsqueeze(-1)
                    logprobs = torch.log_softmax(logits, -1)
                    with_feedback = logprobs.gather(-1, chosen).squeeze(-1)
                    without = self._response_hidden(example.student_ids, len(row))
                    gain = float((with_feedback - self._chosen_logprobs(without, response)).mean())
                    target = self._guided(logprobs, without, config)
                    rollout = _Rollout(example, target, without if weights == "base" else None)
                    scored.append((gain, rollout))
                scored.sort(key=lambda pair: pair[0], reverse=True)
                kept.extend(rollout for _, rollout in scored[: keep or len(scored)])
        return kept

    @torch.no_grad()
    def _degenerate_answers(self, examples: Sequence[TrainingExample], config: TrainingConfig) -> list[str]:
        """The student's greedy answers to the batch's prompts and the guard's own, if at least half are degenerate.

        Greedy decoding is what exposes collapse (a loop the sampler would sometimes escape), and a few dozen
        tokens are enough to see it: this costs one short batched generation, not full answers. A long
        conversation (an agent's) is asked by its last user turn alone, so the check's cost does not grow with it.
        """
        with self._weights(STUDENT):
            rows = self._sample(self._probe_prompts(examples, config), config.collapse_check_tokens, 0.0, 0)
        texts = [self.tokenizer.decode(row, skip_special_tokens=True) for row in rows]
        degenerate = [text for text in texts if is_degenerate(text)]
        return degenerate if 2 * len(degenerate) >= len(texts) else []

    @torch.no_grad()
    def _greedy_loops(self, examples: Sequence[TrainingExample], config: TrainingConfig) -> list[TokenizedExample]:
        """The student's greedy answers (before the update) to the guard's prompts, where they repeat themselves.

        A collapsing adapter loops in its greedy answers long before its sampled ones: the responses users react
        to, sampled at a temperature, rarely go round a loop, so unlikelihood on them alone has little to act on.
        """
        loops = []
        prompts = self._probe_prompts(examples, config)
        with self._weights(STUDENT):
            rows = self._sample(prompts, config.loop_probe_tokens, 0.0, config.seed)
        for prompt, row in zip(prompts, rows):
            response = torch.tensor(row, dtype=torch.long)
            if repeated_ngrams(response).any():
                ids = torch.cat([torch.tensor(prompt, dtype=torch.long), response])
                loops.append(
                    TokenizedExample(student_ids=ids, teacher_ids=ids, response_ids=response, sampling_logprobs=None)
                )
        return loops

    def _probe_prompts(self, examples: Sequence[TrainingExample], config: TrainingConfig) -> list[list[int]]:
        """The batch's prompts and the guard's general ones, each once; a long conversation by its last user turn."""
        prompts: dict[tuple[int, ...], None] = {}
        for example in examples:
            ids = render_prompt_ids(self.tokenizer, example.messages)
            if len(ids) > COLLAPSE_CHECK_PROMPT_TOKENS:
                last = next(message for message in reversed(example.messages) if message.role == "user")
                ids = render_prompt_ids(self.tokenizer, [ChatMessage(role="user", content=last.content[-1500:])])
            prompts[tuple(ids)] = None
        for text in config.collapse_check_prompts:
            prompts[tuple(render_prompt_ids(self.tokenizer, [ChatMessage(role="user", content=text)]))] = None
        return [list(prompt) for prompt in prompts]

    @torch.no_grad()
    def _kl_to_base(self, batch: list[TokenizedExample], base_hidden: list[torch.Tensor]) -> float:
        """Exact KL(student || base) over the whole vocabulary, per response position, token-mean.

        The k3 estimate on the chosen tokens is fine as a loss term but useless as a guard after a step: the
        tokens were sampled before the update, and one token the student now finds unlikely makes
        exp(base - student) explode (hundreds of nats) on a perfectly healthy step.
        """
        total, count = 0.0, 0
        for item, base in zip(batch, base_hidden):
            length = item.response_ids.shape[0]
            ids = item.student_ids
            if ids.shape[0] > KL_GUARD_CONTEXT_TOKENS + length:
                # A long conversation is read from its last KL_GUARD_CONTEXT_TOKENS tokens, by both models: how far
                # the step moved the answer, in the context nearest to it, without a pass over an agent's context.
                ids = ids[-(KL_GUARD_CONTEXT_TOKENS + length):]
                with self._weights("base"):
                    base = self._response_hidden(ids, length)
            with self._weights(STUDENT):
                student = self._response_hidden(ids, length)
            for chunk in self._chunks(length):
                student_log = torch.log_softmax(self._logits(student[chunk]), -1)
                base_log = torch.log_softmax(self._logits(base[chunk]), -1)
                total += float((student_log.exp() * (student_log - base_log)).sum())
            count += length
        return total / max(count, 1)

    # --- measurement and sampling (tests, evaluation, benchmarks) ---------------------------
    @torch.no_grad()
    def divergence(
        self, state: AdapterState, examples: Sequence[TrainingExample], config: TrainingConfig
    ) -> float:
        """Token-mean GJSD between the student and the configured teacher on the given responses."""
        batch = self._tokenize(examples, config, state.learned_feedback)
        self._prepare(state)
        targets, _ = self._teacher_and_base(batch, config, need_base=False)
        total, count = 0.0, 0.0
        with self._weights(STUDENT):
            for item, target in zip(batch, targets):
                hidden = self._response_hidden(item.student_ids, item.response_ids.shape[0])
                sums = self._loss_sums(hidden, item, target, None, config, scale=None)
                total += sums["divergence"]
                count += sums["tokens"]
        return total / count

    @torch.no_grad()
    def response_logprob(
        self, state: AdapterState | None, messages: list[ChatMessage], response_ids: list[int]
    ) -> float:
        """Summed log-prob of `response_ids` after `messages`, under an adapter (or the base if None)."""
        return self.continuation_logprob(state, render_prompt_ids(self.tokenizer, messages), response_ids)

    @torch.no_grad()
    def continuation_logprob(self, state: AdapterState | None, prompt_ids: list[int], response_ids: list[int]) -> float:
        """Summed log-prob of `response_ids` after raw `prompt_ids` (as `/v1/score` with a raw prompt)."""
        ids = torch.tensor(list(prompt_ids) + list(response_ids), dtype=torch.long)
        response = torch.tensor(list(response_ids), dtype=torch.long)
        with self._weights(self._select(state)):
            return float(self._chosen_logprobs(self._response_hidden(ids, response.shape[0]), response).sum())

    @torch.no_grad()
    def generate(
        self,
        state: AdapterState | None,
        messages: list[ChatMessage],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        seed: int = 0,
    ) -> tuple[str, list[int]]:
        """Sample a response with an adapter (or the base model); returns its text and token ids."""
        return self.generate_batch(state, [messages], max_new_tokens, temperature, seed)[0]

    @torch.no_grad()
    def generate_batch(
        self,
        state: AdapterState | None,
        conversations: Sequence[list[ChatMessage]],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        seed: int = 0,
    ) -> list[tuple[str, list[int]]]:
        """Responses to several conversations in one left-padded batch (evaluation and tuning)."""
        prompts = [render_prompt_ids(self.tokenizer, messages) for messages in conversations]
        with self._weights(self._select(state)):
            rows = self._sample(prompts, max_new_tokens, temperature, seed)
        return [(self.tokenizer.decode(row, skip_special_tokens=True), row) for row in rows]

    @torch.no_grad()
    def _sample(self, prompts: Sequence[list[int]], max_new_tokens: int, temperature: float, seed: int) -> list[list[int]]:
        """Token ids sampled after each prompt with the weights already selected, cut after the first EOS."""
        return [row for row, _ in self._generate(prompts, max_new_tokens, temperature, seed, with_logits=False)]

    @torch.no_grad()
    def _sample_scored(
        self, prompts: Sequence[list[int]], max_new_tokens: int, temperature: float, seed: int
    ) -> list[tuple[list[int], torch.Tensor]]:
        """As `_sample`, with the sampling weights' logits [len(row), V] at each sampled position (before temperature)."""
        return self._generate(prompts, max_new_tokens, temperature, seed, with_logits=True)

    def _generate(
        self, prompts: Sequence[list[int]], max_new_tokens: int, temperature: float, seed: int, with_logits: bool
    ) -> list[tuple[list[int], torch.Tensor | None]]:
        width = max(len(prompt) for prompt in prompts)
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=self.device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        torch.manual_seed(seed)
        output = self._peft.generate(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None,
            top_p=None,
            top_k=None,
            pad_token_id=pad,
            eos_token_id=eos,
            return_dict_in_generate=True,
            output_logits=with_logits,
        )
        sampled = output.sequences[:, width:]
        logits = torch.stack(output.logits, dim=1).float() if with_logits else None  # [B, new, V]
        results = []
        for index, row in enumerate(sampled.tolist()):
            if eos in row:
                row = row[: row.index(eos) + 1]
            results.append((row, None if logits is None else logits[index, : len(row)]))
        return results


def _check_layout(params: dict[str, torch.nn.Parameter], tensors: dict[str, torch.Tensor]) -> None:
    """Same names and shapes as the base model's LoRA slots, or a ValueError that says what differs."""
    if params.keys() != tensors.keys():
        missing, extra = sorted(params.keys() - tensors.keys())[:3], sorted(tensors.keys() - params.keys())[:3]
        raise ValueError(f"adapter tensors do not match the base model's LoRA layout: missing {missing}, unexpected {extra}")
    for name, parameter in params.items():
        if tuple(tensors[name].shape) != tuple(parameter.shape):
            raise ValueError(
                f"adapter tensor {name} has shape {tuple(tensors[name].shape)}, expected {tuple(parameter.shape)}"
            )


def _make_optimizer(
    params: dict[str, torch.nn.Parameter], saved: dict[str, torch.Tensor], config: TrainingConfig
) -> torch.optim.AdamW:
    """AdamW over the student slot, with moments restored from the adapter's previous version.

    Hyperparameters always come from `config`, never from the saved state, so a changed learning rate
    takes effect on the next step.
    """
    names = sorted(params)
    optimizer = torch.optim.AdamW(
        [params[name] for name in names], lr=config.learning_rate, betas=config.betas, weight_decay=config.weight_decay
    )
    if saved:
        state_dict = optimizer.state_dict()
        state_dict["state"] = {
            index: {
                "step": saved[f"{name}::step"].clone(),
                "exp_avg": saved[f"{name}::exp_avg"].clone(),
                "exp_avg_sq": saved[f"{name}::exp_avg_sq"].clone(),
            }
            for index, name in enumerate(names)
            if f"{name}::exp_avg" in saved
        }
        optimizer.load_state_dict(state_dict)
    return optimizer


def _optimizer_tensors(params: dict[str, torch.nn.Parameter], optimizer: torch.optim.AdamW) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name, parameter in params.items():
        for key, value in optimizer.state.get(parameter, {}).items():
            # The optimizer is the step's own (made from copies of the saved moments) and dropped after it, so
            # its tensors are handed over, not copied once more: on the CPU `to` returns the same tensor.
            tensors[f"{name}::{key}"] = torch.as_tensor(value).detach().to("cpu", torch.float32)
    return tensors
