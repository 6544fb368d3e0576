"""Cumulative inference statistics per model version, as the Open Inference Protocol's ModelStatistics reports them.

Recorded by the protocol layer around each pipeline call, so they count what callers of this protocol asked for;
the native API's calls are not included. One pipeline run counts as one execution: the inference stage's own
batching into model calls is not visible from the gateway.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Duration:
    """How often something happened and how long it took in all."""

    count: int = 0
    ns: int = 0

    def plus(self, ns: int) -> Duration:
        return Duration(self.count + 1, self.ns + ns)


@dataclass(frozen=True)
class VersionStatistics:
    """The counters of one model version."""

    name: str
    version: str
    # Wall-clock time of the last request, in milliseconds since the epoch; 0 before the first.
    last_inference_ms: int = 0
    # Items (texts, or documents for rerank) of successful requests.
    inference_count: int = 0
    # Successful pipeline runs.
    execution_count: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)


class InferenceStatistics:
    """Counters for every model version that served (or failed) a request; the event loop is the only writer."""

    def __init__(self, wall_clock_ns: Callable[[], int]) -> None:
        self._wall_clock_ns = wall_clock_ns
        self._versions: dict[tuple[str, str], VersionStatistics] = {}

    def now_ms(self) -> int:
        return self._wall_clock_ns() // 1_000_000

    def record_success(self, name: str, version: str, items: int, duration_ns: int, started_ms: int) -> None:
        stats = self.get(name, version)
        self._versions[(name, version)] = replace(
            stats,
            last_inference_ms=max(stats.last_inference_ms, started_ms),
            inference_count=stats.inference_count + items,
            execution_count=stats.execution_count + 1,
            success=stats.success.plus(duration_ns),
        )

    def record_failure(self, name: str, version: str, duration_ns: int, started_ms: int) -> None:
        stats = self.get(name, version)
        self._versions[(name, version)] = replace(
            stats, last_inference_ms=max(stats.last_inference_ms, started_ms), fail=stats.fail.plus(duration_ns)
        )

    def get(self, name: str, version: str) -> VersionStatistics:
        """The counters of one version; zeros for a version that has seen no request."""
        return self._versions.get((name, version)) or VersionStatistics(name, version)

    def recorded(self) -> list[tuple[str, str]]:
        """Every (model, version) with counters."""
        return sorted(self._versions)
