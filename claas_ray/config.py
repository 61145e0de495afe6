"""One typed configuration schema for claas-ray.

Every section forbids unknown keys, so a typo in a serve YAML or an environment override fails at start
with an error that names the key, instead of being silently ignored.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from claas_ray.cpu_cores import parse_cpu_list


def _cpu_list(text: str) -> str:
    parse_cpu_list(text)  # ValueError with the reason
    return text


CpuList = Annotated[str, AfterValidator(_cpu_list)]
"""A Linux CPU list ("0", "2-5", "0,4-7"), checked when the config loads (which cores exist is checked on the node)."""


def _ray_resources(resources: dict[str, float]) -> dict[str, float]:
    for name, amount in resources.items():
        if not name or name in ("CPU", "GPU", "memory", "object_store_memory"):
            raise ValueError(f"{name!r} is not a custom resource (CPUs and GPUs have keys of their own)")
        if amount <= 0:
            raise ValueError(f"{name}: {amount}: an amount must be above 0")
    return resources


RayResources = Annotated[dict[str, float], AfterValidator(_ray_resources)]
"""Custom Ray resources by name, as nodes offer them (`ray start --resources '{"gpu_slot": 1}'`)."""

VllmLoraRank = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]
"""The LoRA ranks vLLM 0.32's engine accepts as `max_lora_rank` (vllm/config/lora.py): any other fails at start."""

ENV_PREFIX = "CLAAS_RAY__"
"""Environment overrides: `CLAAS_RAY__TRAINING__LEARNING_RATE=1e-4` sets `training.learning_rate`."""

APPENDED_HINDSIGHT_TEMPLATE = (
    "\n\n=== HINDSIGHT ===\n"
    "[A later message from the user about your answer. Use it to answer the original request well.]\n"
    "{feedback}"
)
"""The earlier default: a hindsight block after the user's message. Tinker's SDPO signal (scores on the student's
own samples, no rollouts) was tuned with it, and `configs/tinker.yaml` keeps it."""

