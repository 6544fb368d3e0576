"""The model registry: what the repository holds, which versions the policy and aliases want loaded, where requests
go, and each version's way in and out of memory."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from services.common import errors
from services.common.errors import Reason
from services.common.repository import (
    DEFAULT_ALIAS,
    Listing,
    ModelRepository,
    ModelVersion,
    Task,
    parse_reference,
)
from services.inference.backends.base import BackendOptions, lower_priority
from services.inference.generation.engine import EngineStats
from services.inference.loading import (
    BackendFactory,
    LoadedModel,
    ModelObserver,
    ModelState,
    create_backend,
    load_generation,
    load_version,
    start_batcher,
)

log = logging.getLogger(__name__)


@dataclass
class ModelEntry:
    """What the stage knows of one model folder, and where its requests go.

    `default` and `aliases` only ever name READY versions: a version that an alias or the policy moves to takes
    requests once it is warm, in one step on the event loop, and the one it replaces unloads after it falls idle.
    """

    name: str
    listing: Listing | None = None
    # Why the model as a whole cannot be served (tandem.json unreadable); what is loaded keeps serving.
    error: str = ""
    models: dict[str, ModelVersion] = field(default_factory=dict)
    # Versions whose folder cannot be read (no config.json, invalid metadata.json), and why.
    broken: dict[str, str] = field(default_factory=dict)
    default: str | None = None
    aliases: dict[str, str] = field(default_factory=dict)
    # Versions loaded by LoadModel beyond the policy, and versions unloaded by UnloadModel (both until undone).
    requested: set[str] = field(default_factory=set)
    held: set[str] = field(default_factory=set)
    held_all: bool = False
    # Versions being loaded for a SetAlias that has not written the alias yet.
    pending: Counter[str] = field(default_factory=Counter)
    scanned_at: float = 0.0


@dataclass(frozen=True)
class _Scan:
    """One model folder read in a worker thread, applied on the event loop."""

    name: str
    started: float
    listing: Listing | None
    error: str
    models: dict[str, ModelVersion]
    broken: dict[str, str]


class ModelRegistry:
    """Every model of the repository and its versions in memory: reads the model folders (and watches them), loads
    the versions each model's policy, aliases and LoadModel calls want, routes each reference to a ready version,
    and unloads versions that nothing wants once they fall idle."""

    def __init__(
        self,
        repository: ModelRepository,
        options: BackendOptions,
        *,
        backend_factory: BackendFactory = create_backend,
        compute_nice: int = 0,
        watch_s: float | None = 1.0,
        unload_idle_s: float = 3.0,
        unload_timeout_s: float = 60.0,
        observers: Callable[[str], ModelObserver] | None = None,
    ) -> None:
        self.repository = repository
        self.options = options
        # One observer per model name (a metrics label), shared by its versions' batchers.
        self.observers = observers
        self.backend_factory = backend_factory
        self.compute_nice = compute_nice
        self.watch_s = watch_s
        # A version leaving service keeps answering until no request has reached it for this long: the gateway
        # pins versions for up to a second (its model cache) before its calls arrive here.
        self.unload_idle_s = unload_idle_s
        self.unload_timeout_s = unload_timeout_s
        # Every version in memory or on its way in or out, by (name, version); and every model folder read so far.
        self.slots: dict[tuple[str, str], LoadedModel] = {}
        self.entries: dict[str, ModelEntry] = {}
        self._refresh_lock = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None
        # Exports and loads are CPU-heavy: one at a time, away from the event loop and the model workers.
        # The loader's niceness passes to the thread pools ONNX Runtime starts in it (threads inherit it).
        self._loader = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="tandem-load", initializer=lower_priority, initargs=(compute_nice,)
        )

    # ------------------------------------------------------------------------------------------------------------------
    # Reading the repository

    async def start(self) -> None:
        """Loads and warms up what every model's policy wants (by default its newest version); a version that fails
        is marked failed, and with a `latest` policy the next older one loads instead. Then watches the folder."""
        await self.refresh()
        while loading := [s.task for s in self.slots.values() if s.state is ModelState.LOADING and s.task]:
            await asyncio.gather(*loading)
        if self.watch_s and self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch(self.watch_s), name="model-watch")

    async def _watch(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                # A version folder copied in place (not renamed in) may still be filling up: new ones are taken
                # only once they have not changed for a second.
                await self.refresh(settle_s=1.0)
            except Exception:
                log.exception("reading the model repository failed")

    async def refresh(self, names: Sequence[str] | None = None, settle_s: float = 0.0) -> list[ModelEntry]:
        """Reads model folders (all, and any new ones, when `names` is None) and loads or unloads what changed."""
        async with self._refresh_lock:
            if names is None:
                found = await asyncio.to_thread(self.repository.names)
                names = sorted(set(found) | set(self.entries))
            known = {name: self._known_versions(name) for name in names}
            scans = await asyncio.to_thread(lambda: [self._scan(n, known[n], settle_s) for n in names])
            return [self._apply(scan) for scan in scans]

    def _known_versions(self, name: str) -> set[str]:
        entry = self.entries.get(name)
        return set(entry.models) | set(entry.broken) if entry is not None else set()

    def _scan(self, name: str, known: set[str] | None = None, settle_s: float = 0.0) -> _Scan:
        """Worker thread: the folder's listing and every version's metadata."""
        started = time.monotonic()
        try:
            listing = self.repository.listing(name)
        except errors.TandemError:
            return _Scan(name, started, None, "", {}, {})
        if settle_s > 0:
            now = time.time()
            fresh = [
                v
                for v in listing.versions
                if v not in (known or ()) and now - (self.repository.root / name / v).stat().st_mtime < settle_s
            ]
            if fresh:
                listing = dataclasses.replace(listing, versions=tuple(v for v in listing.versions if v not in fresh))
        if listing.config_error:
            return _Scan(name, started, listing, listing.config_error, {}, {})
        models: dict[str, ModelVersion] = {}
        broken: dict[str, str] = {}
        for version in listing.versions:
            try:
                models[version] = self.repository.load(name, version)
            except errors.TandemError as exc:
                broken[version] = str(exc)
        return _Scan(name, started, listing, "", models, broken)

    def _apply(self, scan: _Scan) -> ModelEntry:
        entry = self.entries.setdefault(scan.name, ModelEntry(scan.name))
        if scan.started < entry.scanned_at:  # an older read finishing late
            return entry
        entry.scanned_at = scan.started
        for version, reason in scan.broken.items():
            if entry.broken.get(version) != reason:
                log.error("model %s:%s cannot be served: %s", scan.name, version, reason)
        if scan.error and scan.error != entry.error:
            log.error("model %s cannot be served: %s", scan.name, scan.error)
        entry.listing, entry.error, entry.models, entry.broken = scan.listing, scan.error, scan.models, scan.broken
        self.route(entry)
        self.converge(entry)
        if entry.listing is None and not self._holds(entry):
            # Not a model (any more) and nothing of it in memory: forgotten, so that names callers make up are not
            # kept and rescanned every second (the repository's bounded negative cache remembers them briefly).
            del self.entries[scan.name]
            for key in [k for k in self.slots if k[0] == scan.name]:
                del self.slots[key]
            self.repository.unknown.add(scan.name)
        return entry

    def _holds(self, entry: ModelEntry) -> bool:
        """Whether the stage still keeps state of the model: a version in memory, or a LoadModel/UnloadModel."""
        return bool(
            entry.requested
            or entry.held
            or entry.held_all
            or entry.pending
            or any(key[0] == entry.name and slot.state is not ModelState.UNLOADED for key, slot in self.slots.items())
        )

    def _entry(self, name: str) -> ModelEntry:
        """The entry of a model the stage may not have read yet (read now: NOT_FOUND for unknown models)."""
        entry = self.entries.get(name)
        if entry is None or entry.listing is None:
            if entry is None and name in self.repository.unknown:
                raise errors.not_found(f"model {name!r} not found", model=name)
            entry = self._apply(self._scan(name))
            if entry.listing is None:
                raise errors.not_found(f"model {name!r} not found", model=name)
        return entry

    def _knows(self, entry: ModelEntry, version: str) -> bool:
        return version in entry.models or version in entry.broken

    # ------------------------------------------------------------------------------------------------------------------
    # Which versions load, and where requests go (the management API steers these through `wanted`)

    def _ready(self, entry: ModelEntry, version: str | None) -> bool:
        if version is None or version not in entry.models:
            return False
        slot = self.slots.get((entry.name, version))
        return slot is not None and slot.state is ModelState.READY

    def _failed(self, entry: ModelEntry) -> set[str]:
        return {
            version
            for version in entry.models
            if (slot := self.slots.get((entry.name, version))) is not None and slot.state is ModelState.FAILED
        }

    def wanted(self, entry: ModelEntry) -> set[str]:
        """Versions that should be loaded: the policy's, the aliased, and the requested; minus the unloaded."""
        if entry.listing is None or entry.error:
            return set()
        readable = set(entry.models)
        if entry.held_all:
            return (entry.requested | set(entry.pending)) & readable
        versions = [v for v in entry.listing.versions if v in readable]
        wanted = set(entry.listing.policy.select(versions, self._failed(entry)))
        wanted |= set(entry.listing.aliases.values()) | entry.requested
        return (wanted - entry.held | set(entry.pending)) & readable

    def route(self, entry: ModelEntry) -> None:
        """Points aliases and the bare name at READY versions; one that waits for its version keeps the old one."""
        listing = entry.listing
        if listing is None:
            entry.default, entry.aliases = None, {}
            return
        aliases: dict[str, str] = {}
        for alias, version in listing.aliases.items():
            if self._ready(entry, version):
                aliases[alias] = version
            elif self._ready(entry, entry.aliases.get(alias)):
                aliases[alias] = entry.aliases[alias]
        entry.aliases = aliases
        if DEFAULT_ALIAS in listing.aliases:
            target = aliases.get(DEFAULT_ALIAS)
        else:
            versions = [v for v in listing.versions if v in entry.models]
            chosen = listing.policy.select(versions, self._failed(entry))
            target = chosen[-1] if chosen else None
        if self._ready(entry, target):
            entry.default = target
        elif not self._ready(entry, entry.default):
            ready = [v for v in listing.versions if self._ready(entry, v)]
            preferred = [v for v in ready if v in self.wanted(entry)]
            candidates = preferred or ready
            entry.default = candidates[-1] if candidates else None

    def converge(self, entry: ModelEntry) -> None:
        """Starts loading wanted versions; retires loaded ones that nothing wants or routes to any more."""
        if entry.error:
            return
        wanted = self.wanted(entry)
        for version in sorted(wanted, key=int):
            slot = self.slots.get((entry.name, version))
            if slot is None or slot.state is ModelState.UNLOADED:
                self.begin_load(entry.models[version])
            elif slot.state is ModelState.UNLOADING and not slot.refusing:
                self.revive(slot)
        routed = {entry.default, *entry.aliases.values()}
        for (name, version), slot in list(self.slots.items()):
            if name == entry.name and slot.state is ModelState.READY and version not in wanted | routed:
                self.retire(slot, self.why_unloaded(entry, version))

    def why_unloaded(self, entry: ModelEntry, version: str) -> str:
        """Why a version of the model is not loaded, in the words a status or an error shows."""
        if entry.held_all or version in entry.held:
            return "unloaded on request (LoadModel loads it again)"
        if version not in entry.models:
            return "its folder is gone from the repository"
        policy = entry.listing.policy.describe() if entry.listing is not None else "the version policy"
        return f"outside the version policy ({policy}) and named by no alias"

    def begin_load(self, model: ModelVersion) -> LoadedModel:
        """A new LOADING slot for the version, loaded in the loader thread; READY (and routed to) once warm."""
        slot = LoadedModel(model)
        self.slots[(model.name, model.version)] = slot
        slot.task = asyncio.get_running_loop().create_task(self._load(slot), name=f"load-{model.ref}")
        return slot

    async def _load(self, slot: LoadedModel) -> None:
        model = slot.model
        observer = self.observers(model.name) if self.observers is not None else None
        loop = asyncio.get_running_loop()
        try:
            if model.task is Task.TEXT_GENERATION:
                slot.engine, slot.fingerprint = await loop.run_in_executor(
                    self._loader, load_generation, model, self.options, observer
                )
            else:
                backend, fingerprint, call_cost = await loop.run_in_executor(
                    self._loader, load_version, model, self.options, self.backend_factory
                )
                slot.backend, slot.fingerprint = backend, fingerprint
                slot.batcher = start_batcher(model, backend, self.options, call_cost, self.compute_nice, observer)
        except Exception as exc:
            log.exception("model %s failed to load", model.ref)
            slot.state, slot.reason = ModelState.FAILED, f"{type(exc).__name__}: {exc}"
        else:
            slot.state = ModelState.READY
        entry = self.entries.get(model.name)
        if entry is not None:
            self.route(entry)
            self.converge(entry)

    def retire(self, slot: LoadedModel, reason: str) -> None:
        """No longer routed to; unloads once idle for unload_idle_s (at most unload_timeout_s from now)."""
        if slot.state is not ModelState.READY:
            return
        slot.state, slot.reason = ModelState.UNLOADING, reason
        slot.retired_at = time.monotonic()
        slot.drain = asyncio.get_running_loop().create_task(self._drain(slot), name=f"unload-{slot.model.ref}")
        log.info("model %s unloading: %s", slot.model.ref, reason)

    def revive(self, slot: LoadedModel) -> None:
        """Keeps an unloading version loaded after all (wanted again before it was idle)."""
        if slot.drain is not None:
            slot.drain.cancel()
        slot.state, slot.reason, slot.drain = ModelState.READY, "", None
        log.info("model %s stays loaded", slot.model.ref)

    async def _drain(self, slot: LoadedModel) -> None:
        while True:
            now = time.monotonic()
            if not slot.refusing and now - slot.retired_at >= self.unload_timeout_s:
                slot.refusing = True
                log.warning(
                    "model %s still busy after %.0fs: refusing new requests", slot.model.ref, now - slot.retired_at
                )
            idle_for = now - max(slot.last_used, slot.retired_at)
            if slot.in_flight == 0 and (slot.refusing or idle_for >= self.unload_idle_s):
                break
            wait = 0.02 if slot.in_flight or slot.refusing else self.unload_idle_s - idle_for
            await asyncio.sleep(max(0.005, min(wait, slot.retired_at + self.unload_timeout_s - now)))
        # From here no await until the state says UNLOADED, so no request can slip in.
        slot.state, slot.drain = ModelState.UNLOADED, None
        batcher, backend, engine = slot.batcher, slot.backend, slot.engine
        slot.batcher = slot.backend = slot.engine = None
        if engine is not None:
            await asyncio.to_thread(engine.close)
        if batcher is not None:
            await batcher.close()
        elif backend is not None:
            backend.close()
        log.info("model %s unloaded", slot.model.ref)
        entry = self.entries.get(slot.model.name)
        if entry is not None:
            self.converge(entry)

    # ------------------------------------------------------------------------------------------------------------------
    # Where a reference goes

    def select(self, model_ref: str) -> tuple[ModelVersion, LoadedModel | None]:
        """The version a reference names and its slot (None when that version is not loaded and should not be).

        A bare name gets the model's default version, an alias the version it points to now, both only ever READY
        ones once one is; a version the stage has not seen yet is read first and, if wanted, starts loading."""
        parsed = parse_reference(model_ref)
        name = parsed.name or self.repository.default_model
        if not name:
            raise errors.invalid_argument("no model named and this server has no default model", "model")
        entry = self._entry(name)
        if parsed.version is not None:
            _, version = self.repository.target(model_ref)
        else:
            routed = entry.default if parsed.alias is None else entry.aliases.get(parsed.alias)
            if routed is not None and self._ready(entry, routed):
                version = routed
            else:
                _, version = self.repository.target(f"{name}@{parsed.alias}" if parsed.alias else name)
        if not self._knows(entry, version):
            entry = self._apply(self._scan(name))
        model = self.repository.load(name, version)
        slot = self.slots.get((name, version))
        if slot is None or slot.state is ModelState.UNLOADED:
            if version not in self.wanted(entry):
                return model, None
            slot = self.begin_load(model)
        return model, slot

    def loaded(self, model_ref: str) -> LoadedModel:
        """The slot that serves a reference (tests and diagnostics)."""
        model, slot = self.select(model_ref)
        if slot is None:
            raise self.not_loaded(model)
        return slot

    def not_loaded(self, model: ModelVersion) -> errors.TandemError:
        """The error for a request to a version that is not loaded, saying why."""
        entry = self.entries.get(model.name)
        why = self.why_unloaded(entry, model.version) if entry is not None else "not loaded"
        return errors.failed_precondition(
            f"model {model.ref} is not loaded: {why}",
            reason=Reason.MODEL_NOT_LOADED,
            model=model.name,
            version=model.version,
        )

    def gauges(self) -> list[tuple[str, str, str, int, int]]:
        """(model, version, state, sequences pending, sequences admitted at most) of every version in the table, for
        the metrics scrape."""
        return [
            (s.model.name, s.model.version, s.state.value, s.pending, s.capacity) for s in list(self.slots.values())
        ]

    def generation_gauges(self) -> list[tuple[str, str, EngineStats]]:
        """(model, version, engine stats) of every text-generation version in memory, for the metrics scrape."""
        return [
            (s.model.name, s.model.version, s.engine.stats()) for s in list(self.slots.values()) if s.engine is not None
        ]

    async def close(self) -> None:
        """Stops watching, fails what is still queued, frees every backend and the loader thread."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        for slot in self.slots.values():
            for task in (slot.task, slot.drain):
                if task is not None and not task.done():
                    task.cancel()
        for slot in self.slots.values():
            if slot.batcher is not None:
                await slot.batcher.close()
            if slot.engine is not None:
                await asyncio.to_thread(slot.engine.close)
        await asyncio.to_thread(self._loader.shutdown, wait=True, cancel_futures=True)
