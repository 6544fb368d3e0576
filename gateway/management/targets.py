"""Every replica behind a stage target, each as an address of its own: what the gateway's management calls reach.

Inference calls go to one replica of the target (gRPC's round_robin picks it). A management call changes the state of
the replica that answers it, so the gateway sends it to every replica instead, and needs their addresses:

- `ipv4:A:P,B:P` and `ipv6:[A]:P,[B]:P` (what `tandem serve --replicas` gives the gateway): each address listed;
- `dns:///NAME:PORT` (the Kubernetes manifests and compose, over a headless Service): every A record of NAME, looked
  up at call time so that pods that came or went since the last call count (AAAA records when NAME has no A record);
- anything else (`HOST:PORT`, `unix:PATH`): one replica, the target itself.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass

from services.common import errors
from services.common.errors import Reason

STAGE = "inference"
# gRPC's default port for a `dns:` target that names none.
DEFAULT_DNS_PORT = "443"


@dataclass(frozen=True)
class Replica:
    """One replica: `address` as people read it (shown in answers and errors), `target` for its gRPC channel, and
    `host`, the name its TLS certificate is checked against when the address came from DNS (empty otherwise)."""

    address: str
    target: str
    host: str = ""


def _ip_replica(host: str, port: str, name: str = "") -> Replica:
    if ipaddress.ip_address(host).version == 6:
        return Replica(f"[{host}]:{port}", f"ipv6:[{host}]:{port}", name)
    return Replica(f"{host}:{port}", f"ipv4:{host}:{port}", name)


def _split_host_port(text: str) -> tuple[str, str]:
    """`NAME:PORT`, `[V6]:PORT`, `NAME` or `[V6]` -> (host, port); the port is gRPC's default when none is given."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, rest.removeprefix(":") or DEFAULT_DNS_PORT
    host, colon, port = text.rpartition(":")
    if not colon:
        return text, DEFAULT_DNS_PORT
    return host, port


def dns_name(target: str) -> tuple[str, str] | None:
    """(host, port) of a `dns:` target (`dns:///NAME:PORT`, `dns://AUTHORITY/NAME:PORT`, `dns:NAME:PORT`); None for
    other targets. An AUTHORITY (a DNS server of its own) is not honoured: names are looked up as the system does."""
    if not target.startswith("dns:"):
        return None
    rest = target.removeprefix("dns:")
    if rest.startswith("//"):
        rest = rest[2:].partition("/")[2]
    return _split_host_port(rest)


def listed(target: str) -> list[Replica] | None:
    """The replicas of a target that lists them (`ipv4:`, `ipv6:`) or names one; None for a `dns:` target."""
    if dns_name(target) is not None:
        return None
    for scheme in ("ipv4:", "ipv6:"):
        if target.startswith(scheme):
            addresses = [a.strip() for a in target.removeprefix(scheme).split(",") if a.strip()]
            return [_ip_replica(*_split_host_port(a)) for a in addresses]
    return [Replica(target, target)]


async def resolve(target: str, timeout_s: float) -> list[Replica]:
    """Every replica behind `target` now: those a target lists in its order, those of a DNS name by address.

    A `dns:` name is looked up with the system resolver (asyncio's getaddrinfo), within `timeout_s`; a name that does
    not resolve, or resolves to nothing, is UNAVAILABLE (STAGE_UNAVAILABLE), as the stage would be to a call.
    """
    fixed = listed(target)
    if fixed == []:
        raise errors.unavailable(
            f"the {STAGE} target {target!r} lists no address", reason=Reason.STAGE_UNAVAILABLE, stage=STAGE
        )
    if fixed is not None:
        return fixed
    host, port = dns_name(target) or ("", "")
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP), max(timeout_s, 0.001)
        )
    except (OSError, TimeoutError) as exc:
        raise errors.unavailable(
            f"cannot find the {STAGE} replicas: looking up {host!r} failed ({str(exc) or 'timed out'})",
            reason=Reason.STAGE_UNAVAILABLE,
            stage=STAGE,
        ) from None
    found: dict[int, set[str]] = {socket.AF_INET: set(), socket.AF_INET6: set()}
    for family, _, _, _, sockaddr in infos:
        if family in found:
            found[family].add(str(sockaddr[0]).partition("%")[0])
    # A dual-stack Service lists each pod once per family: one family, so that each pod is one replica.
    addresses = found[socket.AF_INET] or found[socket.AF_INET6]
    if not addresses:
        raise errors.unavailable(
            f"cannot find the {STAGE} replicas: {host!r} resolves to no address",
            reason=Reason.STAGE_UNAVAILABLE,
            stage=STAGE,
        )
    # The host name is kept for TLS: the replicas' certificate names the Service, not each pod's address.
    return [_ip_replica(str(a), port, host) for a in sorted(ipaddress.ip_address(a) for a in addresses)]
