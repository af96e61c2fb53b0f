"""The refusals of the service: a bad request (4xx) and a saturated service (503).

Light on purpose (no numpy, no torch): the JSON parser process imports it.
"""

from __future__ import annotations

__all__ = [
    "InputError",
    "Saturated",
]


class InputError(ValueError):
    """A request the service refuses, with the HTTP status to answer and a message for people."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def __reduce__(self) -> tuple[type, tuple[str, int]]:
        # Raised in the parser process, re-raised here: keep the status through pickling.
        return type(self), (self.message, self.status)


class Saturated(RuntimeError):
    """The service holds as much work as it is allowed to: answer 503 with ``Retry-After``."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s
