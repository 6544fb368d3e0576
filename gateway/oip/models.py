"""The Open Inference Protocol's model repository extension over the model registry: load, unload, index.

The registry is the inference stage's ManagementService (gateway.management.client.ManagementClient), as
gateway/__main__.py wires it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway.oip.signatures import model_reference
from services.common import errors

READY, UNAVAILABLE = "READY", "UNAVAILABLE"


@dataclass(frozen=True)
class IndexEntry:
    """A version of a model of the repository, with its state in the protocol's words."""

    name: str
    version: str
    state: str
    reason: str


class ModelRegistry(Protocol):
    """The registry operations the protocol needs (gateway.management.client.ManagementClient has them)."""

    async def versions(self, deadline: float) -> Sequence[RegistryVersionLike]: ...

    async def load(self, name: str, deadline: float) -> None: ...

    async def unload(self, name: str, deadline: float) -> None: ...


class RegistryVersionLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def reason(self) -> str: ...


# The registry's states in the protocol's words (Triton's: READY, UNAVAILABLE, LOADING, UNLOADING).
_INDEX_STATE = {"READY": READY, "LOADING": "LOADING", "UNLOADING": "UNLOADING"}


class RegistryModels:
    """Load and unload through the model registry: the inference stage's ManagementService.

    A load brings back what the model's version policy wants and answers once it is ready (a failed load is the
    registry's error, e.g. FAILED_PRECONDITION with the reason); an unload takes every version out of service after
    its in-flight requests, and the model stays unloaded until loaded again. The repository index lists every
    version with its registry state.
    """

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    async def load(self, name: str, parameters: Mapping[str, object], deadline: float) -> None:
        model_reference(name, "", "model_name", "")
        if parameters:
            raise errors.unimplemented(
                f"loading with parameters ({', '.join(sorted(parameters))}) is not supported: models load from the "
                "model repository as they are (add a version with `tandem models add`)"
            )
        await self.registry.load(name, deadline)

    async def unload(self, name: str, parameters: Mapping[str, object], deadline: float) -> None:
        model_reference(name, "", "model_name", "")
        # Tandem models have no dependents (no ensembles), so Triton's unload_dependents changes nothing.
        extra = sorted(set(parameters) - {"unload_dependents"})
        if extra:
            raise errors.unimplemented(f"unloading with parameters ({', '.join(extra)}) is not supported")
        await self.registry.unload(name, deadline)

    async def index(self, ready_only: bool, deadline: float) -> list[IndexEntry]:
        entries = [
            IndexEntry(v.name, v.version, _INDEX_STATE.get(v.state, UNAVAILABLE), v.reason or v.state.lower())
            if v.state != "READY"
            else IndexEntry(v.name, v.version, READY, "")
            for v in await self.registry.versions(deadline)
        ]
        return [e for e in entries if e.state == READY] if ready_only else entries
