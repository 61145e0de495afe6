"""A trainer that is down or restarting makes lifecycle calls a 503 with Retry-After, never a 500."""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import ActorDiedError

from claas_ray.adapters import LocalAdapterStore
from claas_ray.config import ClaasConfig
from claas_ray.feedback.journal import FeedbackJournal
from claas_ray.protocol.claas import LoraInitRequest
from claas_ray.serving.auth import OPEN_ACCESS
from claas_ray.serving.claas_serving import ClaasServing
from claas_ray.serving.completion_log import CompletionLog
from claas_ray.serving.errors import ApiError


class DeadMethod:
    async def remote(self, *args):
        raise ActorDiedError()


class DeadTrainer:
    """What a Serve handle to a trainer replica that just died raises."""

    def __getattr__(self, name: str) -> DeadMethod:
        return DeadMethod()


def test_trainer_down_is_503_with_retry_after(tmp_path):
    config = ClaasConfig(state_dir=str(tmp_path / "state"))
    serving = ClaasServing(config, LocalAdapterStore(tmp_path / "adapters"), CompletionLog(tmp_path / "c.sqlite"),
                           FeedbackJournal(tmp_path / "f.sqlite"), DeadTrainer())
    with pytest.raises(ApiError) as caught:
        asyncio.run(serving.init_lora(LoraInitRequest(lora_id="a/b"), OPEN_ACCESS))
    assert caught.value.error.status_code == 503 and caught.value.error.error.code == "trainer_unavailable"
    assert caught.value.headers == {"retry-after": str(config.router.retry_after_s)}