DEFAULT_HINDSIGHT_TEMPLATE = "{feedback}\n\n{message}"
"""The teacher's last user turn: the feedback first, then the user's message. A small model answers what it
read last, so the question last keeps the teacher answering it (with the feedback appended after it, the 135M
model talked about the feedback instead); README, "How the defaults were tuned"."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(StrictModel):
    """Shape of a new adapter. Kept per adapter so adapters of different ranks can coexist."""

    rank: int = Field(16, ge=1, le=256, description="LoRA rank r.")
    alpha: int = Field(32, ge=1, le=1024, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout during training steps.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="Projection modules that get LoRA weights (all attention and MLP projections).",
    )

    @field_validator("target_modules")
    @classmethod
    def _projections_only(cls, modules: list[str]) -> list[str]:
        refused = sorted({"lm_head", "embed_tokens"} & set(modules))
        if refused:
            raise ValueError(f"{refused} cannot be LoRA targets: the trainer and vLLM adapt projection layers only")
        return modules


class TrainingConfig(StrictModel):
    """SDPO step knobs.

    The defaults were tuned on the embedded 135M model with benchmarks/tune_sdpo.py and the eval harness
    (README, "How the defaults were tuned"). They differ from the SDPO reference (JSD alpha 0.5, EMA
    teacher, lr 1e-5) because those did not move this model in 8 steps; large models want a lower lr.
    """

    learning_rate: float = Field(1e-3, gt=0, le=1.0, description="AdamW learning rate for LoRA weights.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    alpha: float = Field(
        0.0, ge=0.0, le=1.0, description="Generalized JSD interpolation: 0 forward KL, 1 reverse KL."
    )
    top_k: int = Field(100, ge=1, le=4096, description="Teacher log-probs kept per position (plus a tail bucket).")
    is_clip: float = Field(2.0, gt=0, description="Upper clip of the importance ratio student-now / sampler.")
    kl_weight: float = Field(
        0.3, ge=0,
        description="Weight of the KL(student || base) leash, where the feedback has no say (leash_concern_nats).",
    )
    leash_top_k: int | None = Field(
        64, ge=1, le=4096,
        description="The leash is KL(student || base) over the base model's top-K tokens and a tail bucket at each "
        "position, as the teacher's targets are kept. None: Schulman's k3 estimate on the response's own token, "
        "which only sees that token; on the 135M model it raised general-text NLL with its weight (README, 'How the "
        "defaults were tuned').",
    )
    leash_concern_nats: float | None = Field(
        0.5, gt=0,
        description="Weight the leash at each position by exp(-c / this), where c is KL(teacher || base) there: how "
        "much the feedback changes the base model's next token. Where the feedback is concerned (a list's first "
        "dash, a name) the leash lets go; elsewhere it holds at kl_weight. None: the same weight everywhere. On the "
        "135M model it raised clean compliance on five preferences of six over a uniform leash (README, 'The leash').",
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient-norm clip.")
    teacher: Literal["ema", "base", "current", "snapshot"] = Field(
        "base",
        description="Teacher weights: EMA of the student, the frozen base model, the student itself, or a snapshot: "
        "the adapter as it was when the feedback it is being taught first arrived, frozen while that feedback is "
        "taught, so a new preference is taught by a teacher that already does the earlier ones "
        "(README, 'Preferences do not yet accumulate').",
    )
    ema_rate: float = Field(0.05, gt=0, le=1.0, description="EMA teacher update: teacher = (1-r) teacher + r student.")
    teacher_guidance: float = Field(
        1.0, ge=1.0, le=4.0,
        description="Scale of the feedback's effect on the teacher's targets (classifier-free guidance): among the "
        "tokens the teacher finds plausible, p_teacher * (p_teacher / p_without_feedback) ** (scale - 1), renormalised. "
        "1 (default): the plain teacher. On the 135M model 1.5 raised `formal` and made `identity` and French loop more "
        "(README, 'A guided teacher'). Costs a pass of the teacher without the feedback when it is not the base model.",
    )
    hindsight_template: str = Field(
        DEFAULT_HINDSIGHT_TEMPLATE,
        description="The teacher's last user turn: {message} is the user's text, {feedback} the feedback (with the "
        "adapter's earlier feedback); without {message} the template is appended to the turn. Must contain {feedback}.",
    )
    max_kl_to_base: float | None = Field(
        5.0, gt=0, description="Reject a step whose post-step KL(student || base) per token exceeds this."
    )
    max_step_tokens: int | None = Field(
        None, ge=16,
        description="Longest example (teacher prompt + response) a step takes; None: the model's context "
        "(model.max_model_len). Memory grows with it (README, \"Memory and long conversations\"). Longer "
        "feedback is refused (400) or rejected, with the reason.",
    )
    gradient_checkpointing_tokens: int | None = Field(
        1024, ge=0,
        description="Student passes over at least this many tokens (conversation plus response) recompute each "
        "layer's activations in the backward pass instead of keeping them for every token: their memory per token "
        "falls about 10x for a fifth more time. Shorter ones, whose activations are small, keep them. 0: always; "
        "None: never.",
    )
    feedback_memory: int = Field(
        8, ge=0, le=32,
        description="The teacher's context also holds up to this many earlier feedback texts the adapter was taught "
        "(oldest first, each once), so a new preference is taught by a teacher that keeps the old ones: preferences "
        "accumulate instead of the newest erasing the rest. 0: the teacher sees only the item's own feedback.",
    )
    teacher_rollouts: int = Field(
        8, ge=0, le=16,
        description="Responses the teacher samples in a step (its own context, feedback included; shared by the "
        "batch's items) that the student also trains on, beside the users' own responses: the student is pulled toward fluent compliant text, not "
        "only scored on its own, possibly degenerate, prefixes. Degenerate rollouts are dropped.",
    )
    own_response_tokens: int | None = Field(
        16, ge=1,
        description="Only the first N tokens of the user's own (student-sampled) response count in the loss; teacher "
        "rollouts count whole. The opening carries the feedback's signal; later tokens of a drifting student pull "
        "toward whatever the teacher does after text it would never write. None: all tokens count.",
    )
    optimizer_steps: int = Field(
        2, ge=1, le=8,
        description="AdamW updates per feedback batch on the same scored tokens (teacher targets computed once).",
    )
    rollout_keep: int | None = Field(
        4, ge=1, le=16,
        description="Of the teacher's rollouts in a step, train on this many that the feedback explains best (highest mean "
        "log-prob gain from seeing it); None keeps every rollout that is not degenerate.",
    )
    rollout_token_budget: int = Field(
        2048, ge=0,
        description="Most tokens (each rollout's prompt plus rollout_max_tokens, summed) a step's rollouts may take. "
        "Every pass of the step re-reads a rollout whole, so a long conversation (an agent's 2,500-token prompt) gets "
        "fewer rollouts, or none, rather than a step that takes minutes on a CPU. Raise it on a GPU.",
    )
    rollout_sample_weight: float = Field(
        0.0, ge=0.0, le=4.0,
        description="On a kept teacher rollout, the target at each position is the teacher's distribution plus this "
        "weight on the token the teacher sampled (a cross-entropy term on the rollout). The kept rollouts are the ones "
        "the feedback explains best, so this pulls the student past the teacher's average toward its best samples. "
        "0 (default): plain distillation. On the 135M model 1 taught a name far better but made preferences its "
        "teacher misreads (French, no emoji) loop more: README, 'How the defaults were tuned'.",
    )
    repetition_unlikelihood: float = Field(
        0.0, ge=0.0, le=4.0,
        description="Weight of an unlikelihood term, -log(1 - p), on every token that completes a token trigram its "
        "response already had, in the responses a step trains on and in the student's own greedy answers to the "
        "collapse guard's prompts (loop_probe_tokens, before the update): the student is taught not to go round a loop, "
        "whatever the feedback asked. 0 (default): off. On the 135M model 1 halved the looping of the preferences that "
        "collapse and raised their clean compliance, but cost 0.5 to 2 points of general-text NLL, which took "
        "`concise` over the 3% bound: README, 'How the defaults were tuned'.",
    )
    loop_probe_tokens: int = Field(
        48, ge=0, le=256,
        description="With repetition_unlikelihood, the length of the student's greedy answers searched for loops before "
        "the update. 0: only the responses the step trains on.",
    )
    rollout_temperature: float = Field(0.7, ge=0, le=2.0, description="Sampling temperature of teacher rollouts.")
    rollout_max_tokens: int = Field(64, ge=1, le=1024, description="Longest teacher rollout, in tokens.")
    collapse_check_tokens: int | None = Field(
        32, ge=4, le=256,
        description="Collapse guard: after the update the student answers the batch's prompts greedily for this many "
        "tokens, and the step is rejected (reason `collapse`) if those answers are degenerate. None turns it off.",
    )
    collapse_check_prompts: list[str] = Field(
        default_factory=lambda: ["Tell me about your favourite place.", "How do I make a cup of tea?"],
        max_length=8,
        description="General prompts the collapse guard answers beside the batch's own: an adapter can stay fluent "
        "on the prompt it was trained on and loop everywhere else.",
    )
    append_eos: bool = Field(
        True, description="End a response given as text with the end-of-turn token, so length is learned too."
    )
    seed: int = Field(0, description="Seed for dropout and any sampling inside a step.")

    @model_validator(mode="after")
    def _template_has_feedback(self) -> TrainingConfig:
        if "{feedback}" not in self.hindsight_template:
            raise ValueError("training.hindsight_template must contain '{feedback}'")
        return self


class ModelConfig(StrictModel):
    """Which base model, and how to place it."""

    base_model: str = Field(
        "smollm2-135m",
        description="A registry name (see `claas-ray models list`), a local folder, or a Hugging Face hub id.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Training device.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Training dtype: auto is bfloat16 on CUDA and on CPUs that multiply bf16 natively "
        "(AVX512-BF16, AMX, Arm BF16), float32 on other CPUs."
    )
    max_model_len: int = Field(1024, ge=64, description="Longest prompt + response in tokens.")


class LocalStoreConfig(StrictModel):
    """Adapters as folders on this machine (or a shared file system)."""

    kind: Literal["local"] = "local"
    root: str = Field("~/.cache/claas-ray/adapters", description="Root folder of the adapter store (~ is expanded).")

    def root_path(self) -> Path:
        return Path(os.path.expanduser(self.root))


class S3StoreConfig(StrictModel):
    """Adapters in an S3 bucket (or an S3-compatible server), with a local cache for loaders that need paths."""

    kind: Literal["s3"]
    bucket: str = Field(min_length=1, description="The bucket. Credentials come from boto3's usual sources.")
    prefix: str = Field("claas-ray/adapters", description="Key prefix inside the bucket.")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint, e.g. MinIO; None for AWS.")
    region: str | None = Field(None, description="S3 region.")
    root: str = Field("~/.cache/claas-ray/adapters", description="Local cache of downloaded versions (~ is expanded).")

    def root_path(self) -> Path:
        return Path(os.path.expanduser(self.root))


class TinkerStoreConfig(StrictModel):
    """Adapter versions as Tinker checkpoint paths, in `<root>/tinker_adapters.json`; the weights stay on Tinker."""

    kind: Literal["tinker"]
    root: str = Field("~/.cache/claas-ray/tinker", description="Folder of the JSON file (~ is expanded).")

    def root_path(self) -> Path:
        return Path(os.path.expanduser(self.root))


def _store_kind(value: Any) -> str:
    """`store.kind`, `local` when left out (configs written before the kinds had their own sections)."""
    return value.get("kind", "local") if isinstance(value, dict) else getattr(value, "kind", "local")


StoreConfig = Annotated[
    Annotated[LocalStoreConfig, Tag("local")] | Annotated[S3StoreConfig, Tag("s3")] | Annotated[TinkerStoreConfig, Tag("tinker")],
    Discriminator(_store_kind, custom_error_type="store_kind",
                  custom_error_message="store.kind must be one of local, s3, tinker"),
]
"""Where adapters live: one section per `kind`, each with only the settings that kind reads."""


class ServingConfig(StrictModel):
    """The inference deployment."""

    engine: Literal["vllm", "tinker"] = Field("vllm", description="vLLM on this machine, or Tinker's sampling.")
    served_model_name: str | None = Field(
        None, description="Name of the base model in the API; defaults to model.base_model."
    )
    num_replicas: int = Field(1, ge=1, le=64, description="Inference replicas (each one vLLM engine).")
    replica_num_cpus: float = Field(1.0, ge=0, description="Ray CPUs reserved per inference replica.")
    replica_num_gpus: float = Field(0.0, ge=0, description="Ray GPUs per inference replica.")
    replica_resources: RayResources = Field(
        default_factory=dict, description="Custom Ray resources each inference replica takes (`ray start --resources`): "
        "pins replicas to the nodes or GPU slots that offer them, or spreads them, one per node, with one unit per node.",
    )
    max_loras: int = Field(4, ge=1, description="Adapters that may appear in one vLLM batch.")
    max_cpu_loras: int = Field(16, ge=1, description="Adapter versions kept loaded per replica (LRU).")
    max_tmpfs_adapters: int = Field(
        64, ge=1, description="Adapters whose broadcast versions a replica keeps on tmpfs (RAM; LRU, two versions "
        "each); an adapter that falls out is read from the adapter store when it is next asked for.",
    )
    max_lora_rank: VllmLoraRank = Field(
        16, description="Largest LoRA rank the engine accepts (one of the ranks vLLM's kernels support)."
    )
    gpu_memory_utilization: float = Field(
        0.3, gt=0, le=1, description="vLLM memory share; on the CPU build, the share of RAM reserved."
    )
    kv_cache_memory_gb: float | None = Field(
        None, gt=0, description="Explicit KV-cache size per replica; None lets vLLM size it from the share above."
    )
    enforce_eager: bool = Field(True, description="Skip graph capture: faster start, fine on the CPU.")
    max_num_seqs: int = Field(16, ge=1, description="Concurrent sequences per engine.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", description="Serving dtype.")
    cpu_cores: CpuList | None = Field(
        None,
        description="CPU build: the cores each inference engine's compute threads are bound to, as a CPU list ('0', "
        "'0-3'; vLLM's VLLM_CPU_OMP_THREADS_BIND). Every replica on a node takes the same ones. None: vLLM chooses.",
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra vLLM AsyncEngineArgs, passed through as they are."
    )

    def lora_wire_dtype(self) -> str | None:
        """The dtype a broadcast sends adapter weights in: the serving dtype when it is a half type (vLLM casts
        LoRA weights to it on load, so the replica serves the same numbers from half the bytes); else None (as
        trained, float32), since with `auto` the engine's dtype is only known once it has started."""
        return self.dtype if self.dtype in ("bfloat16", "float16") else None

    @model_validator(mode="after")
    def _lora_cache_holds_a_batch(self) -> ServingConfig:
        if self.max_cpu_loras < self.max_loras:
            raise ValueError("serving.max_cpu_loras must be >= serving.max_loras")
        return self


