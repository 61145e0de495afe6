"""Programmatic checks that an answer follows a preference. Pure functions of the text."""

from __future__ import annotations

import re

from claas_ray.degeneration import is_degenerate
from claas_ray.eval.preferences import VerifierSpec

_EMOJI = re.compile(
    "[\U0001F000-\U0001FAFF\U00002600-\U000027BF\U0001F1E6-\U0001F1FF\U00002B00-\U00002BFF\U0000FE0F\U0000200D]"
)
_SENTENCE_END = re.compile(r"[.!?]+(?:\s|$)")
_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+\S", re.MULTILINE)
# n't, 're, 've, 'll, 'm, 'd anywhere; 's only after words where it is "is"/"has"/"us", never a possessive.
_CONTRACTION = re.compile(
    r"\b(?:\w+n['\u2019]t|\w+['\u2019](?:re|ve|ll|m|d)|(?:it|that|there|here|what|who|where|he|she|let|how)['\u2019]s)\b",
    re.IGNORECASE,
)


def has_emoji(text: str) -> bool:
    return bool(_EMOJI.search(text))


def sentence_count(text: str) -> int:
    stripped = text.strip()
    if not stripped:
        return 0
    ends = len(_SENTENCE_END.findall(stripped))
    return ends + (0 if re.search(r"[.!?]\s*$", stripped) else 1)


def mentions(text: str, words: list[str]) -> bool:
    return any(re.search(rf"\b{re.escape(word)}\b", text, re.IGNORECASE) for word in words)


def bullet_items(text: str) -> int:
    """Lines that start with a list marker: -, *, \u2022, or a number with . or )."""
    return len(_BULLET.findall(text))


def contractions(text: str) -> list[str]:
    return _CONTRACTION.findall(text)


def language_of(text: str) -> str | None:
    """ISO code of the text's language (langdetect, offline, seeded); None for text too short to tell."""
    from langdetect import DetectorFactory, LangDetectException, detect

    DetectorFactory.seed = 0
    try:
        return detect(text) if len(text.split()) >= 3 else None
    except LangDetectException:
        return None


def complies(text: str, spec: VerifierSpec) -> bool:
    if spec.kind == "no_emoji":
        return bool(text.strip()) and not has_emoji(text)
    if spec.kind == "concise":
        return len(text.split()) >= spec.min_words and sentence_count(text) <= spec.max_sentences
    if spec.kind == "mentions":
        return mentions(text, spec.words)
    if spec.kind == "bullets":
        return bullet_items(text) >= spec.min_items
    if spec.kind == "no_contractions":
        return len(text.split()) >= spec.min_words and not contractions(text)
    return language_of(text) == spec.language


def complies_cleanly(text: str, spec: VerifierSpec) -> bool:
    """The verifier accepts the answer and it is not degenerate: compliance bought by collapse does not count."""
    return complies(text, spec) and not is_degenerate(text)
