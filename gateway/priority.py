"""Each call's priority at the gateway: asked for in `x-tandem-priority` metadata (or the OIP `priority` parameter),
defaulted and capped by the caller's API key, and kept in a context variable for the coalescer and the stage calls.

A request that asks for more than its key allows is served at the key's cap, not refused. This is what production
schedulers do with a priority hint (Kubernetes API Priority and Fairness classifies by identity whatever the client
says; OpenAI's service_tier answers with the tier actually used): a priority is a scheduling hint, not part of the
answer, so one client library shared by keys of different classes works with every key, and a key gains nothing by
asking for more. A malformed value is still INVALID_ARGUMENT: that is a bug in the caller, not a matter of rights.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import grpc

from gateway.auth import HEALTH_PREFIX, REFLECTION_PREFIXES, current_key
from gateway.interception import Context, Handler, wrap_handler
from services.common import timing
from services.common.priority import DEFAULT, Priority, parse

log = logging.getLogger(__name__)

PRIORITY_HEADER = "x-tandem-priority"
OIP_PARAMETER = "priority"
FREE_PREFIXES = (HEALTH_PREFIX, *REFLECTION_PREFIXES)


@dataclass(frozen=True)
class PriorityPolicy:
    """What a caller gets when it asks for nothing (default), and the most it may ask for (cap)."""

    default: Priority = DEFAULT
    cap: Priority = Priority.HIGH

    def grant(self, asked: Priority | None) -> Priority:
        """The level a request runs at: its own, or the default, and never above the cap (lower is higher)."""
        level = self.default if asked is None else asked
        return max(level, self.cap)


# With authentication off there is no identity to cap: any caller may ask for any level.
OPEN = PriorityPolicy()
# The call's level, read by the coalescer and put into the inference stage's InferRequest.priority.
current_priority: ContextVar[Priority] = ContextVar("tandem_priority", default=DEFAULT)
_current_policy: ContextVar[PriorityPolicy] = ContextVar("tandem_priority_policy", default=OPEN)


def policy() -> PriorityPolicy:
    """The current caller's policy: its key's, or OPEN with authentication off."""
    key = current_key.get()
    return OPEN if key is None else PriorityPolicy(key.priority, key.max_priority)


def metadata_value(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | bytes | None:
    for name, value in metadata or ():
        if name == PRIORITY_HEADER:
            return value
    return None


def settle(asked: Priority | None) -> Priority:
    """Grants `asked` under the caller's policy and makes it the call's level (also for the access log and the
    per-priority metrics)."""
    granted = _current_policy.get().grant(asked)
    if asked is not None and granted != asked:
        log.debug("priority %s asked, %s granted (the key's cap)", asked.label, granted.label)
    current_priority.set(granted)
    timing.note(priority=granted.label)
    return granted


def from_oip_parameters(parameters: Mapping[str, object]) -> None:
    """Triton's `priority` request parameter (0 or absent: keep what the metadata or the key said)."""
    if OIP_PARAMETER in parameters:
        asked = parse(parameters[OIP_PARAMETER], f"parameters[{OIP_PARAMETER}]")
        if asked is not None:
            settle(asked)


class PriorityInterceptor(grpc.aio.ServerInterceptor):
    """Sets each call's level from its metadata and its key (after AuthInterceptor, which names the key); a value
    that is not a level is INVALID_ARGUMENT naming the metadata key."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(FREE_PREFIXES):
            return handler
        value = metadata_value(handler_call_details.invocation_metadata)

        async def prioritize(request: Any, context: Context) -> None:
            _current_policy.set(policy())
            settle(None if value is None else parse(value, PRIORITY_HEADER))

        return wrap_handler(handler, prioritize)