class ModalBackendConfig(StrictModel):
    """Where the deployed Modal trainer is (`modal deploy -m claas_ray.backends.modal.app`)."""

    app_name: str = Field("claas-ray-trainer", description="Name of the deployed Modal app.")
    class_name: str = Field("SDPOTrainerGPU", description="The trainer class inside it.")
    environment: str | None = Field(None, description="Modal environment; None for the workspace default.")


class TinkerConfig(StrictModel):
    """Tinker (`serving.engine`, `trainer.backend` and `store.kind` all `tinker`); TINKER_API_KEY from the environment."""

    base_model: str | None = Field(None, description="Tinker's name of the base model; default: model.base_model.")
    kl_coef: float = Field(1.0, gt=0, description="Per-token advantage = kl_coef * (teacher - student log-prob).")
    service_factory: str | None = Field(
        None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="`module:callable` that takes this config and returns an object with the interface of Tinker's "
        "ServiceClient, used instead of Tinker's own client (how tests inject a stand-in); None: Tinker itself.",
    )


class TrainerConfig(StrictModel):
    """The trainer deployment and how it shares devices with inference."""

    backend: Literal["local", "modal", "tinker"] = Field("local", description="Where SDPO steps run.")
    modal: ModalBackendConfig = Field(default_factory=ModalBackendConfig)
    num_cpus: float = Field(1.0, ge=0, description="Ray CPUs reserved for the trainer.")
    num_gpus: float = Field(0.0, ge=0, description="Ray GPUs for the trainer (fractional to share a device).")
    resources: RayResources = Field(
        default_factory=dict, description="Custom Ray resources the trainer takes: with colocation, give it and its "
        "replicas a resource of the same GPU slot so Ray places them on one node (see the README's cluster section).",
    )
    torch_threads: int | None = Field(None, ge=1, description="Threads for a step; default: Ray's (one per reserved CPU).")
    cpu_niceness: int = Field(
        10, ge=0, le=19,
        description="Added to the CPU niceness of the thread that runs steps (and the threads it starts): where steps "
        "and serving share cores (the CPU build), serving comes first and a step under load takes longer. 0: equal.",
    )
    cpu_cores: CpuList | None = Field(
        None,
        description="The cores the trainer's process runs on, as a CPU list ('1', '4-7'); its step uses one thread per core "
        "unless torch_threads says otherwise. Give it cores the engines do not use (serving.cpu_cores) where the "
        "machine has them. None: any core, as Ray gives it.",
    )
    max_batch_items: int = Field(8, ge=1, le=256, description="Most feedback items of one adapter in one step.")
    max_cached_states: int = Field(
        16, ge=1, description="Adapters whose training state (student, teacher, optimizer moments) stays in the "
        "trainer's memory between steps (LRU); others are read from the adapter store at their next step.",
    )
    max_broadcast_adapters: int = Field(
        256, ge=1, description="Adapters whose newest broadcast version stays pinned in Ray's object store for "
        "replicas that start later (LRU); those that fall out load from the adapter store on first use.",
    )
    max_pending_per_adapter: int = Field(64, ge=1, description="Queued items per adapter before 429.")
    colocation: Literal["none", "sleep"] = Field(
        "none", description="`sleep`: put vLLM to sleep while a step runs (one shared GPU); `none` on the CPU."
    )
    sleep_level: Literal[1] = Field(
        1, description="vLLM sleep level while the trainer steps: 1 offloads the weights to host memory and drops the "
        "KV cache. Level 2 is refused: it discards the weights and nothing here reloads them.",
    )
    sleep_mode: Literal["wait", "keep"] = Field(
        "wait",
        description="What a sleeping replica does with answers in flight: `wait` finishes them first (new requests "
        "queue until it wakes), `keep` freezes them and resumes them on wake. Never aborted: a cut-off answer "
        "would reach the user.",
    )
    sleep_timeout_s: float = Field(60.0, gt=0, description="Longest wait for replicas to sleep or wake.")
    broadcast_timeout_s: float = Field(60.0, gt=0, description="Longest wait for replicas to load a version.")
    replicas_ready_timeout_s: float = Field(
        600.0, gt=0, description="At start, the longest wait for the inference replicas to follow the trainer before "
        "it steps anyway (a vLLM engine on a GPU takes minutes to start).",
    )
    poll_timeout_s: float = Field(10.0, gt=0, description="Long-poll period of the replicas' adapter feed.")
    tmpfs_dir: str = Field("/dev/shm/claas-ray", description="Where replicas materialise broadcast versions.")

    @field_validator("sleep_level", mode="before")
    @classmethod
    def _level_two_discards_the_weights(cls, level: Any) -> Any:
        if level == 2:
            raise ValueError("level 2 discards vLLM's weights and nothing reloads them on wake, so a woken replica "
                             "would serve garbage; use 1")
        return level

    def step_threads(self) -> int | None:
        """Threads a step uses: `torch_threads`, else one per core of `cpu_cores`; None leaves Ray's (one per
        reserved CPU)."""
        if self.torch_threads is not None:
            return self.torch_threads
        return len(parse_cpu_list(self.cpu_cores)) if self.cpu_cores is not None else None


