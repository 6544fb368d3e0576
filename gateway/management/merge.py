"""One view of the models that several inference replicas report, in which no disagreement between them is hidden.

A version that every replica reports alike (the same state, the same aliases routing to it, default or not) is shown
as they report it, with its in-flight requests summed. Any difference makes it VERSION_STATE_MIXED, its `reason`
naming each replica's state, and `aliases` only those every replica routes to it; a model's `default_version` is
kept only when every replica has the same one. With one replica the view is that replica's answer, unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

from tandem.management.v1 import management_pb2

Answer = tuple[str, Sequence[management_pb2.ModelStatus]]


def state_name(state: int) -> str:
    return management_pb2.VersionState.Name(state).removeprefix("VERSION_STATE_")  # type: ignore[arg-type]


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), version) if version.isdigit() else (-1, version)


def _described(address: str, version: management_pb2.VersionStatus | None) -> str:
    if version is None:
        return f"{address}: not listed"
    text = f"{address}: {state_name(version.state)}"
    if version.aliases:
        text += f" [aliases {', '.join(version.aliases)}]"
    if version.is_default:
        text += " [default]"
    return text + (f" ({version.reason})" if version.reason else "")


def _signature(version: management_pb2.VersionStatus) -> tuple[int, tuple[str, ...], bool]:
    return version.state, tuple(sorted(version.aliases)), version.is_default


def merge_version(
    per_replica: Sequence[tuple[str, management_pb2.VersionStatus | None]],
) -> management_pb2.VersionStatus:
    listed = [v for _, v in per_replica if v is not None]
    merged = management_pb2.VersionStatus()
    merged.CopyFrom(listed[0])
    merged.in_flight = sum(v.in_flight for v in listed)
    if len(listed) == len(per_replica) and len({_signature(v) for v in listed}) == 1:
        return merged
    merged.state = management_pb2.VERSION_STATE_MIXED
    merged.reason = "inference replicas disagree: " + "; ".join(_described(a, v) for a, v in per_replica)
    common = (
        set(listed[0].aliases).intersection(*(v.aliases for v in listed)) if len(listed) == len(per_replica) else ()
    )
    del merged.aliases[:]
    merged.aliases.extend(a for a in listed[0].aliases if a in common)
    merged.is_default = False
    return merged


def merge_model(per_replica: Sequence[tuple[str, management_pb2.ModelStatus | None]]) -> management_pb2.ModelStatus:
    present = [(a, m) for a, m in per_replica if m is not None]
    merged = management_pb2.ModelStatus()
    merged.CopyFrom(present[0][1])
    if len(per_replica) == 1:
        return merged
    reasons: list[str] = []
    missing = [a for a, m in per_replica if m is None]
    if missing:
        reasons.append(f"not listed by inference replica {', '.join(missing)}")
    defaults = {m.default_version for _, m in present}
    if missing or len(defaults) > 1:
        merged.default_version = ""
        if len(defaults) > 1:
            reasons.append(
                "inference replicas disagree on the default version: "
                + "; ".join(f"{a}: {m.default_version or 'none'}" for a, m in present)
            )
    for _, model in present:
        if model.reason and model.reason not in reasons:
            reasons.append(model.reason)
    merged.reason = "; ".join(reasons)
    versions = sorted({v.version for _, m in present for v in m.versions}, key=_version_key)
    del merged.versions[:]
    for version in versions:
        merged.versions.append(
            merge_version(
                [
                    (a, next((v for v in m.versions if v.version == version), None) if m is not None else None)
                    for a, m in per_replica
                ]
            )
        )
    return merged


def merge_models(answers: Sequence[Answer]) -> list[management_pb2.ModelStatus]:
    """Every model any replica lists, sorted by name, merged over the replicas' answers (address, models)."""
    by_name = [(address, {m.name: m for m in models}) for address, models in answers]
    names = sorted({name for _, models in by_name for name in models})
    return [merge_model([(address, models.get(name)) for address, models in by_name]) for name in names]
