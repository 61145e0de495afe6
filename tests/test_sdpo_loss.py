"""The SDPO loss against an independent, loop-by-loop NumPy computation of the same formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from claas_ray.training.sdpo_loss import (
    feedback_concern,
    generalized_jsd,
    guided_topk,
    repeated_ngrams,
    sdpo_loss,
    teacher_topk,
)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0))


def reference_loss(
    student_logits, teacher_logits, response, k, alpha, is_clip, kl_weight, base_lp, sample_lp, mask, sample_weight=0.0
):
    """Straight from the definition, one position at a time, in float64."""
    total, count = 0.0, 0
    for t in range(student_logits.shape[0]):
        ps = softmax(student_logits[t].astype(np.float64))
        pt = softmax(teacher_logits[t].astype(np.float64))
        top = np.argsort(-pt, kind="stable")[:k]
        s = np.append(ps[top], max(1.0 - ps[top].sum(), 1e-12))
        q = np.append(pt[top], max(1.0 - pt[top].sum(), 1e-12))
        if alpha == 0:
            div = kl(q, s)
        elif alpha == 1:
            div = kl(s, q)
        else:
            m = alpha * q + (1 - alpha) * s
            div = alpha * kl(q, m) + (1 - alpha) * kl(s, m)
        chosen = math.log(ps[response[t]])
        ratio = 1.0 if sample_lp is None else min(math.exp(chosen - sample_lp[t]), is_clip)
        value = ratio * div
        if base_lp is not None:
            r = base_lp[t] - chosen
            value += kl_weight * (math.exp(r) - r - 1)
        value -= sample_weight * chosen
        if mask[t]:
            total += value
            count += 1
    return total / count


@pytest.fixture
def tensors():
    rng = np.random.default_rng(7)
    T, V = 5, 11
    student = rng.normal(size=(T, V)).astype(np.float32) * 2
    teacher = rng.normal(size=(T, V)).astype(np.float32) * 2
    response = rng.integers(0, V, size=T)
    base = np.log(np.array([softmax(row.astype(np.float64))[tok] for row, tok in zip(rng.normal(size=(T, V)), response)]))
    return student, teacher, response, base


def run(
    student, teacher, response, *, k, alpha, is_clip=2.0, kl_weight=0.0, base=None, sample=None, mask=None, sample_weight=0.0
):
    mask = np.ones(len(response), dtype=bool) if mask is None else mask
    out = sdpo_loss(
        torch.tensor(student),
        torch.tensor(response),
        teacher_topk(torch.tensor(teacher), k),
        alpha=alpha,
        is_clip=is_clip,
        kl_weight=kl_weight,
        sample_weight=sample_weight,
        base_logprobs=None if base is None else torch.tensor(base, dtype=torch.float32),
        sampling_logprobs=None if sample is None else torch.tensor(sample, dtype=torch.float32),
        mask=torch.tensor(mask),
    )
    got = float(out.loss_sum) / out.token_count
    want = reference_loss(student, teacher, response, k, alpha, is_clip, kl_weight, base, sample, mask, sample_weight)
    return got, want, out


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 0.25])
@pytest.mark.parametrize("k", [3, 11])
def test_divergence_matches_reference(tensors, alpha, k):
    student, teacher, response, _ = tensors
    got, want, _ = run(student, teacher, response, k=k, alpha=alpha)
    assert got == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert got > 0


def test_forward_and_reverse_kl_differ(tensors):
    student, teacher, response, _ = tensors
    forward, _, _ = run(student, teacher, response, k=4, alpha=0.0)
    reverse, _, _ = run(student, teacher, response, k=4, alpha=1.0)
    assert forward != pytest.approx(reverse, rel=1e-3)


def test_tail_bucket_carries_the_missing_mass():
    # Student puts most mass outside the teacher's top-2: without a tail bucket this would look close.
    teacher = torch.tensor([[5.0, 4.0, -5.0, -5.0]])
    student = torch.tensor([[-5.0, -5.0, 5.0, 5.0]])
    target = teacher_topk(teacher, 2)
    buckets = target.buckets().exp()
    assert float(buckets.sum()) == pytest.approx(1.0, abs=1e-6)
    out = sdpo_loss(student, torch.tensor([2]), target, alpha=0.5, is_clip=2.0, kl_weight=0.0)
    assert out.divergence_sum > 0.5  # near the JSD maximum ln 2 ~ 0.69


def test_identical_distributions_have_zero_divergence(tensors):
    student, _, response, _ = tensors
    for alpha in (0.0, 0.5, 1.0):
        got, _, _ = run(student, student, response, k=4, alpha=alpha)
        assert got == pytest.approx(0.0, abs=1e-6)


def test_importance_ratio_inactive_and_active(tensors):
    student, teacher, response, _ = tensors
    lp = torch.log_softmax(torch.tensor(student, dtype=torch.float64), -1)
    chosen = lp[torch.arange(len(response)), torch.tensor(response)].numpy()
    # Sampler slightly more likely than the student now: ratios below the clip.
    inactive, want, out = run(student, teacher, response, k=4, alpha=0.5, sample=chosen + 0.3)
    assert inactive == pytest.approx(want, rel=1e-4)
    assert out.clipped_count == 0
    assert out.ratio_sum / out.token_count == pytest.approx(math.exp(-0.3), rel=1e-4)
    # Sampler far less likely: every ratio clipped to is_clip.
    active, want, out = run(student, teacher, response, k=4, alpha=0.5, sample=chosen - 5.0, is_clip=2.0)
    assert active == pytest.approx(want, rel=1e-4)
    assert out.clipped_count == len(response)
    plain, _, _ = run(student, teacher, response, k=4, alpha=0.5)
    assert active == pytest.approx(2.0 * plain, rel=1e-4)


def test_importance_ratio_is_a_weight_not_a_gradient_path(tensors):
    student, teacher, response, _ = tensors
    target = teacher_topk(torch.tensor(teacher), 4)

    def grad(sample):
        logits = torch.tensor(student, requires_grad=True)
        out = sdpo_loss(logits, torch.tensor(response), target, alpha=0.5, is_clip=2.0, kl_weight=0.0,
                        sampling_logprobs=sample)
        out.loss_sum.backward()
        return logits.grad

    clipped = grad(torch.full((len(response),), -50.0))
    unweighted = grad(None)
    assert torch.allclose(clipped, 2.0 * unweighted, atol=1e-6)


def test_kl_leash_to_base(tensors):
    student, teacher, response, base = tensors
    got, want, out = run(student, teacher, response, k=4, alpha=0.5, kl_weight=0.3, base=base)
    assert got == pytest.approx(want, rel=1e-4)
    assert out.kl_sum > 0
    without, _, _ = run(student, teacher, response, k=4, alpha=0.5)
    assert got == pytest.approx(without + 0.3 * out.kl_sum / out.token_count, rel=1e-4)


def test_bucketed_leash_is_kl_to_the_base_distribution(tensors):
    """`base_topk`: KL(student || base) over the base's top-K and a tail bucket, in place of the k3 estimate.
    Unlike k3 it sees the whole distribution: a student that moved mass between tokens the response does not
    contain is leashed too."""
    student, teacher, response, base_lp = tensors
    base_logits = np.random.default_rng(11).normal(size=student.shape).astype(np.float32) * 2
    want = 0.0
    for t in range(student.shape[0]):
        ps, pb = softmax(student[t].astype(np.float64)), softmax(base_logits[t].astype(np.float64))
        top = np.argsort(-pb, kind="stable")[:4]
        want += kl(np.append(ps[top], 1.0 - ps[top].sum()), np.append(pb[top], 1.0 - pb[top].sum()))
    target = teacher_topk(torch.tensor(teacher), 4)

    def loss(**leash):
        return sdpo_loss(torch.tensor(student), torch.tensor(response), target, alpha=0.0, is_clip=2.0,
                         kl_weight=0.3, **leash)

    plain = sdpo_loss(torch.tensor(student), torch.tensor(response), target, alpha=0.0, is_clip=2.0, kl_weight=0.0)
    bucketed = loss(base_topk=teacher_topk(torch.tensor(base_logits), 4),
                    base_logprobs=torch.tensor(base_lp, dtype=torch.float32))  # the distribution wins
    assert bucketed.kl_sum == pytest.approx(want, rel=1e-4)
    assert float(bucketed.loss_sum) == pytest.approx(float(plain.loss_sum) + 0.3 * want, rel=1e-4)
    assert bucketed.kl_sum != pytest.approx(loss(base_logprobs=torch.tensor(base_lp, dtype=torch.float32)).kl_sum,
                                            rel=1e-2)
    # The student equal to the base: no leash at all, whatever tokens the response holds.
    same = sdpo_loss(torch.tensor(base_logits), torch.tensor(response), target, alpha=0.0, is_clip=2.0, kl_weight=0.3,
                     base_topk=teacher_topk(torch.tensor(base_logits), 4))
    assert same.kl_sum == pytest.approx(0.0, abs=1e-5)
    # A student that swapped the base's two likeliest tokens other than the response's: the response's own
    # token keeps its probability, so k3 sees nothing; the bucketed KL does.
    swapped = base_logits.copy()
    for t, token in enumerate(response):
        first, second = [int(i) for i in np.argsort(-base_logits[t], kind="stable") if i != token][:2]
        swapped[t, [first, second]] = swapped[t, [second, first]]
    base_chosen = torch.log_softmax(torch.tensor(base_logits), -1).gather(-1, torch.tensor(response)[:, None])[:, 0]
    k3 = sdpo_loss(torch.tensor(swapped), torch.tensor(response), target, alpha=0.0, is_clip=2.0, kl_weight=0.3,
                   base_logprobs=base_chosen)
    bucketed = sdpo_loss(torch.tensor(swapped), torch.tensor(response), target, alpha=0.0, is_clip=2.0, kl_weight=0.3,
                         base_topk=teacher_topk(torch.tensor(base_logits), 4))
    assert k3.kl_sum == pytest.approx(0.0, abs=1e-5) and bucketed.kl_sum > 0.1


def test_feedback_concern_is_kl_from_the_teacher_to_the_base(tensors):
    """KL(teacher || base) over the teacher's top-K and a tail, per position: zero where seeing the feedback left
    the base model's next token alone, large where it moved it."""
    _, teacher, _, _ = tensors
    base_logits = np.random.default_rng(12).normal(size=teacher.shape).astype(np.float32) * 2
    want = []
    for t in range(teacher.shape[0]):
        pt, pb = softmax(teacher[t].astype(np.float64)), softmax(base_logits[t].astype(np.float64))
        top = np.argsort(-pt, kind="stable")[:4]
        want.append(kl(np.append(pt[top], 1.0 - pt[top].sum()), np.append(pb[top], 1.0 - pb[top].sum())))
    target = teacher_topk(torch.tensor(teacher), 4)
    got = feedback_concern(torch.log_softmax(torch.tensor(base_logits), -1), target)
    assert got.tolist() == pytest.approx(want, rel=1e-4)
    # The teacher equal to the base at the first position only: no concern there, some everywhere else.
    same = base_logits.copy()
    same[0] = teacher[0]
    concern = feedback_concern(torch.log_softmax(torch.tensor(same), -1), target)
    assert float(concern[0]) == pytest.approx(0.0, abs=1e-5) and bool((concern[1:] > 1e-3).all())