class JournalConfig(StrictModel):
    """Where the feedback journal and the completion log live (the state the router and the trainer share)."""

    kind: Literal["sqlite", "postgres"] = Field(
        "sqlite", description="`sqlite`: files under `state_dir`, for one node (the router and the trainer must share "
        "its disk); `postgres`: a PostgreSQL server every deployment reaches over the network (a Ray cluster).",
    )
    dsn: str | None = Field(
        None, description="postgres: a libpq connection string ('host=db port=5432 dbname=claas user=claas'); None: the "
        "CLAAS_RAY_POSTGRES_DSN environment variable, which keeps a password out of the YAML.",
    )


class RouterConfig(StrictModel):
    """The HTTP ingress."""

    resources: RayResources = Field(
        default_factory=dict, description="Custom Ray resources the router takes (pins it to the nodes that offer them).",
    )
    completion_log_size: int = Field(
        10000, ge=1, description="Completion records kept for feedback by completion id (oldest dropped)."
    )
    request_timeout_s: float = Field(300.0, gt=0, description="Longest a generation may take.")
    eval_reports_dir: str | None = Field(
        None, description="Folder of `claas-ray eval` outputs the dashboard shows (default: <state_dir>/eval)."
    )
    max_body_bytes: int = Field(4 * 2**20, ge=1024, description="Largest JSON request body.")
    max_import_bytes: int = Field(
        512 * 2**20, ge=1024, description="Largest adapter zip accepted by `POST /v1/lora/import`."
    )
    max_messages: int = Field(256, ge=1, description="Most messages in one chat request or feedback item.")
    max_feedback_tokens: int = Field(1024, ge=1, description="Longest feedback text, in the base model's tokens.")
    retry_after_s: int = Field(
        5, ge=1, description="Retry-After of a 429 when no step duration has been measured yet."
    )
    claas_feedback_timeout_s: float = Field(
        170.0, gt=0, le=600,
        description="A CLaaS-shaped feedback body (`requests: [...]`) waits this long for its items' outcome, as CLaaS "
        "answers after the step (its clients time out at 180 s); then 504 with the feedback ids, which stay queryable.",
    )
    request_training: list[Literal["learning_rate", "alpha", "is_clip", "kl_weight"]] = Field(
        default_factory=list,
        description="Training settings a feedback item may set for itself (CLaaS's `training`, for sweeping settings with "
        "its harness); admin keys only, each within REQUEST_TRAINING_BOUNDS. Empty: every item's `training` is ignored.",
    )
    reinit: Literal["conflict", "reset"] = Field(
        "conflict",
        description="`POST /v1/lora/init` of an existing adapter: `conflict` answers 409; `reset` publishes a new "
        "zero-effect version (CLaaS's behaviour), the earlier versions kept for rollback.",
    )


