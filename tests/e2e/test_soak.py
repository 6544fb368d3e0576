"""A bounded soak: `tandem serve` (four processes) under a moderate mixed load for a few minutes — embeddings,
classification, rerank, tokenization, streamed generation, and callers sending names that break the rule or name
nothing — then every process's resident memory compared between the end of the warm-up and the end of the run.

Off by default (it takes minutes): `TANDEM_SOAK_S=180 python -m pytest -m soak -s tests/e2e/test_soak.py`. It prints
each process's memory curve and the answers by code, and fails on memory growth of 5% or more after warm-up or on
any answer other than the expected ones.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pytest

from tandem.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tests.e2e.deployment import tandem_serve
from tests.fixtures import tiny_causal, tiny_models

SOAK_S = float(os.environ.get("TANDEM_SOAK_S", "0"))
WARMUP_S = min(60.0, SOAK_S / 3)
SAMPLE_S = 5.0

pytestmark = [
    pytest.mark.soak,
    pytest.mark.timeout(int(SOAK_S + 600)),
    pytest.mark.skipif(SOAK_S <= 0, reason="a soak of minutes: set TANDEM_SOAK_S (seconds) to run it"),
]


def _children(pid: int) -> list[int]:
    """Every descendant of `pid`, from each process's parent in /proc/*/stat (Linux)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # gone meanwhile
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: list[int] = []
    todo = [pid]
    while todo:
        current = todo.pop()
        kids = [child for child, parent in parents.items() if parent == current]
        found += kids
        todo += kids
    return found


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _role(pid: int) -> str:
    command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    for part in command:
        for role in (b"gateway", b"tokenizer", b"inference", b"postprocess"):
            if part.endswith(role) or part == role or part.startswith(role + b"."):
                return role.decode()
    return " ".join(p.decode() for p in command[:4])


def _call(
    stub: gateway_pb2_grpc.GatewayServiceAsyncStub, i: int, worker: int, batch: list[str], texts: list[str]
) -> Any:
    """The i-th call of a worker: the encoder APIs in turn, and callers who send made-up names (a new one every
    time: they must leave nothing behind) or names that break the rule."""
    kind = i % 6
    if kind == 0:
        return stub.Embed(gateway_pb2.EmbedRequest(model="tiny-embed", inputs=batch))
    if kind == 1:
        return stub.Classify(gateway_pb2.ClassifyRequest(model="tiny-sentiment", inputs=batch))
    if kind == 2:
        return stub.Rerank(gateway_pb2.RerankRequest(model="tiny-rerank", query=texts[i % 64], documents=batch))
    if kind == 3:
        return stub.Tokenize(gateway_pb2.TokenizeRequest(model="tiny-embed", inputs=batch))
    if kind == 4:
        return stub.GetModel(gateway_pb2.GetModelRequest(model=f"made-up-{worker}-{i}"))
    return stub.Embed(gateway_pb2.EmbedRequest(model=f"bad/{i}\n", inputs=["x"]))


async def _load(address: str, until: float, codes: Counter[str]) -> None:
    texts = tiny_models.embedding_texts(seed=21, n=64)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)

        async def caller(worker: int) -> None:
            i = worker
            while time.monotonic() < until:
                i += 1
                batch = texts[i % 60 : i % 60 + 1 + i % 4]
                try:
                    await _call(stub, i, worker, batch, texts)
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as err:
                    codes[err.code().name] += 1

        async def generator() -> None:
            i = 0
            while time.monotonic() < until:
                i += 1
                prompt = tiny_causal.cycle_text(i % 20, 6)
                request = gateway_pb2.GenerateRequest(model="tiny-llama-chat", prompt=prompt)
                request.params.max_new_tokens = 24
                try:
                    async for _ in stub.Generate(request):
                        pass
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as err:
                    codes[err.code().name] += 1

        await asyncio.gather(*(caller(w) for w in range(4)), generator())


async def test_memory_is_flat_under_a_mixed_load(
    served_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    repository = tmp_path_factory.mktemp("soak-repository")
    for name in ("tiny-embed", "tiny-sentiment", "tiny-rerank"):
        shutil.copytree(served_repository / name, repository / name)
    tiny_causal.make_llama_chat(repository)
    with tandem_serve(tmp_path_factory.mktemp("home"), repository=repository) as (address, proc):
        pids = {pid: _role(pid) for pid in [proc.pid, *_children(proc.pid)]}
        samples: dict[int, list[tuple[float, float]]] = {pid: [] for pid in pids}
        codes: Counter[str] = Counter()
        started = time.monotonic()
        load = asyncio.ensure_future(_load(address, started + SOAK_S, codes))
        while not load.done():
            elapsed = time.monotonic() - started
            for pid in pids:
                samples[pid].append((elapsed, _rss_mb(pid)))
            await asyncio.wait((load,), timeout=SAMPLE_S)
        await load
        for pid in pids:
            samples[pid].append((time.monotonic() - started, _rss_mb(pid)))
        assert proc.poll() is None, "tandem serve exited during the soak"

    print(f"\nsoak: {SOAK_S:.0f} s, warm-up {WARMUP_S:.0f} s; answers by code: {dict(codes)}")
    growth: dict[str, float] = {}
    for pid, curve in samples.items():
        after_warmup = [rss for t, rss in curve if WARMUP_S <= t < WARMUP_S + 3 * SAMPLE_S]
        at_end = [rss for _, rss in curve[-3:]]
        start, end = statistics.median(after_warmup), statistics.median(at_end)
        growth[f"{pids[pid]} ({pid})"] = end / start - 1
        shown = " ".join(f"{rss:.0f}" for _, rss in curve[:: max(1, len(curve) // 12)])
        print(
            f"  {pids[pid]:>12} pid {pid}: {start:.1f} MB after warm-up -> {end:.1f} MB ({end / start - 1:+.2%}); {shown}"
        )
    # Rule-breaking names are INVALID_ARGUMENT, made-up ones NOT_FOUND; nothing else may fail.
    assert set(codes) <= {"OK", "NOT_FOUND", "INVALID_ARGUMENT"}, codes
    assert codes["OK"] > 0
    assert all(g < 0.05 for g in growth.values()), growth
