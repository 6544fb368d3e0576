"""API-key authentication at the gateway: who is calling (x-api-key or Bearer), and may they call this method.

Keys are kept only as SHA-256 digests and compared in constant time against every known key, so neither a log line
nor the time an answer takes tells a caller anything about a key. A key is named in logs and metadata by its key id:
the first 8 hex digits of its digest. A key also says what priority its requests get when they ask for none, and
the most they may ask for (gateway/priority.py).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from gateway.interception import Context, Handler, rejecting_handler, wrap_handler
from services.common import errors
from services.common import priority as levels
from services.common.errors import Reason
from services.common.priority import Priority

log = logging.getLogger(__name__)

INFER = "infer"  # the data plane: GatewayService, and the Open Inference Protocol but for repository changes
ADMIN = "admin"  # the model lifecycle: ManagementService, OIP RepositoryModelLoad/Unload; implies infer
SCOPES = frozenset({INFER, ADMIN})

API_KEY_HEADER = "x-api-key"
AUTHORIZATION_HEADER = "authorization"

# The authenticated caller's key id, for the rate limiter and log lines; None with authentication off.
current_key_id: ContextVar[str | None] = ContextVar("tandem_key_id", default=None)
# The authenticated caller's key (for its priority default and cap); None with authentication off.
current_key: ContextVar[ApiKey | None] = ContextVar("tandem_key", default=None)

HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIXES = ("/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")
ADMIN_PREFIXES = (
    "/tandem.management.v1.ManagementService/",
    "/inference.GRPCInferenceService/RepositoryModelLoad",
    "/inference.GRPCInferenceService/RepositoryModelUnload",
)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


@dataclass(frozen=True)
class ApiKey:
    """One known key: its digest (never the key itself), its id for logs, what it may do, the priority its requests
    get when they ask for none and the highest they may ask for (a higher one is lowered to it)."""

    key_id: str
    digest: bytes
    scopes: frozenset[str]
    priority: Priority = levels.DEFAULT
    max_priority: Priority = levels.DEFAULT

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or ADMIN in self.scopes


def parse_keys(text: str, source: str) -> list[ApiKey]:
    """Entries `KEY [SCOPE[,SCOPE]] [priority=LEVEL] [max_priority=LEVEL]`, one a line (or separated by ';'); '#'
    starts a comment. Scope default infer; priority default normal; max_priority default the key's priority (a key
    may lower its requests' priority, and raise it only as far as max_priority says)."""
    keys: list[ApiKey] = []
    for number, raw in enumerate(text.replace(";", "\n").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source}: entry {number}"
        key, *rest = line.split()
        options = dict(_option(part, where) for part in rest if "=" in part)
        words = [part for part in rest if "=" not in part]
        if len(words) > 1 or len(options) < len(rest) - len(words):
            raise ValueError(f"{where}: expected 'KEY [SCOPE[,SCOPE]] [priority=LEVEL] [max_priority=LEVEL]'")
        scopes = frozenset(s.strip() for s in words[0].split(",") if s.strip()) if words else {INFER}
        unknown = sorted(set(scopes) - SCOPES)
        if unknown:
            raise ValueError(f"{where}: unknown scope {unknown[0]!r} (known: admin, infer)")
        level = _level(options.get("priority"), where) or levels.DEFAULT
        cap = _level(options.get("max_priority"), where) or level
        if level < cap:  # lower numbers are higher levels
            raise ValueError(f"{where}: priority {level.label} is above max_priority {cap.label}")
        digest = _digest(key)
        keys.append(ApiKey(digest.hex()[:8], digest, frozenset(scopes), level, cap))
    return keys


def _option(part: str, where: str) -> tuple[str, str]:
    name, _, value = part.partition("=")
    if name not in ("priority", "max_priority"):
        raise ValueError(f"{where}: unknown option {name!r} (known: priority, max_priority)")
    return name, value


def _level(value: str | None, where: str) -> Priority | None:
    if value is None:
        return None
    try:
        return levels.parse(value, "priority")
    except errors.TandemError:
        raise ValueError(f"{where}: priority {value!r} is not one of {levels.NAMES}") from None


class KeyRing:
    """The known keys; empty means authentication is off."""

    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self.keys = tuple(keys)

    @classmethod
    def load(cls, file: Path | None, inline: str | None) -> KeyRing:
        keys: list[ApiKey] = []
        if file is not None:
            keys += parse_keys(file.read_text(encoding="utf-8"), str(file))
        if inline:
            keys += parse_keys(inline, "api keys")
        return cls(keys)

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def find(self, presented: str) -> ApiKey | None:
        """The key matching `presented`, comparing digests in constant time and always against every key."""
        digest = _digest(presented)
        found = None
        for key in self.keys:
            if hmac.compare_digest(key.digest, digest):
                found = key
        return found


def presented_key(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The key from `x-api-key: KEY` or `authorization: Bearer KEY`; None when neither is there."""
    for name, value in metadata or ():
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        if name == API_KEY_HEADER and text.strip():
            return text.strip()
        if name == AUTHORIZATION_HEADER:
            scheme, _, token = text.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def required_scope(method: str, open_health: bool, open_reflection: bool) -> str | None:
    """The scope a method needs, or None for one anyone may call."""
    if open_health and method.startswith(HEALTH_PREFIX):
        return None
    if open_reflection and method.startswith(REFLECTION_PREFIXES):
        return None
    if method.startswith(ADMIN_PREFIXES):
        return ADMIN
    return INFER


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without a known key (UNAUTHENTICATED) or without the scope they need (PERMISSION_DENIED).

    The key id of an accepted call is set in `current_key_id` for the rest of the call.
    """

    def __init__(self, keys: KeyRing, *, open_health: bool = True, open_reflection: bool = True) -> None:
        self.keys = keys
        self.open_health = open_health
        self.open_reflection = open_reflection

    def check(self, method: str, metadata: Sequence[tuple[str, str | bytes]] | None) -> ApiKey | None:
        """The caller's key (None for an open method); raises the TandemError to answer otherwise."""
        scope = required_scope(method, self.open_health, self.open_reflection)
        if scope is None:
            return None
        presented = presented_key(metadata)
        if presented is None:
            raise errors.unauthenticated(
                f"this call needs an API key: send it as '{API_KEY_HEADER}: KEY' or 'authorization: Bearer KEY'",
                reason=Reason.MISSING_CREDENTIALS,
            )
        key = self.keys.find(presented)
        if key is None:
            raise errors.unauthenticated("the API key is not valid", reason=Reason.INVALID_API_KEY)
        if not key.allows(scope):
            log.warning("key %s refused %s: needs scope %r", key.key_id, method, scope)
            raise errors.permission_denied(
                f"{method.rsplit('/', 1)[-1]} needs an API key with the {scope!r} scope",
                scope=scope,
                key_id=key.key_id,
            )
        return key

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None or not self.keys.enabled:
            return handler
        try:
            key = self.check(handler_call_details.method, handler_call_details.invocation_metadata)
        except errors.TandemError as err:
            return rejecting_handler(handler, err)
        if key is None:
            return handler
        key_id = key.key_id

        async def identify(request: Any, context: Context) -> None:
            current_key_id.set(key_id)
            current_key.set(key)

        return wrap_handler(handler, identify)
