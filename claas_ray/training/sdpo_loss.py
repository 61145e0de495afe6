"""The SDPO objective, as pure tensor math (no model, no PEFT, no Ray).

Shapes: T response tokens, V vocabulary, K teacher top-K. All log-probabilities are natural logs.

Per response token t the loss is

    ratio_t * GJSD_alpha(student_t, teacher_t)  +  kl_weight * w_t * KL(student_t || base_t)  -  sample_weight * s_t
        +  repeat_weight * repeated_t * -log(1 - exp(s_t))

- The divergence is taken over K+1 buckets: the teacher's top-K token ids, and a tail bucket holding
  the rest of each distribution's mass, so both sides stay normalised without renormalising to top-K.
- ratio_t = min(exp(logp_student_now - logp_sampler), is_clip), detached: an off-policy weight that
  corrects for the response having been sampled by an older version of the adapter; 1 when unknown.
- KL(student_t || base_t), the leash to the base model, over the base model's top-K tokens and a tail bucket
  (`base_topk`), or else estimated by k3 = exp(b - s) - (b - s) - 1 with s, b the student's and base model's
  log-prob of the chosen token (Schulman's unbiased, non-negative estimator). As a loss, k3 moves only that
  token's probability toward the base's and spreads the difference over the rest of the vocabulary; the
  bucketed KL compares the whole distribution with the base model's.
- w_t, the leash's weight at the position (1 unless `leash_weights` are given): the step sets it to
  exp(-c_t / scale) with c_t = KL(teacher_t || base_t) (`feedback_concern`), how far seeing the feedback moves
  the base model's next token there, so the leash holds where the feedback has no say and lets go where it has.
- sample_weight * -s_t: cross-entropy on the response's own tokens, for a response the teacher sampled and the
  step selected (with alpha = 0 it moves the target from the teacher's distribution toward its sample).
- repeat_weight * -log(1 - exp(s_t)) where the token completes a token n-gram the response already had
  (`repeated_ngrams`): token-level unlikelihood (Welleck et al., 2019) on the response's own loops, which
  lowers the probability of going round again without touching the tokens that start the loop. Without a
  teacher (the student's own greedy answers, scored only for their loops) this is the whole loss.

Tokens outside `mask` contribute nothing; the result is the mean over masked tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_TAIL_FLOOR = 1e-12
REPEATED_NGRAM = 3  # a token repeats when it completes a token trigram seen earlier in the same response
GUIDANCE_PLAUSIBLE = 0.1  # guided_topk reweights only tokens at least this likely relative to the teacher's top one


@dataclass(frozen=True)
class TeacherTopK:
    """A distribution at each response position, compressed to top-K plus tail: the teacher's targets, and the
    base model's for the leash."""

    logprobs: torch.Tensor  # [T, K]
    token_ids: torch.Tensor  # [T, K]
    unguided: torch.Tensor | None = None  # [T, K]: where `logprobs` are guided (`guided_topk`), the plain teacher's

    def plain(self) -> TeacherTopK:
        """The teacher's own distribution on these ids, before any guidance."""
        return self if self.unguided is None else TeacherTopK(self.unguided, self.token_ids)

    @property
    def tail_logprob(self) -> torch.Tensor:  # [T]
        return log_remaining_mass(self.logprobs)

    def buckets(self) -> torch.Tensor:  # [T, K+1]
        return torch.cat([self.logprobs, self.tail_logprob.unsqueeze(-1)], dim=-1)

    def rows(self, positions: slice) -> TeacherTopK:
        """The distribution at a range of response positions (the loss is computed a chunk at a time)."""
        unguided = None if self.unguided is None else self.unguided[positions]
        return TeacherTopK(self.logprobs[positions], self.token_ids[positions], unguided)

    @staticmethod
    def cat(chunks: list[TeacherTopK]) -> TeacherTopK:
        """The chunks of consecutive positions, joined."""
        unguided = [c.unguided for c in chunks if c.unguided is not None]
        return TeacherTopK(
            torch.cat([c.logprobs for c in chunks]),
            torch.cat([c.token_ids for c in chunks]),
            torch.cat(unguided) if len(unguided) == len(chunks) else None,
        )


