"""tandem.sdk without a server: what the client refuses before calling, and the retry policy's delays."""

from __future__ import annotations

import grpc
import pytest

from tandem.sdk import (
    RetryPolicy,
    TandemClient,
    TandemError,
)


def test_a_single_string_is_refused() -> None:
    with TandemClient("127.0.0.1:1") as client, pytest.raises(TypeError, match="single string"):
        client.embed("hello")


def test_backoff_is_bounded_and_grows() -> None:
    policy = RetryPolicy(max_attempts=5, initial_backoff_s=1.0, multiplier=2.0, max_backoff_s=3.0)
    plain = TandemError(grpc.StatusCode.UNAVAILABLE, "down")
    for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 3.0), (4, 3.0)]:
        delays = [policy.delay_s(attempt, plain) for _ in range(50)]
        assert all(d is not None and 0 <= d <= ceiling for d in delays)
    assert policy.delay_s(5, plain) is None
    told = TandemError(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", retry_delay_s=0.7)
    assert policy.delay_s(1, told) == 0.7
    assert policy.delay_s(1, TandemError(grpc.StatusCode.NOT_FOUND, "missing")) is None
