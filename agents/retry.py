"""Capped, jittered exponential backoff (tenacity), one shape for every retry loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tenacity import AsyncRetrying, retry_base, retry_if_exception_type, wait_random_exponential

__all__ = ["backoff"]


def backoff(
    retry_on: type[BaseException] | tuple[type[BaseException], ...] | retry_base,
    *,
    first: float,
    cap: float,
    before_sleep: Callable[[Any], None] | None = None,
) -> AsyncRetrying:
    """Retry forever on ``retry_on``, waiting up to ``first * 2**n`` (at most ``cap``)
    seconds, jittered so that many clients do not retry in step; re-raise anything else."""
    retry = retry_on if isinstance(retry_on, retry_base) else retry_if_exception_type(retry_on)
    return AsyncRetrying(
        retry=retry,
        wait=wait_random_exponential(multiplier=first, max=cap),
        before_sleep=before_sleep,
        reraise=True,
    )