def log_remaining_mass(logprobs: torch.Tensor) -> torch.Tensor:
    """log(1 - sum(exp(logprobs))) over the last axis, floored so an all-mass top-K stays finite."""
    covered = torch.logsumexp(logprobs, dim=-1).clamp(max=0.0)
    # log(1 - exp(x)) computed stably: log(-expm1(x)).
    return torch.log((-torch.expm1(covered)).clamp(min=_TAIL_FLOOR))


def teacher_topk(teacher_logits: torch.Tensor, k: int) -> TeacherTopK:
    """Compress full teacher logits [T, V] to top-K log-probs and their token ids."""
    return topk_of_logprobs(torch.log_softmax(teacher_logits.float(), dim=-1), k)


def topk_of_logprobs(logprobs: torch.Tensor, k: int) -> TeacherTopK:
    """The top-K of full log-probs [T, V], with their token ids."""
    values, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    return TeacherTopK(logprobs=values, token_ids=ids)


def guided_topk(teacher_logprobs: torch.Tensor, without_logprobs: torch.Tensor, k: int, scale: float,
                plausible: float = GUIDANCE_PLAUSIBLE) -> TeacherTopK:
    """The teacher's top-K with the feedback's effect on it scaled by `scale` (classifier-free guidance).

    teacher_logprobs [T, V] are the teacher's with the feedback in its context, without_logprobs [T, V] the same
    weights' without it. Among the teacher's plausible tokens (probability at least `plausible` times its most
    likely one's, the contrastive-decoding constraint) each probability is multiplied by
    (p_teacher / p_without) ** (scale - 1) and the set renormalised to the mass it had: the feedback's preference
    among tokens the teacher would write is sharpened, and no mass moves to a token the teacher finds unlikely
    (where the ratio of two tiny probabilities is noise) or into the tail. scale 1 is the plain teacher.
    """
    top = topk_of_logprobs(teacher_logprobs, k)
    if scale == 1.0:
        return top
    head = top.logprobs >= top.logprobs[:, :1] + math.log(plausible)  # topk is sorted: column 0 is the largest
    contrast = top.logprobs - without_logprobs.gather(-1, top.token_ids)
    shifted = (top.logprobs + (scale - 1.0) * contrast).masked_fill(~head, -math.inf)
    mass = torch.logsumexp(top.logprobs.masked_fill(~head, -math.inf), dim=-1, keepdim=True)
    guided = shifted - torch.logsumexp(shifted, dim=-1, keepdim=True) + mass
    return TeacherTopK(torch.where(head, guided, top.logprobs), top.token_ids, unguided=top.logprobs)


def repeated_ngrams(response_ids: torch.Tensor, n: int = REPEATED_NGRAM) -> torch.Tensor:
    """[T] bool: the tokens that complete an n-gram of token ids already present earlier in the response.

    "Hi Sam! Hi Sam! Hi Sam!" marks every token from the second "Sam" on; the first occurrence of each n-gram,
    and so the text the loop repeats, is never marked.
    """
    ids = response_ids.tolist()
    seen: set[tuple[int, ...]] = set()
    flags = [False] * len(ids)
    for end in range(n - 1, len(ids)):
        gram = tuple(ids[end - n + 1 : end + 1])
        flags[end] = gram in seen
        seen.add(gram)
    return torch.tensor(flags, dtype=torch.bool, device=response_ids.device)


def student_buckets(student_logprobs: torch.Tensor, teacher: TeacherTopK) -> torch.Tensor:
    """The student's full log-probs [T, V] folded onto the teacher's K+1 buckets."""
    on_support = student_logprobs.gather(-1, teacher.token_ids)
    return torch.cat([on_support, log_remaining_mass(on_support).unsqueeze(-1)], dim=-1)


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last axis from log-probs."""
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def feedback_concern(base_logprobs: torch.Tensor, teacher: TeacherTopK) -> torch.Tensor:
    """KL(teacher || base) [T] over the teacher's K+1 buckets, from the base model's full log-probs [T, V].

    With the base model as the teacher, this is how much seeing the feedback changes the next token at each
    position: large where the feedback has something to say (the dash that starts a list, the name), about zero
    on the rest of the text. Measured on the teacher before guidance: guidance sharpens the targets, not where
    the feedback has a say.
    """
    plain = teacher.plain()
    return _kl(plain.buckets(), student_buckets(base_logprobs, plain))


def generalized_jsd(student_log: torch.Tensor, teacher_log: torch.Tensor, alpha: float) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence per position.

    alpha = 0 is forward KL(teacher || student), alpha = 1 reverse KL(student || teacher); in between,
    with the mixture M = alpha * teacher + (1 - alpha) * student,
    GJSD = alpha * KL(teacher || M) + (1 - alpha) * KL(student || M).
    """
    if alpha <= 0.0:
        return _kl(teacher_log, student_log)
    if alpha >= 1.0:
        return _kl(student_log, teacher_log)
    mixture = torch.logsumexp(
        torch.stack([teacher_log + math.log(alpha), student_log + math.log(1.0 - alpha)]), dim=0
    )
    return alpha * _kl(teacher_log, mixture) + (1.0 - alpha) * _kl(student_log, mixture)