def test_guided_teacher_sharpens_the_feedback_among_plausible_tokens_only():
    """Guidance multiplies each plausible token's probability by (p_teacher / p_without) ** (scale - 1) and gives
    the plausible set back its own mass: the tail and the implausible top-K entries keep the teacher's values."""
    rng = np.random.default_rng(21)
    teacher = (rng.normal(size=(4, 13)) * 2).astype(np.float32)
    without = (rng.normal(size=(4, 13)) * 2).astype(np.float32)
    k, scale = 6, 2.5
    got = guided_topk(torch.log_softmax(torch.tensor(teacher), -1), torch.log_softmax(torch.tensor(without), -1), k, scale)
    plain = teacher_topk(torch.tensor(teacher), k)
    assert torch.equal(got.token_ids, plain.token_ids)
    for t in range(teacher.shape[0]):
        pt, pw = softmax(teacher[t].astype(np.float64)), softmax(without[t].astype(np.float64))
        top = np.argsort(-pt, kind="stable")[:k]
        head = pt[top] >= 0.1 * pt[top[0]]
        want = pt[top].copy()
        boosted = pt[top][head] * (pt[top][head] / pw[top][head]) ** (scale - 1)
        want[head] = boosted / boosted.sum() * pt[top][head].sum()
        assert np.exp(got.logprobs[t].numpy()) == pytest.approx(want, rel=1e-5)
        assert float(got.tail_logprob[t].exp()) == pytest.approx(1.0 - pt[top].sum(), rel=1e-4, abs=1e-9)
    # Where the leash lets go is measured on the teacher before guidance.
    assert torch.allclose(got.plain().logprobs, plain.logprobs, atol=1e-6)
    base_logprobs = torch.log_softmax(torch.tensor(without), -1)
    assert torch.allclose(feedback_concern(base_logprobs, got), feedback_concern(base_logprobs, plain), atol=1e-5)
    # Among plausible tokens the guided target moves toward what the feedback raised: a token the feedback made
    # likelier gains on one it made less likely. Scale 1 is the plain teacher.
    same = guided_topk(torch.log_softmax(torch.tensor(teacher), -1), torch.log_softmax(torch.tensor(without), -1), k, 1.0)
    assert torch.allclose(same.logprobs, plain.logprobs, atol=1e-6)
    two = torch.log_softmax(torch.tensor([[0.0, 0.0, -9.0]]), -1)  # the teacher: even between tokens 0 and 1
    base = torch.log_softmax(torch.tensor([[2.0, 0.0, -20.0]]), -1)  # without the feedback, token 0 was far likelier
    guided = guided_topk(two, base, 3, 2.0).logprobs.exp()[0]
    assert float(guided[1]) > 0.8 and float(guided[2]) == pytest.approx(float(two.exp()[0, 2]), rel=1e-5)


