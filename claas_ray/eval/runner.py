"""`claas-ray eval`: teach each preference to a fresh adapter through the API, and measure as it learns.

For each preference: create an adapter; then per feedback event sample an answer to a training prompt (as
a user would get it), send the preference as feedback on that completion (by completion id), wait until it
is applied, and every `eval_every` events measure on held-out prompts that are never trained on: clean
compliance (the verifier accepts the greedy answer and it is not degenerate), raw compliance beside it,
the log-prob margin of a compliant over a non-compliant reference answer, capability against the base
model (likelihood of general text, accuracy on a small QA set, diversity and length of the answers).

Sequences teach preference A to one adapter, then preference B to the same adapter, and measure whether
A is kept: continual learning means exactly this.
"""

from __future__ import annotations

import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from pydantic import BaseModel, ConfigDict, Field, computed_field
from tqdm import tqdm

from claas_ray.degeneration import is_degenerate
from claas_ray.eval.metrics import distinct_n, mean_words, repetition_rate
from claas_ray.eval.preferences import SHIPPED, Capability, Preference, load_capability, load_preference
from claas_ray.eval.verifiers import complies, complies_cleanly


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field("http://127.0.0.1:8000", description="The claas-ray endpoint.")
    api_key: str | None = None
    base_model: str = Field("smollm2-135m", description="The served base model's name, for baselines.")
    preferences: list[str] = Field(default_factory=lambda: list(SHIPPED))
    sequences: list[tuple[str, str]] = Field(
        default_factory=list, description="Ordered pairs (A, B): teach A, then B, to one adapter; is A kept?"
    )
    steps: int = Field(8, ge=1, description="Feedback events per preference.")
    eval_every: int = Field(2, ge=1)
    train_batch: int = Field(1, ge=1, description="Answers sampled, and feedback items sent, per step (1: one event).")
    heldout_limit: int | None = Field(None, ge=1, description="Use only the first N held-out prompts.")
    max_tokens: int = Field(64, ge=1)
    train_temperature: float = Field(0.7, ge=0)
    capability: bool = Field(True, description="Measure capability retention (costs a few score calls).")
    lora_prefix: str = "eval"
    concurrency: int = Field(8, ge=1)


class Checkpoint(BaseModel):
    step: int
    version: int
    clean_compliance: float = Field(description="Share of held-out answers that comply and are not degenerate.")
    compliance: float = Field(description="Raw compliance: the verifier alone.")
    degenerate: float = Field(0.0, description="Share of held-out answers that are degenerate.")
    margin: float
    capability_nll_ratio: float | None = None
    capability_qa_accuracy: float | None = None
    distinct_2: float
    mean_words: float
    repetition: float
    samples: list[str]


class PreferenceResult(BaseModel):
    preference: str
    lora_id: str
    checkpoints: list[Checkpoint]
    rejected_steps: int = 0
    rejections: list[str] = Field(default_factory=list, description="Why rejected steps were rejected.")
    step_metrics: list[dict[str, float]] = Field(default_factory=list)


class TargetCheck(BaseModel):
    """The bar for one preference: clean compliance >= 0.8 within 8 events, kept to the end, capability kept."""

    preference: str
    base_clean_compliance: float
    best_clean_compliance_within_8_steps: float
    first_step_at_target: int | None
    final_clean_compliance: float
    capability_loss: float | None = Field(description="General-text NLL change at the last checkpoint (0.03 = 3% worse).")
    capability_kept: bool = Field(
        description="NLL at most 3% above the base's, QA at most one item below, distinct-2 at least 0.8x the "
        "base's, mean length 0.3x-2x the base's (unless the preference is about length)."
    )
    capability_problems: list[str] = Field(default_factory=list)
    met: bool
    collapsed: bool = Field(
        description="At the last checkpoint, the share of degenerate held-out answers is more than 0.1 above the base's."
    )


class SequenceResult(BaseModel):
    """One adapter taught `first`, then `second`: `first` measured again after `second` was taught."""

    first: PreferenceResult
    second: PreferenceResult
    first_kept: Checkpoint = Field(description="`first`'s held-out measurement after `second` was taught.")
    first_kept_target: float = 0.7

    @computed_field
    @property
    def met(self) -> bool:
        """B meets its target and A's clean compliance after B is still at least `first_kept_target`."""
        return check_target(self.second).met and self.first_kept.clean_compliance >= self.first_kept_target


class EvalReport(BaseModel):
    config: EvalConfig
    started_at: float
    finished_at: float
    base_capability: dict[str, float] = Field(default_factory=dict)
    results: list[PreferenceResult]
    targets: list[TargetCheck] = Field(default_factory=list)
    sequences: list[SequenceResult] = Field(default_factory=list)