@dataclass
class SDPOLossOutput:
    """The loss to backpropagate, and per-token sums the caller averages over a batch."""

    loss_sum: torch.Tensor  # scalar with grad: sum over masked tokens (divide by the batch's token count)
    divergence_sum: float
    kl_sum: float
    ratio_sum: float
    clipped_count: int
    token_count: int
    repeated_count: int = 0


def sdpo_loss(
    student_logits: torch.Tensor,
    response_ids: torch.Tensor,
    teacher: TeacherTopK | None,
    *,
    alpha: float,
    is_clip: float,
    kl_weight: float,
    sample_weight: float = 0.0,
    repeat_weight: float = 0.0,
    repeated: torch.Tensor | None = None,
    base_logprobs: torch.Tensor | None = None,
    base_topk: TeacherTopK | None = None,
    leash_weights: torch.Tensor | None = None,
    sampling_logprobs: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> SDPOLossOutput:
    """Summed SDPO loss of one response (see the module docstring for the formula).

    student_logits [T, V] predict response_ids [T]; base_logprobs and sampling_logprobs are [T] log-probs
    of those ids under the base model and under the sampler; `base_topk`, the base model's distribution, takes
    the leash's place of `base_logprobs` where given; `leash_weights` [T] scale the leash per position (the
    reported KL stays unweighted); mask [T] is 1 for tokens that count; repeated [T] marks
    the tokens that repeat an n-gram of the response (default: `repeated_ngrams(response_ids)`). Without a
    `teacher` there is no divergence term.
    """
    student_logprobs = torch.log_softmax(student_logits.float(), dim=-1)
    chosen = student_logprobs.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)  # [T]
    mask = torch.ones_like(chosen) if mask is None else mask.to(chosen.dtype)

    if teacher is None:
        divergence = torch.zeros_like(chosen)
    else:
        divergence = generalized_jsd(student_buckets(student_logprobs, teacher), teacher.buckets(), alpha)

    if sampling_logprobs is None:
        ratio = torch.ones_like(chosen)
        clipped = torch.zeros_like(chosen, dtype=torch.bool)
    else:
        raw = torch.exp(chosen.detach() - sampling_logprobs.to(chosen.dtype))
        clipped = raw > is_clip
        ratio = raw.clamp(max=is_clip)

    per_token = ratio * divergence
    kl = torch.zeros_like(chosen)
    if base_topk is not None:
        kl = _kl(student_buckets(student_logprobs, base_topk), base_topk.buckets())
    elif base_logprobs is not None:
        log_ratio = base_logprobs.to(chosen.dtype) - chosen
        kl = torch.exp(log_ratio) - log_ratio - 1.0
    if kl_weight:
        per_token = per_token + kl_weight * (kl if leash_weights is None else kl * leash_weights.to(kl.dtype))
    if sample_weight:
        per_token = per_token - sample_weight * chosen
    repeated = (repeated_ngrams(response_ids) if repeated is None else repeated.to(chosen.device)) & mask.bool()
    if repeat_weight:
        unlikely = -torch.log((-torch.expm1(chosen)).clamp(min=_TAIL_FLOOR))  # -log(1 - p), stable near p = 1
        per_token = per_token + repeat_weight * repeated.to(chosen.dtype) * unlikely

    return SDPOLossOutput(
        loss_sum=(per_token * mask).sum(),
        divergence_sum=float((divergence.detach() * mask).sum()),
        kl_sum=float((kl.detach() * mask).sum()),
        ratio_sum=float((ratio * mask).sum()),
        clipped_count=int((clipped & mask.bool()).sum()),
        token_count=int(mask.sum()),
        repeated_count=int(repeated.sum()),
    )
