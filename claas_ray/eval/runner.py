"""`claas-ray eval`: teach each preference to a fresh adapter through the API, and measure as it learns.

For each preference: create an adapter; then per step sample answers to training prompts (as a user
would get them), send the preference as feedback on those completions (by completion id), and every
`eval_every` steps measure on held-out prompts that are never trained on: compliance (the verifier),
the log-prob margin of a compliant over a non-compliant reference answer, capability against the base
model (likelihood of general text, accuracy on a small QA set), and collapse signals.
"""

from __future__ import annotations

import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from claas_ray.eval.metrics import distinct_n, mean_words, repetition_rate
from claas_ray.eval.preferences import SHIPPED, Capability, Preference, load_capability, load_preference
from claas_ray.eval.verifiers import complies


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field("http://127.0.0.1:8000", description="The claas-ray endpoint.")
    api_key: str | None = None
    base_model: str = Field("smollm2-135m", description="The served base model's name, for baselines.")
    preferences: list[str] = Field(default_factory=lambda: list(SHIPPED), min_length=1)
    steps: int = Field(8, ge=1, description="Feedback steps per preference.")
    eval_every: int = Field(2, ge=1)
    train_batch: int = Field(2, ge=1, description="Answers sampled, and feedback items sent, per step.")
    heldout_limit: int | None = Field(None, ge=1, description="Use only the first N held-out prompts.")
    max_tokens: int = Field(64, ge=1)
    train_temperature: float = Field(0.7, ge=0)
    capability: bool = Field(True, description="Measure capability retention (costs a few score calls).")
    lora_prefix: str = "eval"
    concurrency: int = Field(8, ge=1)


class Checkpoint(BaseModel):
    step: int
    version: int
    compliance: float
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
    step_metrics: list[dict[str, float]] = Field(default_factory=list)


class TargetCheck(BaseModel):
    """The project's bar for one preference: held-out compliance >= 0.8 within 8 steps, capability loss <= 3%."""

    preference: str
    best_compliance_within_8_steps: float
    first_step_at_target: int | None
    capability_loss: float | None
    met: bool
    collapsed: bool = Field(
        description="Answers degenerated: distinct-2 under half the base model's, or repetition above 0.5. "
        "The issue's target does not count this; a user would."
    )


class EvalReport(BaseModel):
    config: EvalConfig
    started_at: float
    finished_at: float
    base_capability: dict[str, float] = Field(default_factory=dict)
    results: list[PreferenceResult]
    targets: list[TargetCheck] = Field(default_factory=list)


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
        compliance=sum(complies(a, preference.verifier) for a in answers) / len(answers),
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


def run_eval(config: EvalConfig) -> EvalReport:
    client = ClaasClient(config)
    started = time.time()
    probes = load_capability() if config.capability else None
    base = capability(client, config.base_model, probes) if probes else {}
    preferences = [load_preference(name) for name in config.preferences]
    results = []
    progress = tqdm(total=len(preferences) * config.steps, desc="eval", unit="step", file=sys.stderr)
    for preference in preferences:
        lora_id = f"{config.lora_prefix}/{preference.name}-{int(started)}"
        client.init(lora_id)
        version = 0
        result = PreferenceResult(preference=preference.name, lora_id=lora_id, checkpoints=[
            measure(client, config, preference, lora_id, 0, version, base, probes)
        ])
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
            if step % config.eval_every == 0 or step == config.steps:
                result.checkpoints.append(measure(client, config, preference, lora_id, step, version, base, probes))
            progress.update(1)
            progress.set_postfix(preference=preference.name, compliance=f"{result.checkpoints[-1].compliance:.2f}")
        results.append(result)
    progress.close()
    return EvalReport(config=config, started_at=started, finished_at=time.time(), base_capability=base, results=results,
                      targets=[check_target(result) for result in results])


COMPLIANCE_TARGET, STEPS_TARGET, CAPABILITY_LOSS_TARGET = 0.8, 8, 0.03


def check_target(result: PreferenceResult) -> TargetCheck:
    within = [c for c in result.checkpoints if c.step <= STEPS_TARGET]
    reached = [c.step for c in within if c.compliance >= COMPLIANCE_TARGET]
    loss = capability_loss(result)
    loss = None if math.isnan(loss) else loss
    return TargetCheck(
        preference=result.preference,
        best_compliance_within_8_steps=max(c.compliance for c in within),
        first_step_at_target=reached[0] if reached else None,
        capability_loss=loss,
        met=bool(reached) and within[-1].compliance >= COMPLIANCE_TARGET and (loss is None or loss <= CAPABILITY_LOSS_TARGET),
        collapsed=within[-1].distinct_2 < 0.5 * within[0].distinct_2 or within[-1].repetition > 0.5,
    )


def best_compliance(result: PreferenceResult) -> float:
    return max(c.compliance for c in result.checkpoints)


def capability_loss(result: PreferenceResult) -> float:
    """Relative increase of general-text NLL at the last checkpoint (0.03 = 3% worse than the base)."""
    ratio = result.checkpoints[-1].capability_nll_ratio
    return math.nan if ratio is None else ratio - 1.0
