"""Version switches under load: concurrent gateway calls while a new version appears and takes over, an alias
moves, and versions unload. Every call must succeed, answered by exactly one version with that version's output."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest

from tandem.management.v1 import management_pb2
from tests.fixtures import reference, tiny_models
from tests.harness import Stack
from tests.service.test_registry import (
    Sources,
    add_version,
    build_sources,
    embed,
    make_model,
    model_status,
    running_stack,
    states,
    until,
)

M = management_pb2

TEXTS = tiny_models.embedding_texts(seed=33, n=24)
CALLERS = 8


class Load:
    """Callers that embed random slices of TEXTS without pause and check every answer against its version."""

    def __init__(self, stack: Stack, expected: dict[str, np.ndarray]) -> None:
        self.stack = stack
        self.expected = expected
        self.served: Counter[str] = Counter()
        self.failures: list[str] = []
        self.wrong: list[str] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _caller(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self._stop.is_set():
            start = rng.randrange(len(TEXTS))
            picked = list(range(start, min(len(TEXTS), start + rng.randint(1, 4))))
            try:
                reply = await embed(self.stack, "emb", [TEXTS[i] for i in picked])
            except grpc.aio.AioRpcError as err:
                self.failures.append(f"{err.code().name}: {err.details()}")
                continue
            got = np.array([e.values for e in reply.embeddings], dtype=np.float32)
            want = self.expected.get(reply.model_version)
            if want is None or got.shape != (len(picked), want.shape[1]):
                self.wrong.append(f"version {reply.model_version}: shape {got.shape}")
            elif np.sum(got * want[picked], axis=1).min() < 0.9999:
                self.wrong.append(f"version {reply.model_version}: output of another version")
            self.served[reply.model_version] += 1

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._caller(i)) for i in range(CALLERS)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def until_served(self, version: str, calls: int = 20) -> None:
        """Until `calls` more answers came from `version` (so traffic really moved there)."""
        target = self.served[version] + calls
        await until(
            lambda: self.served[version] >= target or self.failures or self.wrong, f"{calls} calls on {version}"
        )


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Sources:
    return build_sources(tmp_path_factory)


async def test_no_call_fails_while_versions_switch(sources: Sources, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    model_dir = make_model(repo, "emb", {1: sources.v1})
    expected = {
        "1": reference.reference_embeddings(sources.v1, TEXTS),
        "2": reference.reference_embeddings(sources.v2, TEXTS),
    }
    assert np.sum(expected["1"] * expected["2"], axis=1).max() < 0.99, "the versions must answer differently"
    # The watcher finds new versions; a version leaving service unloads after 0.5 s without calls; the gateway
    # pins versions for 0.2 s.
    async with running_stack(repo, tmp_path / "home", watch_s=0.1, unload_idle_s=0.5) as stack:
        load = Load(stack, expected)
        load.start()
        try:
            await load.until_served("1")

            # 1. Version 2 appears: the watcher loads and warms it, the latest policy moves every call to it at
            #    once, and version 1 unloads once the calls pinned to it have drained.
            add_version(model_dir, sources.v2, 2)
            await load.until_served("2")

            async def v1_unloaded() -> bool:
                return states(await model_status(stack, "emb"))["1"][0] == "VERSION_STATE_UNLOADED"

            await until(v1_unloaded, "version 1 to unload")
            await load.until_served("2")

            # 2. The stable alias moves back to version 1: loaded and warmed first, then every call moves.
            reply = await stack.management.SetAlias(M.SetAliasRequest(name="emb", alias="stable", version="1"))
            assert reply.model.default_version == "1"
            await load.until_served("1")

            # 3. Version 2 is unloaded on request while calls keep coming.
            unloaded = await stack.management.UnloadModel(M.UnloadModelRequest(name="emb", version="2", wait=True))
            assert states(unloaded.model)["2"][0] == "VERSION_STATE_UNLOADED"
            await load.until_served("1")

            # 4. The alias moves to version 2, which loads again first.
            await stack.management.LoadModel(M.LoadModelRequest(name="emb", version="2"))
            reply = await stack.management.SetAlias(M.SetAliasRequest(name="emb", alias="stable", version="2"))
            assert reply.model.default_version == "2"
            await load.until_served("2")
        finally:
            await load.stop()
    assert load.failures == []
    assert load.wrong == []
    assert load.served["1"] >= 40 and load.served["2"] >= 40
    assert json.loads((model_dir / "aliases.json").read_text()) == {"stable": "2"}
