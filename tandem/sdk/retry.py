"""When to call again: the retry policy (RetryInfo first, else jittered exponential backoff) and the deadline that
bounds every attempt of one call, shared by the blocking and asyncio clients."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import grpc

from tandem.sdk.errors import TandemError

__all__ = ["DEFAULT_RETRY", "NO_RETRY", "RETRYABLE", "Attempts", "RetryPolicy"]

# Only these mean "the same request may succeed later": the server is loading or overloaded, or unreachable.
# INVALID_ARGUMENT and NOT_FOUND would fail again; DEADLINE_EXCEEDED has used up the caller's time budget.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


@dataclass(frozen=True)
class RetryPolicy:
    """Retries UNAVAILABLE and RESOURCE_EXHAUSTED, waiting as long as the server's RetryInfo asks, else backing off
    exponentially with full jitter (so that many clients that failed together do not come back together).

    gRPC's built-in retry policy (service config) is not used: it cannot read google.rpc.RetryInfo.
    """

    max_attempts: int = 4
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    multiplier: float = 2.0

    def delay_s(self, attempt: int, error: TandemError) -> float | None:
        """Seconds to wait after failed attempt number `attempt` (1-based), or None when not to retry."""
        if error.code not in RETRYABLE or attempt >= self.max_attempts:
            return None
        if error.retry_delay_s is not None:
            return error.retry_delay_s
        return random.uniform(0, min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1)))


# Frozen, so one shared instance is a safe default for every client.
DEFAULT_RETRY = RetryPolicy()
NO_RETRY = RetryPolicy(max_attempts=1)


class Attempts:
    """The attempts of one call under one deadline: each attempt gets what is left of it, so retries and their waits
    never stretch the caller's time budget."""

    def __init__(self, policy: RetryPolicy, timeout_s: float) -> None:
        self.policy = policy
        self.deadline = time.monotonic() + timeout_s
        self.attempt = 0

    def start(self) -> float:
        """Begins the next attempt; returns its timeout in seconds."""
        self.attempt += 1
        return max(self.deadline - time.monotonic(), 0.0)

    def delay_s(self, error: TandemError) -> float | None:
        """Seconds to wait before the next attempt after `error`, or None to give up: the policy says no, or the
        wait would reach the deadline."""
        delay = self.policy.delay_s(self.attempt, error)
        if delay is None or time.monotonic() + delay >= self.deadline:
            return None
        return delay
