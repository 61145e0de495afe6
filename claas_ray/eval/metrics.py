"""Collapse signals over a set of answers: diversity, length, repetition."""

from __future__ import annotations


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams over all n-grams across the answers (1.0: nothing repeats)."""
    grams = [tuple(words[i : i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(text: str, n: int = 3) -> float:
    """Share of an answer's n-grams that already appeared earlier in it."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def mean_words(texts: list[str]) -> float:
    return sum(len(t.split()) for t in texts) / len(texts) if texts else 0.0
