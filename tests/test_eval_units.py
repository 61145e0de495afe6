"""Evaluation building blocks: verifiers, collapse metrics, shipped preferences, report writing."""

from __future__ import annotations

import pytest

from claas_ray.eval.metrics import distinct_n, mean_words, repetition_rate
from claas_ray.eval.preferences import SHIPPED, VerifierSpec, load_capability, load_preference
from claas_ray.eval.report import write_report
from claas_ray.eval.runner import Checkpoint, EvalConfig, EvalReport, PreferenceResult, check_target
from claas_ray.eval.verifiers import complies, has_emoji, language_of, sentence_count


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_preferences_are_complete(name):
    preference = load_preference(name)
    assert len(preference.heldout_prompts) >= 20
    assert not set(preference.heldout_prompts) & set(preference.training_prompts)
    refs = preference.references
    assert complies(refs.compliant, preference.verifier)
    assert not complies(refs.non_compliant, preference.verifier)


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


def test_report_files(tmp_path):
    checkpoints = [
        Checkpoint(step=s, version=s, compliance=c, margin=m, capability_nll_ratio=r, capability_qa_accuracy=0.75,
                   distinct_2=0.9, mean_words=30, repetition=0.01, samples=["x"])
        for s, c, m, r in [(0, 0.0, -0.2, 1.0), (2, 0.5, 0.1, 1.01), (4, 0.9, 0.4, 1.02)]
    ]
    report = EvalReport(
        config=EvalConfig(preferences=["no_emoji"], steps=4), started_at=0, finished_at=1,
        base_capability={"nll": 2.0, "qa_accuracy": 0.75},
        results=[PreferenceResult(preference="no_emoji", lora_id="eval/x", checkpoints=checkpoints)],
    )
    (check,) = report.targets = [check_target(r) for r in report.results]
    assert check.met and check.first_step_at_target == 4 and check.capability_loss == pytest.approx(0.02)
    paths = write_report(report, tmp_path)
    summary = paths["markdown"].read_text()
    assert ("| no_emoji | 0.00 | 0.90 | 0.90 | -0.200 -> +0.400 | +2.0% | 0.75 (0.75) | 0.90 -> 0.90 | 0.01 -> 0.01 "
            "| 0 | yes | no |") in summary
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert EvalReport.model_validate_json(paths["json"].read_text()) == report


def test_target_needs_compliance_kept_and_capability():
    def result(points):
        return PreferenceResult(preference="p", lora_id="x", checkpoints=[
            Checkpoint(step=s, version=s, compliance=c, margin=0, capability_nll_ratio=r, distinct_2=1, mean_words=1,
                       repetition=0, samples=[]) for s, c, r in points])

    assert not check_target(result([(0, 0.0, 1.0), (4, 0.9, 1.0), (8, 0.1, 1.0)])).met  # reached, then collapsed
    assert not check_target(result([(0, 0.0, 1.0), (8, 0.9, 1.05)])).met  # capability lost
    late = check_target(result([(0, 0.0, 1.0), (8, 0.5, 1.0), (10, 0.9, 1.0)]))
    assert not late.met and late.best_compliance_within_8_steps == 0.5
    assert not late.collapsed


def test_collapse_is_flagged():
    points = [(0, 0.0, 0.8, 0.05), (8, 1.0, 0.1, 0.8)]
    result = PreferenceResult(preference="p", lora_id="x", checkpoints=[
        Checkpoint(step=s, version=s, compliance=c, margin=0, capability_nll_ratio=1.0, distinct_2=d, mean_words=5,
                   repetition=r, samples=[]) for s, c, d, r in points])
    check = check_target(result)
    assert check.met and check.collapsed