def test_leash_weights_scale_the_leash_per_position(tensors):
    """`leash_weights` scale the leash's term position by position; the KL it reports stays the unweighted one."""
    student, teacher, response, _ = tensors
    base = teacher_topk(torch.tensor(np.random.default_rng(13).normal(size=student.shape).astype(np.float32)), 4)
    target = teacher_topk(torch.tensor(teacher), 4)

    def loss(kl_weight: float, weights: list[float] | None):
        return sdpo_loss(torch.tensor(student), torch.tensor(response), target, alpha=0.0, is_clip=2.0,
                         kl_weight=kl_weight, base_topk=base,
                         leash_weights=None if weights is None else torch.tensor(weights))

    count = student.shape[0]
    plain, unweighted = loss(0.0, None), loss(0.3, None)
    assert float(loss(0.3, [1.0] * count).loss_sum) == pytest.approx(float(unweighted.loss_sum), rel=1e-6)
    assert float(loss(0.3, [0.0] * count).loss_sum) == pytest.approx(float(plain.loss_sum), rel=1e-6)
    leash = float(unweighted.loss_sum - plain.loss_sum)
    assert leash > 0
    # Each position's share, switched on alone, adds up to the whole leash; a position's share is its own KL.
    alone = [loss(0.3, [1.0 if i == t else 0.0 for i in range(count)]) for t in range(count)]
    shares = [float(out.loss_sum - plain.loss_sum) for out in alone]
    assert sum(shares) == pytest.approx(leash, rel=1e-4)
    assert min(shares) > 0 and max(shares) < leash
    assert float(loss(0.3, [0.5] * count).loss_sum - plain.loss_sum) == pytest.approx(0.5 * leash, rel=1e-4)
    assert all(out.kl_sum == pytest.approx(unweighted.kl_sum, rel=1e-6) for out in alone)


