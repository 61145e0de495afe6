"""What a degenerate answer is: one definition, shared by the trainer's collapse guard and the evaluation.

An answer is degenerate when fewer than 60% of its word bigrams are distinct, or when one word makes up more
than a third of its words. Answers under four words are never degenerate: "Yes.", "Merci beaucoup !" or
"Hi Sam!" are short, not broken.

Words are split on white space, lower-cased, and one thing more: a word that is a unit repeated three or more
times with nothing between ("theriatheriatheria", ",,,,,,,,", "you-you-you-") counts as that many words. A
collapsed adapter produces exactly such runs, and without this they would pass as one short word.
"""

from __future__ import annotations

import re
from collections import Counter
from itertools import pairwise

MIN_WORDS = 4
MIN_DISTINCT_BIGRAMS = 0.6
MAX_TOP_WORD_SHARE = 1 / 3


_GLUED = re.compile(r"(.+?)\1{2,}")
_GLUED_MIN_CHARS = 6


def _words(text: str) -> list[str]:
    words: list[str] = []
    for word in text.lower().split():
        glued = _GLUED.match(word) if len(word) >= _GLUED_MIN_CHARS else None
        if glued is None:
            words.append(word)
            continue
        unit = glued.group(1)
        words.extend([unit] * (glued.end() // len(unit)))
        if glued.end() < len(word):
            words.append(word[glued.end():])
    return words


def distinct_bigram_share(text: str) -> float:
    """Distinct word bigrams over all word bigrams of one answer (1.0 when it has none)."""
    words = _words(text)
    bigrams = list(pairwise(words))
    return len(set(bigrams)) / len(bigrams) if bigrams else 1.0


def top_word_share(text: str) -> float:
    """The share of the answer's words taken by its most frequent word (0.0 for an empty answer)."""
    words = _words(text)
    return Counter(words).most_common(1)[0][1] / len(words) if words else 0.0


def is_degenerate(text: str) -> bool:
    if len(_words(text)) < MIN_WORDS:
        return False
    return distinct_bigram_share(text) < MIN_DISTINCT_BIGRAMS or top_word_share(text) > MAX_TOP_WORD_SHARE
