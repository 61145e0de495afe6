"""Serving: the vLLM engine with per-version LoRA loading, and the completion record."""
