"""The load: closed-loop callers on a running gateway, one grid cell at a time (Cell, run_cell), and a quiet probe
client in its own process beside them (Probe)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from tandem.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tandem.sdk.status import code_of, decode_rpc_error

APIS = ("embed", "stream", "oip")


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


@dataclass
class Cell:
    concurrency: int
    texts_per_request: int
    api: str = "embed"
    model: str = ""
    # The label of the deployment measured (bench --target LABEL=ADDRESS,...); the address when unlabelled.
    target: str = ""
    requests: int = 0
    texts: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    failure_latencies_ms: list[float] = field(default_factory=list, repr=False)
    codes: Counter[str] = field(default_factory=Counter)
    late: int = 0

    def summary(self, ceiling: float, beside: Sequence[float] = ()) -> dict[str, Any]:
        """The cell's figures; `ceiling` is the run's bare ceiling, `beside` the bare model's speed measured right
        before and right after this cell (the higher one counts, so a slow moment never flatters the ratio)."""
        rate = self.texts / self.seconds if self.seconds else 0.0
        near = max(beside, default=0.0)
        return {
            "api": self.api,
            "model": self.model,
            "target": self.target,
            "concurrency": self.concurrency,
            "texts_per_request": self.texts_per_request,
            "requests": self.requests,
            "texts_per_s": rate,
            "ratio_to_bare": rate / ceiling if ceiling else float("nan"),
            "bare_beside_texts_per_s": near if near else float("nan"),
            "ratio_to_bare_beside": rate / near if near else float("nan"),
            "p50_ms": percentile(self.latencies_ms, 50),
            "p90_ms": percentile(self.latencies_ms, 90),
            "p99_ms": percentile(self.latencies_ms, 99),
            "codes": dict(self.codes),
            "failed_p50_ms": percentile(self.failure_latencies_ms, 50),
            "failed_p90_ms": percentile(self.failure_latencies_ms, 90),
            "failed_p99_ms": percentile(self.failure_latencies_ms, 99),
            "failed_max_ms": max(self.failure_latencies_ms, default=float("nan")),
            "late_successes": self.late,
        }


def _code_name(number: int) -> str:
    code = code_of(number)
    return code.name if code.value[0] == number else str(number)  # a number gRPC does not define: as it came


def _oip_request(model: str, batch: Sequence[str]) -> Any:
    """ModelInfer with the texts as one BYTES input in raw_input_contents, as Triton clients send it."""
    from gateway.oip.converters import encode_bytes_tensor
    from tandem.oip.v2 import grpc_service_pb2

    name, _, version = model.partition(":")
    raw = encode_bytes_tensor([t.encode() for t in batch])
    return grpc_service_pb2.ModelInferRequest(
        model_name=name,
        model_version=version,
        inputs=[grpc_service_pb2.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=[len(batch)])],
        raw_input_contents=[raw],
    )


async def run_cell(
    target: str,
    model: str,
    texts: Sequence[str],
    cell: Cell,
    requests: int,
    deadline_s: float,
    progress: Any,
    credentials: grpc.ChannelCredentials | None = None,
    server_name: str | None = None,
    api_key: str | None = None,
    honor_retry_info: bool = True,
) -> None:
    """`concurrency` requests in flight, each caller sending its next one as soon as the last returns (or, after a
    refusal carrying RetryInfo, once the delay it asks for has passed, unless `honor_retry_info` is off).

    `embed` and `oip` use one unary call per request (native Embed, Open Inference Protocol ModelInfer); `stream`
    sends every request over one EmbedStream, keeping `concurrency` of them in flight.
    """
    options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    channel = (
        grpc.aio.insecure_channel(target, options=options)
        if credentials is None
        else grpc.aio.secure_channel(target, credentials, options=options)
    )
    async with channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        counter = iter(range(requests))
        warm = gateway_pb2.EmbedRequest(model=model, inputs=list(texts[: cell.texts_per_request]))
        metadata = (("x-api-key", api_key),) if api_key else None
        await stub.Embed(warm, timeout=60, metadata=metadata)
        if cell.api == "oip":
            from tandem.oip.v2 import grpc_service_pb2_grpc

            oip = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            await oip.ModelInfer(_oip_request(model, texts[: cell.texts_per_request]), timeout=60, metadata=metadata)

        def record(start: float, batch_len: int, code: str) -> None:
            elapsed = time.perf_counter() - start
            if code != "OK":
                cell.failure_latencies_ms.append(elapsed * 1000)
                cell.codes[code] += 1
            else:
                cell.latencies_ms.append(elapsed * 1000)
                cell.late += elapsed > deadline_s
                cell.codes["OK"] += 1
                cell.texts += batch_len
                cell.requests += 1
            progress.update(1)

        async def caller(worker: int) -> None:
            cursor = worker * 7919
            for _ in counter:
                batch = [texts[(cursor + j) % len(texts)] for j in range(cell.texts_per_request)]
                cursor += cell.texts_per_request
                start = time.perf_counter()
                try:
                    if cell.api == "oip":
                        await oip.ModelInfer(_oip_request(model, batch), timeout=deadline_s, metadata=metadata)
                    else:
                        request = gateway_pb2.EmbedRequest(model=model, inputs=batch)
                        await stub.Embed(request, timeout=deadline_s, metadata=metadata)
                except grpc.aio.AioRpcError as exc:
                    record(start, len(batch), exc.code().name)
                    delay = decode_rpc_error(exc).retry_delay_s if honor_retry_info else None
                    if delay:  # a well-behaved client waits as long as the server asked before its next call
                        await asyncio.sleep(delay)
                    continue
                record(start, len(batch), "OK")

        async def one_stream() -> None:
            slots = asyncio.Semaphore(cell.concurrency)
            sent: dict[str, tuple[float, int]] = {}

            async def produce() -> Any:
                cursor = 0
                for i in counter:
                    await slots.acquire()
                    batch = [texts[(cursor + j) % len(texts)] for j in range(cell.texts_per_request)]
                    cursor += cell.texts_per_request
                    sent[str(i)] = (time.perf_counter(), len(batch))
                    yield gateway_pb2.EmbedStreamRequest(
                        id=str(i), request=gateway_pb2.EmbedRequest(model=model, inputs=batch)
                    )

            call = stub.EmbedStream(produce(), timeout=max(deadline_s, 600.0), metadata=metadata)
            async for reply in call:
                start, batch_len = sent.pop(reply.id)
                record(start, batch_len, _code_name(reply.error.code) if reply.HasField("error") else "OK")
                slots.release()

        t0 = time.perf_counter()
        if cell.api == "stream":
            await one_stream()
        else:
            await asyncio.gather(*(caller(w) for w in range(cell.concurrency)))
        cell.seconds = time.perf_counter() - t0


@dataclass(frozen=True)
class ProbeSettings:
    """What the probe process needs to reach the gateway (plain values: it is started with spawn)."""

    target: str
    model: str
    text: str
    interval_s: float
    deadline_s: float
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_server_name: str | None = None
    api_key: str | None = None


def _probe(settings: ProbeSettings, stop: Any, results: Any) -> None:
    """In its own process, so its clock is not the loaded caller loop's: one call every `interval_s`, each timed
    from send to answer. Sends back [(code name, milliseconds)]."""
    options: list[tuple[str, Any]] = []
    if settings.tls_server_name:
        options.append(("grpc.ssl_target_name_override", settings.tls_server_name))
    if settings.tls_ca is not None or settings.tls_cert is not None:
        from tandem.sdk import tls_credentials

        credentials = tls_credentials(settings.tls_ca, settings.tls_cert, settings.tls_key)
        channel = grpc.secure_channel(settings.target, credentials, options=options)
    else:
        channel = grpc.insecure_channel(settings.target, options=options)
    stub = gateway_pb2_grpc.GatewayServiceStub(channel)
    request = gateway_pb2.EmbedRequest(model=settings.model, inputs=[settings.text])
    metadata = (("x-api-key", settings.api_key),) if settings.api_key else None
    seen: list[tuple[str, float]] = []
    while not stop.wait(settings.interval_s):
        start = time.perf_counter()
        try:
            stub.Embed(request, timeout=settings.deadline_s, metadata=metadata)
            code = "OK"
        except grpc.RpcError as exc:
            code = exc.code().name
        seen.append((code, (time.perf_counter() - start) * 1000))
    channel.close()
    results.put(seen)


class Probe:
    """A quiet client beside the load: its calls show what a caller that is not itself overloaded sees."""

    def __init__(self, settings: ProbeSettings) -> None:
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # grpc must not be forked from a process that used it
        self._stop = context.Event()
        self._results = context.Queue()
        self._process = context.Process(target=_probe, args=(settings, self._stop, self._results), daemon=True)

    def __enter__(self) -> Probe:
        self._process.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()

    def summary(self) -> dict[str, Any]:
        seen: list[tuple[str, float]] = self._results.get(timeout=60)
        self._process.join(10)
        refused = [ms for code, ms in seen if code == "RESOURCE_EXHAUSTED"]
        answered = [ms for code, ms in seen if code == "OK"]
        return {
            "calls": len(seen),
            "codes": dict(Counter(code for code, _ in seen)),
            "refused_p50_ms": percentile(refused, 50),
            "refused_p99_ms": percentile(refused, 99),
            "refused_max_ms": max(refused, default=float("nan")),
            "ok_p50_ms": percentile(answered, 50),
        }
