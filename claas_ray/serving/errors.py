"""`ApiError`: the one way both API families (OpenAI's and CLaaS's) answer with an error.

Raised where the problem is found, rendered once by the router in OpenAI's error shape, with its headers
(Retry-After on 429 and 503).
"""

from __future__ import annotations

from claas_ray.protocol.generation import GenerationError
from claas_ray.protocol.openai import ErrorResponse


class ApiError(Exception):
    """An answer that is not a success: a 4xx the caller must fix, or a 5xx to retry."""

    def __init__(self, status_code: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.error = ErrorResponse.make(status_code, message, param, code)
        self.headers = dict(headers or {})

    @property
    def status_code(self) -> int:
        return self.error.status_code

    @classmethod
    def from_generation(cls, error: GenerationError) -> ApiError:
        """An engine's refusal of a request (too long, unknown version) as the client's error."""
        return cls(error.status_code, error.message, error.param)