class ClaasClient:
    """The few API calls evaluation needs."""

    def __init__(self, config: EvalConfig):
        headers = {"authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self.http = httpx.Client(base_url=config.url.rstrip("/"), headers=headers, timeout=600)

    def _post(self, path: str, body: dict) -> dict:
        response = self.http.post(path, json=body)
        if response.status_code >= 400:
            raise RuntimeError(f"POST {path} -> {response.status_code}: {response.text[:500]}")
        return response.json()

    def chat(self, model: str, messages: list[dict], max_tokens: int, temperature: float, seed: int | None = None) -> dict:
        return self._post("/v1/chat/completions", {
            "model": model, "messages": messages, "max_tokens": max_tokens,
            "temperature": temperature, "seed": seed,
        })

    def score(self, model: str, completion: str, *, prompt: str | None = None, messages: list | None = None) -> dict:
        body = {"model": model, "completion": completion, **({"prompt": prompt} if prompt else {"messages": messages})}
        return self._post("/v1/score", body)

    def init(self, lora_id: str) -> None:
        self._post("/v1/lora/init", {"lora_id": lora_id})

    def feedback(self, items: list[dict]) -> list[dict]:
        return self._post("/v1/feedback", {"items": items, "wait": True, "wait_timeout_s": 600})["items"]


def capability(client: ClaasClient, model: str, probes: Capability) -> dict[str, float]:
    """Mean per-token NLL of general text, and QA accuracy by the likeliest choice."""
    nll_sum, tokens = 0.0, 0
    for text in probes.texts:
        scored = client.score(model, text["continuation"], prompt=text["prompt"])
        nll_sum -= scored["logprob_sum"]
        tokens += scored["completion_tokens"]
    correct = 0
    for item in probes.questions:
        prompt = f"Question: {item['question']}\nAnswer:"
        scores = [client.score(model, f" {choice}", prompt=prompt) for choice in item["choices"]]
        best = max(range(len(scores)), key=lambda i: scores[i]["logprob_sum"] / scores[i]["completion_tokens"])
        correct += best == item["answer"]
    return {"nll": nll_sum / tokens, "qa_accuracy": correct / len(probes.questions)}


def measure(client: ClaasClient, config: EvalConfig, preference: Preference, model: str, step: int,
            version: int, base: dict[str, float], probes: Capability | None) -> Checkpoint:
    prompts = preference.heldout_prompts[: config.heldout_limit]
    with ThreadPoolExecutor(config.concurrency) as pool:
        answers = list(pool.map(
            lambda p: client.chat(model, preference.conversation(p), config.max_tokens, 0.0)["choices"][0]["message"]["content"],
            prompts,
        ))
    refs = preference.references
    messages = preference.conversation(refs.prompt)
    good = client.score(model, refs.compliant, messages=messages)
    bad = client.score(model, refs.non_compliant, messages=messages)
    margin = good["logprob_sum"] / good["completion_tokens"] - bad["logprob_sum"] / bad["completion_tokens"]
    checkpoint = Checkpoint(
        step=step, version=version,
        clean_compliance=_share(answers, lambda a: complies_cleanly(a, preference.verifier)),
        compliance=_share(answers, lambda a: complies(a, preference.verifier)),
        degenerate=_share(answers, is_degenerate),
        margin=margin,
        distinct_2=distinct_n(answers, 2), mean_words=mean_words(answers),
        repetition=sum(repetition_rate(a) for a in answers) / len(answers),
        samples=answers[:3],
    )
    if probes is not None:
        ours = capability(client, model, probes)
        checkpoint.capability_nll_ratio = ours["nll"] / base["nll"]
        checkpoint.capability_qa_accuracy = ours["qa_accuracy"]
    return checkpoint


def _share(answers: list[str], accepts) -> float:
    return sum(bool(accepts(answer)) for answer in answers) / len(answers)


class _Session:
    """One evaluation run: the client, the base model's capability, and the progress bar."""

    def __init__(self, config: EvalConfig):
        self.config = config
        self.client = ClaasClient(config)
        self.started = time.time()
        self.probes = load_capability() if config.capability else None
        self.base = capability(self.client, config.base_model, self.probes) if self.probes else {}
        events = len(config.preferences) + 2 * len(config.sequences)
        self.progress = tqdm(total=events * config.steps, desc="eval", unit="event", file=sys.stderr)

    def new_adapter(self, name: str) -> str:
        lora_id = f"{self.config.lora_prefix}/{name}-{int(self.started)}"
        self.client.init(lora_id)
        return lora_id

    def measure(self, preference: Preference, lora_id: str, step: int, version: int) -> Checkpoint:
        return measure(self.client, self.config, preference, lora_id, step, version, self.base, self.probes)

    def teach(self, preference: Preference, lora_id: str, version: int) -> PreferenceResult:
        """`config.steps` feedback steps of one preference on `lora_id`, measured every `eval_every`."""
        config, client = self.config, self.client
        result = PreferenceResult(preference=preference.name, lora_id=lora_id,
                                  checkpoints=[self.measure(preference, lora_id, 0, version)])
        for step in range(1, config.steps + 1):
            prompts = [preference.training_prompts[(step * config.train_batch + i) % len(preference.training_prompts)]
                       for i in range(config.train_batch)]
            conversations = [preference.conversation(p) for p in prompts]
            with ThreadPoolExecutor(config.concurrency) as pool:
                completions = list(pool.map(
                    client.chat, [lora_id] * len(prompts), conversations, [config.max_tokens] * len(prompts),
                    [config.train_temperature] * len(prompts), [step] * len(prompts),
                ))
            statuses = client.feedback([{"completion_id": c["id"], "feedback": preference.feedback} for c in completions])
            applied = [s for s in statuses if s["status"] == "applied"]
            if applied:
                version = max(s["version"] for s in applied)
                result.step_metrics.append(applied[-1]["metrics"])
            else:
                result.rejected_steps += 1
                result.rejections.extend(s.get("reason") or "" for s in statuses)
            if step % config.eval_every == 0 or step == config.steps:
                result.checkpoints.append(self.measure(preference, lora_id, step, version))
            self.progress.update(1)
            self.progress.set_postfix(preference=preference.name,
                                      clean=f"{result.checkpoints[-1].clean_compliance:.2f}")
        return result


def run_eval(config: EvalConfig) -> EvalReport:
    session = _Session(config)
    results = []
    for name in config.preferences:
        preference = load_preference(name)
        results.append(session.teach(preference, session.new_adapter(preference.name), 0))
    sequences = []
    for first_name, second_name in config.sequences:
        first, second = load_preference(first_name), load_preference(second_name)
        lora_id = session.new_adapter(f"{first.name}-then-{second.name}")
        taught_first = session.teach(first, lora_id, 0)
        version = taught_first.checkpoints[-1].version
        taught_second = session.teach(second, lora_id, version)
        kept = session.measure(first, lora_id, 2 * config.steps, taught_second.checkpoints[-1].version)
        sequences.append(SequenceResult(first=taught_first, second=taught_second, first_kept=kept))
    session.progress.close()
    return EvalReport(config=config, started_at=session.started, finished_at=time.time(),
                      base_capability=session.base, results=results,
                      targets=[check_target(result) for result in results], sequences=sequences)


COMPLIANCE_TARGET, STEPS_TARGET, BASE_CEILING, COLLAPSE_MARGIN = 0.8, 8, 0.3, 0.1
CAPABILITY_LOSS_TARGET, DISTINCT_FLOOR, LENGTH_RANGE = 0.03, 0.8, (0.3, 2.0)


def capability_problems(result: PreferenceResult, qa_items: int | None = None, about_length: bool = False) -> list[str]:
    """What the last checkpoint lost against version 0 (the base model), by the issue's definition."""
    first, last = result.checkpoints[0], result.checkpoints[-1]
    problems = []
    loss = capability_loss(result)
    if not math.isnan(loss) and loss > CAPABILITY_LOSS_TARGET:
        problems.append(f"general-text NLL {loss:+.1%}")
    if first.capability_qa_accuracy is not None and last.capability_qa_accuracy is not None:
        one_item = 1 / qa_items if qa_items else 0.0
        if last.capability_qa_accuracy < first.capability_qa_accuracy - one_item - 1e-9:
            problems.append(f"QA accuracy {first.capability_qa_accuracy:.2f} -> {last.capability_qa_accuracy:.2f}")
    if last.distinct_2 < DISTINCT_FLOOR * first.distinct_2:
        problems.append(f"distinct-2 {first.distinct_2:.2f} -> {last.distinct_2:.2f}")
    low, high = LENGTH_RANGE
    if not about_length and first.mean_words and not low <= last.mean_words / first.mean_words <= high:
        problems.append(f"mean length {first.mean_words:.0f} -> {last.mean_words:.0f} words")
    return problems


def check_target(result: PreferenceResult) -> TargetCheck:
    try:
        preference = load_preference(result.preference)
        about_length = preference.about_length
    except ValueError:  # a report from a preference file that is not at hand
        about_length = False
    within = [c for c in result.checkpoints if c.step <= STEPS_TARGET]
    reached = [c.step for c in within if c.clean_compliance >= COMPLIANCE_TARGET]
    loss = capability_loss(result)
    problems = capability_problems(result, _qa_items(), about_length)
    last = result.checkpoints[-1]
    return TargetCheck(
        preference=result.preference,
        base_clean_compliance=result.checkpoints[0].clean_compliance,
        best_clean_compliance_within_8_steps=max(c.clean_compliance for c in within),
        first_step_at_target=reached[0] if reached else None,
        final_clean_compliance=last.clean_compliance,
        capability_loss=None if math.isnan(loss) else loss,
        capability_kept=not problems,
        capability_problems=problems,
        met=bool(reached) and last.clean_compliance >= COMPLIANCE_TARGET and not problems
        and result.checkpoints[0].clean_compliance < BASE_CEILING,
        collapsed=last.degenerate > result.checkpoints[0].degenerate + COLLAPSE_MARGIN,
    )


def _qa_items() -> int:
    return len(load_capability().questions)


def capability_loss(result: PreferenceResult) -> float:
    """Relative increase of general-text NLL at the last checkpoint (0.03 = 3% worse than the base)."""
    ratio = result.checkpoints[-1].capability_nll_ratio
    return math.nan if ratio is None else ratio - 1.0
