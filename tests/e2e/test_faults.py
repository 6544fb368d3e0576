"""Fault tests on one host: replicas killed, hung and restarted under load; a whole stage down and back.

Everything runs on loopback, with bounded load (a few callers for a few seconds) and a bounded run time.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tandem.cli.supervisor import Supervisor
from tandem.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tests.fixtures import tiny_models
from tests.status import details_of

pytestmark = pytest.mark.e2e

MODEL = "tiny-embed"
TEXTS = tiny_models.embedding_texts(seed=99, n=40)


def _deployment(
    served_repository: Path, tmp_path_factory: pytest.TempPathFactory, replicas: int
) -> Iterator[Supervisor]:
    repository = tmp_path_factory.mktemp("fault-repo")
    shutil.copytree(served_repository / MODEL, repository / MODEL)
    supervisor = Supervisor(
        port=0,
        repository=repository,
        home=tmp_path_factory.mktemp("fault-home"),
        log_level="WARNING",
        startup_timeout_s=240,
        replicas=dict.fromkeys(("tokenizer", "inference", "postprocess"), replicas),
        extra={role: ["--grace-s", "5"] for role in ("tokenizer", "inference", "postprocess", "gateway")},
    )
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        supervisor.start()
        yield supervisor
    finally:
        supervisor.stop(grace_s=10)


@pytest.fixture(scope="module")
def deployment(served_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Supervisor]:
    """Two replicas of every stage behind one gateway, serving a copy of the tiny embedding model."""
    yield from _deployment(served_repository, tmp_path_factory, 2)


@pytest.fixture
def single_deployment(served_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Supervisor]:
    """One replica of every stage: taking one down takes the whole stage down."""
    yield from _deployment(served_repository, tmp_path_factory, 1)


def gateway_address(supervisor: Supervisor) -> str:
    address = supervisor.members["gateway-0"].address
    assert address is not None
    return address


@pytest.fixture(scope="module")
def expected(deployment: Supervisor) -> dict[str, npt.NDArray[np.float32]]:
    with grpc.insecure_channel(gateway_address(deployment)) as channel:
        reply = gateway_pb2_grpc.GatewayServiceStub(channel).Embed(
            gateway_pb2.EmbedRequest(model=MODEL, inputs=TEXTS), timeout=30
        )
    return {t: np.array(e.values, dtype=np.float32) for t, e in zip(TEXTS, reply.embeddings, strict=True)}


@dataclass
class LoadReport:
    ok: int = 0
    wrong: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    max_latency_s: float = 0.0


def run_load(
    address: str,
    expected: dict[str, npt.NDArray[np.float32]],
    seconds: float,
    during: Callable[[], None],
    at_s: float,
    callers: int = 6,
    deadline_s: float = 10.0,
) -> LoadReport:
    """Closed-loop callers for `seconds`; `during` runs once, `at_s` seconds in, in a thread."""
    report = LoadReport()

    async def main() -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            end = time.monotonic() + seconds

            async def caller(seed: int) -> None:
                rng = np.random.default_rng(seed)
                while time.monotonic() < end:
                    batch = [TEXTS[i] for i in rng.choice(len(TEXTS), size=int(rng.integers(1, 4)), replace=False)]
                    start = time.monotonic()
                    try:
                        reply = await stub.Embed(
                            gateway_pb2.EmbedRequest(model=MODEL, inputs=batch), timeout=deadline_s
                        )
                    except grpc.aio.AioRpcError as exc:
                        report.failures[f"{exc.code().name}: {exc.details()}"] += 1
                        continue
                    report.max_latency_s = max(report.max_latency_s, time.monotonic() - start)
                    for text, embedding in zip(batch, reply.embeddings, strict=True):
                        if float(np.dot(expected[text], np.array(embedding.values))) < 0.9999:
                            report.wrong += 1
                    report.ok += 1

            async def inject() -> None:
                await asyncio.sleep(at_s)
                await asyncio.to_thread(during)

            await asyncio.gather(inject(), *(caller(i) for i in range(callers)))

    asyncio.run(main())
    return report


def wait_serving(address: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                if (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"{address} not SERVING")


def kill(supervisor: Supervisor, name: str, sig: signal.Signals = signal.SIGKILL) -> None:
    process = supervisor.members[name].process
    assert process is not None
    process.send_signal(sig)
    if sig == signal.SIGKILL:
        process.wait(10)


def bring_back(supervisor: Supervisor, name: str) -> None:
    supervisor.restart(name)
    address = supervisor.members[name].address
    assert address is not None
    wait_serving(address)


def assert_clean(report: LoadReport) -> None:
    assert report.ok > 20, report
    assert not report.failures, report.failures
    assert report.wrong == 0


@pytest.mark.parametrize("victim", ["inference-1", "tokenizer-0", "postprocess-1"])
def test_a_replica_killed_mid_load_fails_no_request(
    deployment: Supervisor, expected: dict[str, npt.NDArray[np.float32]], victim: str
) -> None:
    report = run_load(gateway_address(deployment), expected, 6.0, lambda: kill(deployment, victim), at_s=2.0)
    print(f"SIGKILL {victim}: {report.ok} requests ok, failures {dict(report.failures)}, wrong {report.wrong}")
    assert_clean(report)
    bring_back(deployment, victim)


@pytest.mark.parametrize("victim", ["inference-0", "tokenizer-1"])
def test_a_hung_replica_is_routed_around_within_the_deadline(
    deployment: Supervisor, expected: dict[str, npt.NDArray[np.float32]], victim: str
) -> None:
    """SIGSTOP, not SIGKILL: the replica's sockets stay open. Hedges and keepalive pings with a short ack timeout
    (grpc.http2.ping_timeout_ms) move its calls to the other replica well within their deadline."""
    try:
        report = run_load(
            gateway_address(deployment), expected, 10.0, lambda: kill(deployment, victim, signal.SIGSTOP), at_s=2.0
        )
    finally:
        process = deployment.members[victim].process
        assert process is not None
        process.send_signal(signal.SIGCONT)
    print(
        f"SIGSTOP {victim}: {report.ok} ok, failures {dict(report.failures)}, max latency {report.max_latency_s:.2f}s"
    )
    assert_clean(report)
    assert report.max_latency_s < 10.0
    address = deployment.members[victim].address
    assert address is not None
    wait_serving(address)


def test_rolling_restart_of_every_replica_fails_no_request(
    deployment: Supervisor, expected: dict[str, npt.NDArray[np.float32]]
) -> None:
    names = [n for n in deployment.members if not n.startswith("gateway")]

    def roll() -> None:
        for name in names:
            deployment.terminate(name)
            bring_back(deployment, name)
            # Like Kubernetes' minReadySeconds: give callers' channels time to reconnect to the new replica (their
            # reconnect backoff is at most 1 s) before its twin goes down, or a stage would briefly have no backend.
            time.sleep(2.0)

    done = threading.Event()

    def roll_then_mark() -> None:
        roll()
        done.set()

    report = run_load(gateway_address(deployment), expected, 60.0, roll_then_mark, at_s=1.0)
    print(f"rolling restart of {len(names)} replicas: {report.ok} ok, failures {dict(report.failures)}")
    assert done.is_set(), "the rolling restart did not finish within the load window"
    assert_clean(report)


def test_a_stage_entirely_down_fails_fast_and_recovers(single_deployment: Supervisor) -> None:
    deployment = single_deployment
    address = gateway_address(deployment)
    victims = ["tokenizer-0"]
    for name in victims:
        kill(deployment, name)
    with grpc.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            stub.Embed(gateway_pb2.EmbedRequest(model=MODEL, inputs=["good"]), timeout=20)
        elapsed = time.monotonic() - start
        d = details_of(caught.value)
        print(f"tokenizer stage down: {d.code.name} after {elapsed * 1000:.0f} ms: {d.message}")
        assert d.code == grpc.StatusCode.UNAVAILABLE and d.reason == "STAGE_UNAVAILABLE"
        assert elapsed < 3.0
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(100):
            if (
                health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                == health_pb2.HealthCheckResponse.NOT_SERVING
            ):
                break
            time.sleep(0.1)
        assert (
            health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            == health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in victims:
            bring_back(deployment, name)
        wait_serving(address)
        reply = stub.Embed(gateway_pb2.EmbedRequest(model=MODEL, inputs=["good"]), timeout=20)
        assert len(reply.embeddings) == 1
