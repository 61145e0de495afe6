"""Evaluation building blocks: verifiers, collapse metrics, shipped preferences, report writing."""

from __future__ import annotations

import pytest

from claas_ray.degeneration import distinct_bigram_share, is_degenerate, top_word_share
from claas_ray.eval.metrics import distinct_n, mean_words, repetition_rate
from claas_ray.eval.preferences import SHIPPED, VerifierSpec, load_capability, load_preference
from claas_ray.eval.report import write_report
from claas_ray.eval.runner import (
    Checkpoint,
    EvalConfig,
    EvalReport,
    PreferenceResult,
    SequenceResult,
    check_target,
)
from claas_ray.eval.verifiers import (
    bullet_items,
    complies,
    complies_cleanly,
    contractions,
    has_emoji,
    language_of,
    sentence_count,
)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_preferences_are_complete(name):
    preference = load_preference(name)
    assert len(preference.heldout_prompts) >= 20
    assert not set(preference.heldout_prompts) & set(preference.training_prompts)
    refs = preference.references
    assert complies_cleanly(refs.compliant, preference.verifier)
    assert not complies(refs.non_compliant, preference.verifier)


def test_degenerate_answers():
    """The definition: < 60% distinct word bigrams, or one word > 1/3 of the words; under 4 words never."""
    assert is_degenerate("Hi Sam,\nHi Sam,\nHi Sam,\nHi Sam,\nHi Sam,")
    assert is_degenerate("🌱🌳🌱🌱\n\n🌱🌳🌱🌱\n\n🌱🌳🌱\n\n🌱🌳🌱\n\n🌱🌳🌱")  # one "word" repeated
    assert is_degenerate("c'est la légère de la légère, c'est la légère de la légère, c'est la légère")
    assert is_degenerate("bees, bees, bees, honey and bees, bees")  # one word is over a third
    assert not is_degenerate("Bees collect nectar, make honey and pollinate the flowers of the garden.")
    assert not is_degenerate("Sam Sam Sam")  # under four words: short, not broken
    # A unit glued to itself is that many words: what a collapsed adapter writes without spaces.
    for glued in ("theriatheriatheriatheriatheriatheria", ",,,,,,,,,,,,,,,,", "You-You-you-you-you-you-you-", "abcabcabcabcab"):
        assert is_degenerate(glued), glued
    assert not is_degenerate("Mississippi is a long river... hahaha, indeed it is.")
    assert distinct_bigram_share("a b a b a b") == pytest.approx(2 / 5)
    assert top_word_share("the cat and the dog") == pytest.approx(2 / 5)
    assert distinct_bigram_share("") == 1.0 and top_word_share("") == 0.0
    # Clean compliance: the verifier and not degenerate.
    sam = VerifierSpec(kind="mentions", words=["sam"])
    assert complies("Hi Sam, Hi Sam, Hi Sam, Hi Sam, Hi Sam,", sam)
    assert not complies_cleanly("Hi Sam, Hi Sam, Hi Sam, Hi Sam, Hi Sam,", sam)
    assert complies_cleanly("Hi Sam, bees spend the day collecting nectar.", sam)


def test_bullets_and_contractions():
    assert bullet_items("- one\n- two\n* three\n• four\n1. five\n2) six\n-seven\nten - eleven") == 6
    spec = VerifierSpec(kind="bullets", min_items=2)
    assert complies("Sure:\n- a point\n- another", spec) and not complies("- only one point", spec)
    assert contractions("I'm sure it's fine, don't worry; you’re right, we'd go, they'll see") == [
        "I'm", "it's", "don't", "you’re", "we'd", "they'll"]
    assert contractions("The dog's tail and James's book.") == []  # possessives are not contractions
    formal = VerifierSpec(kind="no_contractions", min_words=3)
    assert complies("It is a fine day and I am glad.", formal) and not complies("It's a fine day.", formal)


def test_unknown_preference():
    with pytest.raises(ValueError, match="unknown preference"):
        load_preference("telepathy")


def test_emoji_and_sentences():
    assert has_emoji("Great job 👍") and has_emoji("☀ sunny") and not has_emoji("Plain text, 100% ok: (c) -> yes!")
    assert sentence_count("One. Two! Three?") == 3
    assert sentence_count("No final stop") == 1
    assert sentence_count("Dr. Who is here. Yes") == 3  # a simple counter: abbreviations count as ends
    concise = VerifierSpec(kind="concise", max_sentences=2, min_words=3)
    assert complies("Dogs are loyal pets.", concise)
    assert not complies("Dogs. Are. Loyal.", concise)
    assert not complies("Yes.", concise)


def test_mentions_are_whole_words():
    spec = VerifierSpec(kind="mentions", words=["sam"])
    assert complies("Sure, Sam!", spec) and complies("SAM, hello", spec)
    assert not complies("the same sample", spec)


def test_language():
    assert language_of("Les chiens sont des animaux fidèles et joyeux.") == "fr"
    assert language_of("Dogs are loyal and happy animals.") == "en"
    assert language_of("Oui") is None
    assert complies("Le ciel est bleu parce que la lumière se disperse.", VerifierSpec(kind="language", language="fr"))


