"""Per-caller rate limits at the gateway: a token bucket of texts per API key (or per client host with auth off).

The unit is texts, not requests: one request of 512 texts costs the model 512 times what a one-text request
does, so counting requests would let a caller take the whole server with few, large requests. A request costs the
number of texts (or documents) it carries, at least 1. A request bigger than the bucket is still served once the
bucket is full, and leaves it in debt, so large requests are possible but not cheap.

Over the limit, a unary call is answered RESOURCE_EXHAUSTED with a RetryInfo saying when the bucket will hold
enough; a stream's next message waits for the bucket instead (the back-pressure reaches the client through HTTP/2
flow control), so a stream is slowed to the rate rather than cut.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from gateway.auth import HEALTH_PREFIX, REFLECTION_PREFIXES, current_key_id
from gateway.interception import Context, Handler, wrap_handler
from services.common import errors

log = logging.getLogger(__name__)

Clock = Callable[[], float]
# Health and reflection calls are free.
FREE_PREFIXES = (HEALTH_PREFIX, *REFLECTION_PREFIXES)


class TokenBucket:
    """`rate` tokens a second up to `burst`; starts full."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.updated = now

    def _refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def take(self, cost: float, now: float) -> float:
        """0 when `cost` is taken; otherwise the seconds until it could be, and nothing is taken."""
        self._refill(now)
        need = min(cost, self.burst)
        if self.tokens >= need:
            self.tokens -= cost  # may go below 0 for a request bigger than the bucket: debt paid by waiting
            return 0.0
        return (need - self.tokens) / self.rate

    def full(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.burst


class RateLimiter:
    """One bucket per caller; idle (full) buckets are dropped when there are many, so memory stays bounded."""

    def __init__(self, rate: float, burst: float, clock: Clock = time.monotonic, max_callers: int = 10_000) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.max_callers = max_callers
        self._buckets: dict[str, TokenBucket] = {}

    def _bucket(self, caller: str, now: float) -> TokenBucket:
        bucket = self._buckets.get(caller)
        if bucket is None:
            if len(self._buckets) >= self.max_callers:
                self._buckets = {k: b for k, b in self._buckets.items() if not b.full(now)}
            bucket = self._buckets[caller] = TokenBucket(self.rate, self.burst, now)
        return bucket

    def take(self, caller: str, cost: float) -> float:
        """0 when admitted, else the seconds to wait before asking again."""
        now = self.clock()
        return self._bucket(caller, now).take(cost, now)

    async def wait(self, caller: str, cost: float) -> None:
        # Waiting for time to pass, not for an event: the bucket refills with the clock.
        while (delay := self.take(caller, cost)) > 0:  # noqa: ASYNC110
            await asyncio.sleep(delay)


def request_cost(request: Any) -> int:
    """Texts in one request message: inputs, documents, or an OIP tensor's first dimension; at least 1."""
    if request is None:
        return 1
    inner = getattr(request, "request", None)  # EmbedStreamRequest wraps an EmbedRequest
    if inner is not None and hasattr(inner, "inputs"):
        request = inner
    documents = getattr(request, "documents", None)
    if documents is not None:
        return max(1, len(documents))
    inputs = getattr(request, "inputs", None)
    if inputs is None:
        return 1
    count = 0
    for item in inputs:
        if isinstance(item, str):
            count += 1
        else:  # an OIP input tensor: its texts are its first dimension
            shape = list(getattr(item, "shape", ()))
            count = max(count, int(shape[0]) if shape else 1)
    return max(1, count)


def caller_of(context: Context) -> str:
    """The API key's id, or with authentication off the client's host (its port changes with each connection)."""
    key_id = current_key_id.get()
    if key_id is not None:
        return f"key:{key_id}"
    peer = context.peer() or "unknown"
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rsplit(":", 1)[0]
    return peer


class RateLimitInterceptor(grpc.aio.ServerInterceptor):
    """Charges each call's texts to its caller's bucket; health and reflection are free."""

    def __init__(self, limiter: RateLimiter, max_cost: int) -> None:
        self.limiter = limiter
        self.max_cost = max_cost  # a claimed size above the request limit is refused later; charge no more

    def cost(self, request: Any) -> int:
        return min(request_cost(request), self.max_cost)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(FREE_PREFIXES):
            return handler

        async def admit(request: Any, context: Context) -> None:
            if request is None:  # a streaming request: charged message by message
                return
            caller = caller_of(context)
            delay = self.limiter.take(caller, self.cost(request))
            if delay > 0:
                log.info("rate limit: %s refused %s, retry in %.3fs", caller, method, delay)
                raise errors.rate_limited(
                    f"rate limit of {self.limiter.rate:g} texts/s (burst {self.limiter.burst:g}) exceeded; "
                    f"retry in {delay:.3f}s",
                    retry_after_s=delay,
                )

        async def throttle(message: Any, context: Context) -> None:
            await self.limiter.wait(caller_of(context), self.cost(message))

        return wrap_handler(handler, admit, throttle)
