"""The model lifecycle behind the management API: load, unload, aliases, reload, and every version's status."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from services.common import errors
from services.common.errors import Reason
from services.common.repository import AccuracyReport, Task, VersionPolicy, check_alias
from services.inference.loading import ModelState, backend_label
from services.inference.registry import ModelEntry, ModelRegistry


@dataclass(frozen=True)
class VersionStatus:
    """One version as the management API shows it."""

    version: str
    state: ModelState
    reason: str
    aliases: tuple[str, ...]
    is_default: bool
    precision: str
    backend: str
    fingerprint: str
    source: str
    created: datetime | None
    accuracy: AccuracyReport | None
    in_flight: int


@dataclass(frozen=True)
class ModelStatus:
    """One model as the management API shows it."""

    name: str
    task: Task | None
    policy: VersionPolicy | None
    versions: tuple[VersionStatus, ...]
    aliases: dict[str, str]
    default_version: str
    reason: str


class ModelManagement:
    """What the ManagementService does: loads and unloads versions on request, moves aliases once their version is
    warm, reads model folders again, and reports every version's state. It steers the registry (the versions each
    entry holds as requested or unloaded, the aliases on disk); loading, routing and unloading stay the registry's."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    async def statuses(self) -> list[ModelStatus]:
        """Every model of the repository as of now (reading the folder starts loads the watcher would start)."""
        entries = await self.registry.refresh()
        return [self._status(e) for e in sorted(entries, key=lambda e: e.name) if self._listed(e)]

    def _listed(self, entry: ModelEntry) -> bool:
        return entry.listing is not None or any(name == entry.name for name, _ in self.registry.slots)

    async def _managed(self, name: str, version: str | None = None) -> ModelEntry:
        """The entry of a model named by a management call, read now: INVALID_ARGUMENT for names or versions that
        reach outside the repository (before anything is read), NOT_FOUND for unknown ones."""
        await asyncio.to_thread(self.registry.repository.contained_folder, name, version or None)
        (entry,) = await self.registry.refresh([name])
        if entry.listing is None:
            raise errors.not_found(f"model {name!r} not found", model=name)
        if entry.error:
            raise errors.failed_precondition(entry.error, reason=Reason.MODEL_CONFIG_INVALID, model=name)
        if version and version in entry.broken:
            raise errors.failed_precondition(
                entry.broken[version], reason=Reason.MODEL_BROKEN, model=name, version=version
            )
        return entry

    async def load(self, name: str, version: str = "", wait: bool = False) -> ModelStatus:
        """Loads one version (kept until unloaded), or what the policy wants; requests move once it is READY."""
        entry = await self._managed(name, version)
        if version:
            entry.held.discard(version)
            entry.requested.add(version)
            targets = [version]
        else:
            entry.held_all = False
            entry.held.clear()
            targets = sorted(self.registry.wanted(entry), key=int)
        for target in targets:
            slot = self.registry.slots.get((name, target))
            if slot is not None and slot.state is ModelState.FAILED:
                self.registry.begin_load(entry.models.get(target, slot.model))  # retried on request
        self.registry.converge(entry)
        self.registry.route(entry)
        if wait:
            await self._settle(name, targets)
            if version:
                slot = self.registry.slots.get((name, version))
                if slot is not None and slot.state is ModelState.FAILED:
                    raise errors.failed_precondition(
                        f"model {name}:{version} failed to load: {slot.reason}",
                        reason=Reason.MODEL_BROKEN,
                        model=name,
                        version=version,
                    )
        return self._status(entry)

    async def _settle(self, name: str, versions: Sequence[str]) -> None:
        """Waits for the loads of these versions, and for any they set off (fallbacks), without cancelling them."""
        while pending := [
            slot.task
            for (n, v), slot in self.registry.slots.items()
            if n == name and slot.state is ModelState.LOADING and slot.task and (v in versions or not versions)
        ]:
            await asyncio.wait(pending)

    async def unload(self, name: str, version: str = "", wait: bool = False) -> ModelStatus:
        """Unloads one version, or all of them; each keeps answering what is pinned to it until idle."""
        entry = await self._managed(name, version)
        if version:
            entry.requested.discard(version)
            entry.held.add(version)
            versions = [version]
        else:
            entry.held_all = True
            entry.requested.clear()
            versions = [v for n, v in self.registry.slots if n == name]
        for v in versions:
            slot = self.registry.slots.get((name, v))
            if slot is not None:
                self.registry.retire(slot, self.registry.why_unloaded(entry, v))
        self.registry.route(entry)
        self.registry.converge(entry)
        if wait:
            await self._settle(name, versions)  # a version still loading retires once it is loaded
            drains = [s.drain for (n, v), s in self.registry.slots.items() if n == name and v in versions and s.drain]
            if drains:
                await asyncio.wait(drains)
        return self._status(entry)

    async def set_alias(self, name: str, alias: str, version: str) -> ModelStatus:
        """Loads and warms up the version first (the alias stays where it was if that fails), then moves it."""
        check_alias(alias)
        entry = await self._managed(name, version)
        entry.held.discard(version)
        if entry.held_all:  # every version was unloaded on request: the alias asks for this one back
            entry.requested.add(version)
        entry.pending[version] += 1
        try:
            slot = self.registry.slots.get((name, version))
            if slot is None or slot.state in (ModelState.UNLOADED, ModelState.FAILED):
                slot = self.registry.begin_load(entry.models[version])
            elif slot.state is ModelState.UNLOADING and not slot.refusing:
                self.registry.revive(slot)
            while slot.state is not ModelState.READY:
                if slot.state is ModelState.LOADING and slot.task is not None:
                    await asyncio.wait({slot.task})
                elif slot.state is ModelState.UNLOADING and slot.drain is not None:
                    await asyncio.wait({slot.drain})
                    slot = self.registry.begin_load(slot.model)
                else:
                    raise errors.failed_precondition(
                        f"model {name}:{version} failed to load, so alias {alias!r} was not changed: {slot.reason}",
                        reason=Reason.MODEL_BROKEN,
                        model=name,
                        version=version,
                    )
            await asyncio.to_thread(self.registry.repository.set_alias, name, alias, version)
        finally:
            entry.pending[version] -= 1
            if entry.pending[version] <= 0:
                del entry.pending[version]
        (entry,) = await self.registry.refresh([name])
        return self._status(entry)

    async def delete_alias(self, name: str, alias: str) -> ModelStatus:
        check_alias(alias)
        await self._managed(name)
        await asyncio.to_thread(self.registry.repository.delete_alias, name, alias)
        (entry,) = await self.registry.refresh([name])
        return self._status(entry)

    async def reload(self, name: str = "", wait: bool = False) -> list[ModelStatus]:
        """Reads model folders again (all when `name` is empty), retrying versions that failed."""
        if name:
            await asyncio.to_thread(self.registry.repository.contained_folder, name)
        names = (
            [name]
            if name
            else sorted(set(await asyncio.to_thread(self.registry.repository.names)) | set(self.registry.entries))
        )
        for n in names:
            self.registry.repository.invalidate(n)
            for (slot_name, version), slot in list(self.registry.slots.items()):
                if slot_name == n and slot.state is ModelState.FAILED:
                    del self.registry.slots[(slot_name, version)]
        entries = await self.registry.refresh(names)
        if name and entries[0].listing is None:
            raise errors.not_found(f"model {name!r} not found", model=name)
        if wait:
            for n in names:
                await self._settle(n, ())
        return [self._status(e) for e in entries if self._listed(e)]

    def _status(self, entry: ModelEntry) -> ModelStatus:
        listing = entry.listing
        versions = set(listing.versions if listing is not None else ()) | {
            v for n, v in self.registry.slots if n == entry.name
        }
        by_version: dict[str, list[str]] = {}
        for alias, version in sorted(entry.aliases.items()):
            by_version.setdefault(version, []).append(alias)
        out: list[VersionStatus] = []
        task: Task | None = None
        for version in sorted(versions, key=int):
            slot = self.registry.slots.get((entry.name, version))
            model = slot.model if slot is not None else entry.models.get(version)
            if model is not None:
                task = model.task
            if slot is not None and not (slot.state is ModelState.UNLOADED and version in entry.broken):
                state, reason = slot.state, slot.reason
                if state is ModelState.UNLOADED:
                    reason = self.registry.why_unloaded(entry, version)
            elif version in entry.broken:
                state, reason = ModelState.FAILED, entry.broken[version]
            else:
                state, reason = ModelState.UNLOADED, self.registry.why_unloaded(entry, version)
            metadata = model.metadata if model is not None else None
            backend = ""
            if slot is not None and slot.backend is not None:
                backend = slot.backend.name
            elif model is not None:
                backend = backend_label(model.config)
            out.append(
                VersionStatus(
                    version=version,
                    state=state,
                    reason=reason,
                    aliases=tuple(by_version.get(version, ())),
                    is_default=version == entry.default,
                    precision=metadata.precision if metadata is not None else "fp32",
                    backend=backend,
                    fingerprint=(slot.fingerprint if slot is not None else "")
                    or (metadata.tokenizer_fingerprint if metadata is not None else ""),
                    source=metadata.source if metadata is not None else "",
                    created=metadata.created if metadata is not None else None,
                    accuracy=metadata.accuracy if metadata is not None else None,
                    in_flight=slot.in_flight if slot is not None else 0,
                )
            )
        return ModelStatus(
            name=entry.name,
            task=task,
            policy=listing.policy if listing is not None and not entry.error else None,
            versions=tuple(out),
            aliases=dict(listing.aliases) if listing is not None else {},
            default_version=entry.default or "",
            reason=entry.error or (listing.aliases_error if listing is not None else "its folder is gone"),
        )
