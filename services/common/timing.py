"""What one RPC spent in each stage, and facts about it (model, inputs, tokens), gathered while it runs.

The server's metrics interceptor opens a `CallRecord` per call in a context variable; code anywhere below it adds
stage durations (`stage`, `add`) and facts (`note`) without being handed the record. The interceptor then sends
the durations back in the `x-tandem-timing` trailer, observes the metrics and writes the access log line. Plain
Python: the cores use it without importing grpc or prometheus.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

TIMING_KEY = "x-tandem-timing"
# Generation streams also end with `x-tandem-generation: tokens=42, tokens_per_s=118.3` (the rate from the first
# token to the last; the time to first token is `first_token` in x-tandem-timing).
GENERATION_KEY = "x-tandem-generation"


@dataclass
class CallRecord:
    """Seconds per stage (summed over repeats) and free-form facts of one call."""

    timings: dict[str, float] = field(default_factory=dict)
    fields: dict[str, object] = field(default_factory=dict)

    def merge(self, other: CallRecord) -> None:
        """Takes another record's stages and facts (a coalesced run's, for each of its callers)."""
        for name, seconds in other.timings.items():
            self.timings[name] = self.timings.get(name, 0.0) + seconds
        for key, value in other.fields.items():
            self.fields.setdefault(key, value)


_current: contextvars.ContextVar[CallRecord | None] = contextvars.ContextVar("tandem_call_record", default=None)


def begin() -> CallRecord:
    """A fresh record for the call (or run) in the current context."""
    record = CallRecord()
    _current.set(record)
    return record


def current() -> CallRecord | None:
    return _current.get()


def add(name: str, seconds: float) -> None:
    record = _current.get()
    if record is not None:
        record.timings[name] = record.timings.get(name, 0.0) + seconds


def note(**facts: object) -> None:
    record = _current.get()
    if record is not None:
        record.fields.update(facts)


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Adds the wall time of the block to `name`, whether it succeeds or fails."""
    started = time.perf_counter()
    try:
        yield
    finally:
        add(name, time.perf_counter() - started)


@contextlib.contextmanager
def detached() -> Iterator[None]:
    """No record inside the block: code that would add to its own call's record (a stage's servicer answering the
    gateway in its process) leaves the caller's alone."""
    token = _current.set(None)
    try:
        yield
    finally:
        _current.reset(token)


# Pipeline order; other stages follow in the order they were recorded, and the total comes last.
ORDER = ("tokenize", "first_token", "infer", "queue", "compute", "postprocess")
_RANK = {**{name: i for i, name in enumerate(ORDER)}, "total": len(ORDER) + 1}


def _rank(item: tuple[str, float]) -> int:
    return _RANK.get(item[0], len(ORDER))


def format_timings(timings: Mapping[str, float]) -> str:
    """`tokenize=0.41ms, infer=4.10ms, queue=0.80ms, ...`: milliseconds, stages in pipeline order, total last."""
    ordered = sorted(timings.items(), key=_rank)
    return ", ".join(f"{name}={seconds * 1000:.2f}ms" for name, seconds in ordered)


def parse_timings(text: str) -> dict[str, float]:
    """The inverse of `format_timings`, in seconds; malformed parts are skipped."""
    out: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep or not value.endswith("ms"):
            continue
        try:
            out[name] = float(value[:-2]) / 1000
        except ValueError:
            continue
    return out


def format_generation(fields: Mapping[str, object]) -> str:
    """`tokens=42, tokens_per_s=118.3` from a generation call's facts (tokens_per_s only when 2+ tokens came)."""
    parts = [f"tokens={fields.get('generated_tokens', 0)}"]
    if "tokens_per_s" in fields:
        parts.append(f"tokens_per_s={fields['tokens_per_s']}")
    return ", ".join(parts)
