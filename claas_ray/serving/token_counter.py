"""Counting tokens at the router, so length limits are in the model's own tokens and fail with a 400 at intake."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from claas_ray.config import ClaasConfig
from claas_ray.models.registry import resolve_model_path

logger = logging.getLogger(__name__)

TokenCounter = Callable[[str], int]


def utf8_bytes(text: str) -> int:
    """An upper bound on any byte-level BPE's token count: the fallback when no tokenizer loads."""
    return len(text.encode())


def load_token_counter(config: ClaasConfig) -> TokenCounter:
    """The base model's tokenizer (Tinker's base model on Tinker); UTF-8 bytes if it cannot be loaded."""
    name = config.tinker_base_model() if config.serving.engine == "tinker" else config.model.base_model
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name, pull=False))
    except Exception as exc:  # offline with a hub id, or no local copy: stay safe, never unbounded
        logger.warning("no tokenizer for %s (%s); feedback length is counted in UTF-8 bytes", name, exc)
        return utf8_bytes

    lock = threading.Lock()  # intake runs in threads; one tokenizer is not safe to share between them

    def count(text: str) -> int:
        with lock:
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return count