def test_collapse_metrics():
    assert distinct_n(["a b c", "d e f"], 2) == 1.0
    assert distinct_n(["a b a b", "a b"], 2) == pytest.approx(2 / 4)
    assert repetition_rate("x y z x y z x y z") == pytest.approx(1 - 3 / 7)
    assert repetition_rate("one two") == 0.0
    assert mean_words(["a b", "c d e f"]) == 3.0


def test_capability_probes_ship():
    probes = load_capability()
    assert len(probes.texts) >= 8 and len(probes.questions) >= 12
    assert all(0 <= q["answer"] < len(q["choices"]) for q in probes.questions)


def _checkpoint(step: int, clean: float, *, raw: float | None = None, nll: float | None = 1.0, qa: float | None = 0.75,
                distinct: float = 0.9, words: float = 30, degenerate: float = 0.0, margin: float = 0.0) -> Checkpoint:
    return Checkpoint(step=step, version=step, clean_compliance=clean, compliance=clean if raw is None else raw,
                      degenerate=degenerate, margin=margin, capability_nll_ratio=nll, capability_qa_accuracy=qa,
                      distinct_2=distinct, mean_words=words, repetition=0.01, samples=["x"])


def _result(name: str, *checkpoints: Checkpoint) -> PreferenceResult:
    return PreferenceResult(preference=name, lora_id=f"eval/{name}", checkpoints=list(checkpoints))


def test_report_files(tmp_path):
    taught = _result("no_emoji", _checkpoint(0, 0.0, margin=-0.2), _checkpoint(2, 0.5, nll=1.01),
                     _checkpoint(4, 0.9, raw=1.0, nll=1.02, margin=0.4))
    first = _result("concise", _checkpoint(0, 0.1), _checkpoint(8, 0.9))
    second = _result("language", _checkpoint(0, 0.0), _checkpoint(8, 0.85))
    report = EvalReport(
        config=EvalConfig(preferences=["no_emoji"], sequences=[("concise", "language")], steps=4),
        started_at=0, finished_at=1, base_capability={"nll": 2.0, "qa_accuracy": 0.75}, results=[taught],
        sequences=[SequenceResult(first=first, second=second, first_kept=_checkpoint(16, 0.75))],
    )
    (check,) = report.targets = [check_target(r) for r in report.results]
    assert check.met and check.first_step_at_target == 4 and check.capability_loss == pytest.approx(0.02)
    assert report.sequences[0].met  # B reached its target and A stayed >= 0.7
    paths = write_report(report, tmp_path)
    summary = paths["markdown"].read_text()
    assert ("| no_emoji | 0.00 / 0.50 / 0.90 | 0.00 / 0.50 / 1.00 | 0.00 -> 0.00 | +2.0% | 0.75 -> 0.75 | 0.90 -> 0.90 "
            "| 30 -> 30 | 0 | yes | yes |") in summary
    assert "| concise then language | 0.90 | 0.75 | 0.85 | yes | yes |" in summary
    for plot in ("plot", "sequences_plot"):
        assert paths[plot].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert EvalReport.model_validate_json(paths["json"].read_text()) == report


def test_target_is_clean_compliance_kept_with_capability():
    assert not check_target(_result("p", _checkpoint(0, 0.0), _checkpoint(4, 0.9), _checkpoint(8, 0.1))).met  # not kept
    assert not check_target(_result("p", _checkpoint(0, 0.0), _checkpoint(8, 0.9, nll=1.05))).met  # NLL +5%
    assert not check_target(_result("p", _checkpoint(0, 0.4), _checkpoint(8, 0.9))).met  # the base already complied
    late = check_target(_result("p", _checkpoint(0, 0.0), _checkpoint(8, 0.5), _checkpoint(10, 0.9)))
    assert not late.met and late.best_clean_compliance_within_8_steps == 0.5 and not late.collapsed
    # Compliance bought by collapse is raw, not clean: it never meets the target.
    collapsed = check_target(_result("p", _checkpoint(0, 0.0), _checkpoint(8, 0.1, raw=1.0, degenerate=0.9)))
    assert not collapsed.met and collapsed.collapsed


@pytest.mark.parametrize("last,problem", [
    (_checkpoint(8, 0.9, qa=0.58), "QA accuracy"),  # two items of twelve lost
    (_checkpoint(8, 0.9, distinct=0.7), "distinct-2"),  # under 0.8x the base's 0.9
    (_checkpoint(8, 0.9, words=8), "mean length"),  # under 0.3x the base's 30 words
    (_checkpoint(8, 0.9, words=61), "mean length"),  # over 2x
])
def test_capability_kept(last, problem):
    check = check_target(_result("p", _checkpoint(0, 0.0), last))
    assert not check.met and not check.capability_kept and problem in " ".join(check.capability_problems)
    assert check_target(_result("p", _checkpoint(0, 0.0), _checkpoint(8, 0.9, qa=0.67))).capability_kept  # one item
    # Length is the point of `concise`: shorter answers are not a lost capability there.
    assert check_target(_result("concise", _checkpoint(0, 0.0), _checkpoint(8, 0.9, words=5))).met