def test_sample_weight_adds_cross_entropy_on_the_response(tensors):
    student, teacher, response, base = tensors
    got, want, _ = run(student, teacher, response, k=4, alpha=0.0, kl_weight=0.1, base=base, sample_weight=0.7)
    assert got == pytest.approx(want, rel=1e-4)
    without, _, _ = run(student, teacher, response, k=4, alpha=0.0, kl_weight=0.1, base=base)
    nll = -np.mean([math.log(softmax(row.astype(np.float64))[tok]) for row, tok in zip(student, response)])
    assert got == pytest.approx(without + 0.7 * nll, rel=1e-4)
    # Its gradient raises the sampled tokens' logits: a descent step makes them likelier.
    logits = torch.tensor(student, requires_grad=True)
    sdpo_loss(
        logits, torch.tensor(response), teacher_topk(torch.tensor(teacher), 4), alpha=0.0, is_clip=2.0, kl_weight=0.0,
        sample_weight=5.0,
    ).loss_sum.backward()
    chosen_grad = logits.grad.gather(-1, torch.tensor(response).unsqueeze(-1))
    assert bool((chosen_grad < 0).all())


def test_mask_excludes_tokens(tensors):
    student, teacher, response, base = tensors
    mask = np.array([True, False, True, False, True])
    got, want, out = run(student, teacher, response, k=4, alpha=0.5, kl_weight=0.1, base=base, mask=mask)
    assert out.token_count == 3
    assert got == pytest.approx(want, rel=1e-4)
    full, _, _ = run(student, teacher, response, k=4, alpha=0.5, kl_weight=0.1, base=base)
    assert got != pytest.approx(full, rel=1e-3)


