"""How a conversation becomes prompt token ids, in one place for the server and the trainer.

The trainer's student context must be token-for-token the context the response was sampled in, so both
sides render through this function: the model's own chat template to text, then tokenised without
adding special tokens (the template already has them).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


def render_prompt_ids(tokenizer, messages: list[ChatMessage]) -> list[int]:
    """Token ids of the chat-templated prompt, ending where the assistant's answer begins."""
    text = tokenizer.apply_chat_template(
        [message.model_dump() for message in messages], add_generation_prompt=True, tokenize=False
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