TINKER_IGNORES = (
    "alpha", "top_k", "is_clip", "kl_weight", "leash_top_k", "leash_concern_nats", "ema_rate", "teacher_guidance",
    "max_kl_to_base",
    "feedback_memory", "teacher_rollouts", "own_response_tokens", "optimizer_steps", "rollout_keep", "rollout_token_budget",
    "rollout_temperature", "rollout_max_tokens", "rollout_sample_weight", "repetition_unlikelihood",
    "loop_probe_tokens", "collapse_check_tokens", "collapse_check_prompts", "seed",
)
"""Training settings of the local SDPO step that Tinker's step (`claas_ray/backends/tinker/trainer.py`) has no
counterpart for: on `trainer.backend: tinker` a value other than the default is refused."""

REQUEST_TRAINING_BOUNDS: dict[str, tuple[float, float]] = {
    "learning_rate": (1e-7, 1e-2),
    "alpha": (0.0, 1.0),
    "is_clip": (1.0, 20.0),
    "kl_weight": (0.0, 1.0),
}
"""Inclusive bounds of what a feedback item may set when `router.request_training` allows it."""


class ApiKey(StrictModel):
    """One bearer token and who it is. Give `key_sha256` (the hex digest) to keep the secret out of files."""

    key: str | None = Field(None, min_length=16, description="The token itself.")
    key_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the token, in hex.")
    tenant: str | None = Field(
        None, pattern=r"^[A-Za-z0-9._-]{1,64}$", description="The namespace this key owns: adapters `tenant/...`."
    )
    admin: bool = Field(False, description="Manages every namespace, the dashboard and the metrics.")

    @model_validator(mode="after")
    def _one_secret_and_an_owner(self) -> ApiKey:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError("give exactly one of key or key_sha256")
        if self.tenant is None and not self.admin:
            raise ValueError("a key needs a tenant, or admin: true")
        if self.tenant is not None and set(self.tenant) == {"."}:
            raise ValueError("tenant must not be '.' or '..'")
        return self