def test_generalized_jsd_is_symmetric_at_one_half():
    a = torch.log_softmax(torch.tensor([[1.0, 2.0, 0.5]]), -1)
    b = torch.log_softmax(torch.tensor([[0.1, -1.0, 3.0]]), -1)
    assert float(generalized_jsd(a, b, 0.5)) == pytest.approx(float(generalized_jsd(b, a, 0.5)), rel=1e-6)
    assert float(generalized_jsd(a, b, 0.5)) <= math.log(2) + 1e-6


def test_repeated_ngrams_marks_the_loop_not_its_first_round():
    ids = torch.tensor([5, 6, 7, 5, 6, 7, 5, 6, 9, 5, 6])
    #                   H  i  !  H  i  !  H  i  ?  H  i
    assert repeated_ngrams(ids).tolist() == [False, False, False, False, False, True, True, True, False, False, False]
    assert not repeated_ngrams(torch.arange(20)).any()
    assert repeated_ngrams(torch.tensor([1, 1, 1, 1])).tolist() == [False, False, False, True]
    assert repeated_ngrams(torch.tensor([], dtype=torch.long)).tolist() == []


def test_repeat_weight_is_unlikelihood_on_the_repeated_tokens_only(tensors):
    student, teacher, _, base = tensors
    response = np.array([3, 4, 3, 4, 3])  # the last token completes (3, 4, 3) a second time
    assert repeated_ngrams(torch.tensor(response)).tolist() == [False, False, False, False, True]
    target = teacher_topk(torch.tensor(teacher), 4)

    def loss(weight):
        logits = torch.tensor(student, requires_grad=True)
        out = sdpo_loss(logits, torch.tensor(response), target, alpha=0.0, is_clip=2.0, kl_weight=0.1,
                        base_logprobs=torch.tensor(base, dtype=torch.float32), repeat_weight=weight)
        out.loss_sum.backward()
        return out, logits.grad

    plain, plain_grad = loss(0.0)
    weighted, grad = loss(0.5)
    assert plain.repeated_count == weighted.repeated_count == 1
    p = softmax(student[4].astype(np.float64))[3]
    assert float(weighted.loss_sum.detach()) == pytest.approx(float(plain.loss_sum.detach()) - 0.5 * math.log(1 - p), rel=1e-5)
    # Only the repeated position's gradient changes, and a descent step makes the repeated token less likely.
    assert torch.allclose(grad[:4], plain_grad[:4])
    assert float(grad[4, 3] - plain_grad[4, 3]) > 0
    # Without a teacher (the student's own greedy answers) the unlikelihood is the whole loss.
    alone = sdpo_loss(torch.tensor(student), torch.tensor(response), None, alpha=0.0, is_clip=2.0, kl_weight=0.0,
                      repeat_weight=0.5)
    assert float(alone.loss_sum) == pytest.approx(-0.5 * math.log(1 - p), rel=1e-5) and alone.divergence_sum == 0.0