class AuthConfig(StrictModel):
    """Bearer-token auth. On unless turned off explicitly; the app refuses to start with it on and no keys."""

    enabled: bool = Field(True, description="false: anyone who reaches the port may use and train every adapter.")
    keys: list[ApiKey] = Field(default_factory=list, description="Keys in the config itself.")
    keys_file: str | None = Field(
        None, description="YAML list of keys (same fields); re-read when it changes, so keys can be revoked live."
    )


class ClaasConfig(StrictModel):
    """The whole configuration tree."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    store: StoreConfig = Field(default_factory=LocalStoreConfig)
    serving: ServingConfig = Field(default_factory=ServingConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    tinker: TinkerConfig = Field(default_factory=TinkerConfig)
    journal: JournalConfig = Field(default_factory=JournalConfig)
    multi_node: bool = Field(
        False, description="The deployments may run on different nodes of a Ray cluster (configs/cluster.yaml): no "
        "two of them may share state through a local disk, so `store` must be s3 (or tinker) and `journal` postgres.",
    )
    auth: AuthConfig = Field(default_factory=AuthConfig)
    state_dir: str = Field(
        "~/.cache/claas-ray/state", description="Router and trainer state: completion log, feedback journal."
    )

    @model_validator(mode="after")
    def _colocation_needs_a_shared_gpu(self) -> ClaasConfig:
        """The shares of a GPU the trainer and a replica split must fit it, and be sized up front: Ray does not place
        a group that cannot fit (the deploy would hang), and vLLM profiling free memory while the trainer loads
        the same device would size its KV cache wrong."""
        trainer, serving = self.trainer, self.serving
        if trainer.colocation != "sleep":
            return self
        if not (0 < trainer.num_gpus < 1 and 0 < serving.replica_num_gpus < 1):
            raise ValueError(
                "trainer.colocation=sleep shares one GPU: set trainer.num_gpus and serving.replica_num_gpus to fractions"
            )
        if trainer.num_gpus + serving.replica_num_gpus > 1:
            raise ValueError(f"trainer.num_gpus ({trainer.num_gpus}) + serving.replica_num_gpus "
                             f"({serving.replica_num_gpus}) exceed one GPU: Ray could never place them together")
        if serving.gpu_memory_utilization > serving.replica_num_gpus:
            raise ValueError(f"serving.gpu_memory_utilization ({serving.gpu_memory_utilization}) exceeds the replica's "
                             f"share of the GPU (serving.replica_num_gpus {serving.replica_num_gpus}); the trainer "
                             "is capped at trainer.num_gpus of it")
        if serving.kv_cache_memory_gb is None:
            raise ValueError("serving.kv_cache_memory_gb: set it when trainer.colocation=sleep; vLLM would otherwise "
                             "size its KV cache by profiling a device the trainer is loading at the same time")
        return self

    def node_local_state(self) -> list[str]:
        """The settings that keep shared state on one node's disk: wrong as soon as deployments run on two nodes."""
        local = []
        if self.store.kind == "local":
            local.append("store.kind: local (adapters in a folder of one node)")
        if self.journal.kind == "sqlite":
            local.append("journal.kind: sqlite (the feedback journal and completion log in files of one node)")
        return local

    @model_validator(mode="after")
    def _multi_node_state_is_networked(self) -> ClaasConfig:
        if self.multi_node and self.node_local_state():
            raise ValueError(f"multi_node: true, but {' and '.join(self.node_local_state())}: a deployment on another "
                             "node would see other files (feedback never trained, adapters 404). Use store.kind: s3 and "
                             "journal.kind: postgres")
        return self

    @model_validator(mode="after")
    def _ranks_fit(self) -> ClaasConfig:
        if self.lora.rank > self.serving.max_lora_rank:
            raise ValueError("lora.rank must be <= serving.max_lora_rank, or vLLM cannot load new adapters")
        return self

    @model_validator(mode="after")
    def _tinker_is_all_or_nothing(self) -> ClaasConfig:
        """Tinker keeps the adapters: it must train them, store them and serve them."""
        uses = {"serving.engine": self.serving.engine, "trainer.backend": self.trainer.backend, "store.kind": self.store.kind}
        on = [key for key, value in uses.items() if value == "tinker"]
        if on and len(on) != len(uses):
            raise ValueError(f"{', '.join(on)} is tinker: set all of {', '.join(uses)} to tinker")
        return self

    @model_validator(mode="after")
    def _backend_honours_the_settings(self) -> ClaasConfig:
        """A setting the chosen backend would ignore is refused here, never silently changed at run time."""
        if self.trainer.colocation == "sleep" and self.trainer.backend != "local":
            raise ValueError(f"trainer.colocation=sleep: steps run on {self.trainer.backend}, not on this machine's GPU; "
                             "use trainer.colocation: none")
        if self.trainer.backend != "tinker":
            return self
        if self.training.teacher in ("ema", "snapshot"):
            raise ValueError(f"training.teacher={self.training.teacher}: Tinker keeps no second copy of an adapter; "
                             "use base or current")
        defaults = TrainingConfig()
        ignored = [name for name in TINKER_IGNORES if getattr(self.training, name) != getattr(defaults, name)]
        if ignored:
            raise ValueError(f"training.{', training.'.join(ignored)}: the Tinker backend computes its own SDPO signal "
                             "and does not use these; leave them unset")
        per_request = sorted(set(self.router.request_training) - {"learning_rate"})
        if per_request:
            raise ValueError(f"router.request_training {per_request}: the Tinker backend honours only learning_rate")
        return self

    def tinker_base_model(self) -> str:
        return self.tinker.base_model or self.model.base_model

    def served_model_name(self) -> str:
        return self.serving.served_model_name or self.model.base_model

    def state_path(self) -> Path:
        path = Path(os.path.expanduser(self.state_dir))
        path.mkdir(parents=True, exist_ok=True)
        return path


def describe_errors(exc: ValidationError, whole: str) -> str:
    """Every problem as `dotted.key: message`; `whole` names an error about the object itself."""
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or whole}: {err['msg']}" for err in exc.errors())


class ConfigError(ValueError):
    """A configuration that fails validation; the message names every bad key."""


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        path = [part.lower() for part in key[len(ENV_PREFIX):].split("__") if part]
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = yaml.safe_load(raw)  # so "1e-4", "true" and "[a, b]" get their natural types
    return tree


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(
    data: dict[str, Any] | None = None, environ: dict[str, str] | None = None
) -> ClaasConfig:
    """Validate a config dict (e.g. a serve YAML's `args`) with environment overrides applied on top."""
    merged = _merge(data or {}, _env_overrides(dict(os.environ if environ is None else environ)))
    try:
        return ClaasConfig.model_validate(merged)
    except ValidationError as exc:
        problems = describe_errors(exc, "<root>")
        raise ConfigError(f"invalid claas-ray config: {problems}") from exc

