"""`tandem bench`: closed-loop load on a running gateway, and the bare model measured in-process in the same run."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

from services.common.settings import usable_cpus
from tandem.gateway.v1 import gateway_pb2, gateway_pb2_grpc

_WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "while",
    "a",
    "small",
    "team",
    "builds",
    "fast",
    "model",
    "servers",
    "for",
    "search",
    "and",
    "ranking",
    "on",
    "cheap",
    "machines",
    "with",
    "careful",
    "engineering",
    "every",
    "request",
    "travels",
    "through",
    "gateway",
    "tokenizer",
    "inference",
    "postprocess",
    "stages",
    "that",
    "scale",
    "independently",
    "across",
    "nodes",
    "in",
    "the",
    "cluster",
    "latency",
    "throughput",
    "memory",
    "cores",
    "threads",
    "batches",
    "queues",
    "deadlines",
    "errors",
    "metrics",
    "traces",
    "health",
    "checks",
    "versions",
    "models",
    "sentences",
    "words",
    "tokens",
    "vectors",
    "embeddings",
    "similarity",
    "music",
    "guitar",
    "weather",
    "market",
    "coffee",
    "river",
    "mountain",
    "city",
    "train",
    "airport",
    "garden",
    "kitchen",
    "library",
    "museum",
    "painting",
    "history",
    "science",
    "language",
    "travel",
    "morning",
]


def make_texts(kind: str, count: int, seed: int = 0) -> list[str]:
    """Deterministic synthetic sentences: 'short' (8-12 words, similar length) or 'mixed' (8-40 words)."""
    rng = random.Random(seed)
    low, high = (8, 12) if kind == "short" else (8, 40)
    return [
        " ".join(rng.choice(_WORDS) for _ in range(rng.randint(low, high))).capitalize() + "." for _ in range(count)
    ]


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


class BareModel:
    """The model with nothing around it: fast tokenizer + ONNX Runtime + pooling, in this process.

    `spinning` picks ONNX Runtime's default thread spinning (on) or the inference service's setting (off); the
    benchmark measures both and takes the better one as the ceiling, so Tandem is never compared with a handicapped
    model.
    """

    def __init__(
        self, version_dir: Path, onnx_path: Path, max_length: int, pooling: str, threads: int, spinning: bool
    ) -> None:
        import onnxruntime as ort
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(version_dir))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.max_length = max_length
        self.pooling = pooling

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="np"
        )
        feed = {k: v.astype(np.int64) for k, v in enc.items() if k in self.inputs}
        hidden = self.session.run(None, feed)[0]
        mask = enc["attention_mask"][..., None].astype(np.float32)
        pooled = hidden[:, 0] if self.pooling == "cls" else (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
        norms = np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        result: npt.NDArray[np.float32] = (pooled / norms).astype(np.float32)
        return result

    def by_tokens(self, texts: Sequence[str]) -> list[str]:
        """The texts shortest first by token count (what padding depends on), not by characters."""
        counts = [
            len(ids) for ids in self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]
        ]
        return [text for _, text in sorted(zip(counts, texts, strict=True), key=lambda pair: pair[0])]

    def sorted_rate(self, ordered: Sequence[str], batch: int) -> float:
        """texts/s over texts already sorted by token count, in batches of `batch`."""
        self.embed(ordered[:batch])
        t0 = time.perf_counter()
        for i in range(0, len(ordered), batch):
            self.embed(ordered[i : i + batch])
        return len(ordered) / (time.perf_counter() - t0)

    def measure(self, texts: Sequence[str], batch: int) -> dict[str, float]:
        """texts/s one at a time, in naive batches, and in length-sorted batches; the ceiling is the best."""
        for text in texts[:8]:
            self.embed([text])
        t0 = time.perf_counter()
        latencies = []
        for text in texts:
            s = time.perf_counter()
            self.embed([text])
            latencies.append(time.perf_counter() - s)
        single = len(texts) / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i in range(0, len(texts), batch):
            self.embed(texts[i : i + batch])
        naive = len(texts) / (time.perf_counter() - t0)
        sorted_rate = self.sorted_rate(self.by_tokens(texts), batch)
        return {
            "single_texts_per_s": single,
            "single_p50_ms": statistics.median(latencies) * 1000,
            "naive_batch_texts_per_s": naive,
            "sorted_batch_texts_per_s": sorted_rate,
            "ceiling_texts_per_s": max(single, sorted_rate),
        }


@dataclass
class Cell:
    concurrency: int
    texts_per_request: int
    api: str = "embed"
    model: str = ""
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


APIS = ("embed", "stream", "oip")


def _code_name(number: int) -> str:
    return next((code.name for code in grpc.StatusCode if code.value[0] == number), str(number))


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
                    delay = retry_delay(exc) if honor_retry_info else None
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


def retry_delay(exc: grpc.aio.AioRpcError) -> float | None:
    """Seconds a refusal's google.rpc.RetryInfo asks the caller to wait, if it carries one."""
    from google.rpc import error_details_pb2, status_pb2

    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            for detail in status_pb2.Status.FromString(value).details:
                if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                    info = error_details_pb2.RetryInfo()
                    detail.Unpack(info)
                    return float(info.retry_delay.ToTimedelta().total_seconds())
    return None


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


def _grid(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _locate_model(repository: Path, model: str) -> tuple[Path, Path, int, str]:
    from services.common.repository import ModelRepository

    version = ModelRepository(repository).resolve(model)
    onnx = version.path / "model.onnx"
    if not onnx.exists():
        raise SystemExit(f"{onnx} does not exist: start `tandem serve` once so the model is exported")
    return version.path, onnx, version.max_length, version.pooling


def plot(results: list[dict[str, Any]], ceiling: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    series = sorted({(r["api"], r["model"], r["texts_per_request"]) for r in results})
    for api, model, size in series:
        rows = sorted(
            (r for r in results if (r["api"], r["model"], r["texts_per_request"]) == (api, model, size)),
            key=lambda r: r["concurrency"],
        )
        xs = [r["concurrency"] for r in rows]
        name = f"{size} text(s)/request" if len(series) <= 2 else f"{api} {model} n={size}"
        left.plot(xs, [r["texts_per_s"] for r in rows], marker="o", label=name)
        right.plot(xs, [r["p99_ms"] for r in rows], marker="o", label=name)
    left.axhline(ceiling, color="grey", linestyle="--", label="bare model ceiling")
    for axis, title in ((left, "throughput (texts/s)"), (right, "p99 latency (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrency")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def measure_parallel(models: Sequence[BareModel], ordered: Sequence[str], batch: int) -> float:
    """texts/s of batches of texts already sorted by token count, shared out among several sessions running side by
    side, one thread each (ONNX Runtime, the fast tokenizer and numpy release the GIL) — how the inference stage runs
    a model on CPU."""
    import concurrent.futures

    batches = [ordered[i : i + batch] for i in range(0, len(ordered), batch)]
    for model in models:
        model.embed(batches[0])
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(models)) as pool:
        list(pool.map(lambda k: [models[k].embed(b) for b in batches[k :: len(models)]], range(len(models))))
    return len(ordered) / (time.perf_counter() - t0)


class BareBeside:
    """A quick measurement of the bare model's best speed, taken between the cells.

    On a shared machine the speed of the host moves within minutes (on the 2-core development VM, 4 x 32 cells
    against one server gave 334-458 texts/s within ten minutes, with the inference stage's CPU per text moving
    alike), so a ceiling measured once before and once after the grid cannot tell Tandem's overhead from a slow
    moment. Measured between every two cells, each cell is also compared with the bare model of its own moment.
    The two usual winners of the full measurement only: length-sorted batches on one-thread sessions side by side,
    and on one session with every thread; about a second each on the 512-text corpus.
    """

    def __init__(self, repository: Path, model: str, texts: Sequence[str], threads: int, batch: int) -> None:
        version_dir, onnx, max_length, pooling = _locate_model(repository, model)
        self.whole = BareModel(version_dir, onnx, max_length, pooling, threads, True)
        self.side_by_side = (
            [BareModel(version_dir, onnx, max_length, pooling, 1, False) for _ in range(threads)] if threads > 1 else []
        )
        self.ordered = self.whole.by_tokens(texts)
        self.batch = batch

    def measure(self) -> float:
        rate = self.whole.sorted_rate(self.ordered, self.batch)
        if self.side_by_side:
            rate = max(rate, measure_parallel(self.side_by_side, self.ordered, self.batch))
        return rate


def measure_bare(repository: Path, model: str, texts: Sequence[str], threads: int, batch: int) -> dict[str, float]:
    """The model's own speed on these texts, at its best: one session using every thread (ONNX Runtime's thread
    spinning on and off), and `threads` single-thread sessions side by side. The ceiling is the fastest of all."""
    version_dir, onnx, max_length, pooling = _locate_model(repository, model)
    print(f"bare model {model}: {onnx} ({threads} threads)", flush=True)
    runs = {
        spinning: BareModel(version_dir, onnx, max_length, pooling, threads, spinning).measure(texts, batch)
        for spinning in (True, False)
    }
    bare = max(runs.values(), key=lambda r: r["ceiling_texts_per_s"])
    bare["spinning"] = float(bare is runs[True])
    bare["single_p50_ms"] = min(r["single_p50_ms"] for r in runs.values())
    if threads > 1:
        sessions = [BareModel(version_dir, onnx, max_length, pooling, 1, False) for _ in range(threads)]
        bare["sorted_parallel_texts_per_s"] = measure_parallel(sessions, sessions[0].by_tokens(texts), batch)
        bare["ceiling_texts_per_s"] = max(bare["ceiling_texts_per_s"], bare["sorted_parallel_texts_per_s"])
    print(
        "bare: one at a time {single_texts_per_s:.1f} texts/s (p50 {single_p50_ms:.2f} ms); "
        "batches of {b}: naive {naive_batch_texts_per_s:.1f}, length-sorted {sorted_batch_texts_per_s:.1f}, "
        "length-sorted on {threads} one-thread sessions {parallel:.1f} texts/s; "
        "ceiling {ceiling_texts_per_s:.1f}".format(
            b=batch, threads=threads, parallel=bare.get("sorted_parallel_texts_per_s", float("nan")), **bare
        ),
        flush=True,
    )
    return bare


def combine_bare(runs: Sequence[dict[str, float]]) -> dict[str, Any]:
    """The best of several measurements of the bare model (before and after the cells): the highest rates and the
    lowest one-text p50, so that a slow moment of the machine while the bare model ran never flatters the ratios."""
    best: dict[str, Any] = {key: max(run[key] for run in runs) for key in runs[0] if key.endswith("_per_s")}
    best["single_p50_ms"] = min(run["single_p50_ms"] for run in runs)
    best["spinning"] = max(runs, key=lambda run: run["ceiling_texts_per_s"])["spinning"]
    best["measurements"] = list(runs)
    return best


def main(argv: Sequence[str]) -> int:
    from tqdm import tqdm

    from services.common.default_model import DEFAULT_MODEL_NAME
    from services.common.settings import default_home

    parser = argparse.ArgumentParser(prog="tandem bench", description=__doc__)
    parser.add_argument("--target", default="127.0.0.1:50051", help="gateway address")
    parser.add_argument(
        "--model", default=DEFAULT_MODEL_NAME, help="model reference, or several comma-separated (compared in one run)"
    )
    parser.add_argument(
        "--api",
        default="embed",
        help="comma-separated: embed (unary Embed), stream (one EmbedStream, concurrency = requests in flight), "
        "oip (Open Inference Protocol ModelInfer)",
    )
    parser.add_argument("--model-repository", type=Path, default=None, help="default: the built-in repository")
    parser.add_argument("--home", type=Path, default=default_home())
    parser.add_argument("--concurrency", default="1,4,32", help="comma-separated grid")
    parser.add_argument("--texts-per-request", default="1,32", help="comma-separated grid")
    parser.add_argument("--texts", choices=("short", "mixed"), default="short")
    parser.add_argument("--corpus", type=int, default=512, help="distinct texts")
    parser.add_argument("--texts-per-cell", type=int, default=1024, help="texts sent in each grid cell (at least)")
    parser.add_argument("--deadline-s", type=float, default=30.0)
    parser.add_argument("--bare-batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=usable_cpus(), help="bare model's ONNX threads")
    parser.add_argument("--skip-bare", action="store_true")
    parser.add_argument(
        "--no-bare-after",
        dest="bare_after",
        action="store_false",
        help="measure the bare model only before the cells (default: before and after, the ceiling is the best)",
    )
    parser.add_argument(
        "--no-bare-beside",
        dest="bare_beside",
        action="store_false",
        help="do not measure the bare model quickly between the cells (default: measured, and each cell is also "
        "compared with the bare model just before and after it)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--tls-ca", type=Path, default=None, help="PEM CA of a gateway served with TLS")
    parser.add_argument("--tls-cert", type=Path, default=None, help="PEM client certificate (gateway with mTLS)")
    parser.add_argument("--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")
    parser.add_argument("--tls-server-name", default=None, help="name the gateway's certificate is checked for")
    parser.add_argument("--api-key", default=None, help="sent as x-api-key when the gateway has keys")
    parser.add_argument(
        "--probe-interval-ms",
        type=float,
        default=0.0,
        help="also run a quiet probe client in its own process, one call every this many ms during each cell, and "
        "report what it saw (how fast refusals come back to a caller that is not itself overloaded); 0: off",
    )
    parser.add_argument(
        "--no-retry-info",
        dest="honor_retry_info",
        action="store_false",
        help="after a refusal, call again at once instead of waiting the RetryInfo delay the server asked for",
    )
    opts = parser.parse_args(argv)
    credentials = None
    if opts.tls_ca is not None or opts.tls_cert is not None:
        from tandem.sdk import tls_credentials

        try:
            credentials = tls_credentials(opts.tls_ca, opts.tls_cert, opts.tls_key)
        except (OSError, ValueError) as exc:
            parser.error(f"TLS: {exc}")

    texts = make_texts(opts.texts, opts.corpus)
    models = [m.strip() for m in opts.model.split(",") if m.strip()]
    apis = [a.strip() for a in opts.api.split(",") if a.strip()]
    unknown = sorted(set(apis) - set(APIS))
    if unknown:
        parser.error(f"unknown --api {', '.join(unknown)}: choose from {', '.join(APIS)}")
    bare_by_model: dict[str, dict[str, Any]] = {}
    if not opts.skip_bare:
        from services.common.default_model import ensure_default_repository

        repository = opts.model_repository or ensure_default_repository(opts.home)
        for model in models:
            bare_by_model[model] = measure_bare(repository, model, texts, opts.threads, opts.bare_batch)
    bare = bare_by_model.get(models[0], {})
    ceiling = bare.get("ceiling_texts_per_s", 0.0)
    beside = (
        {model: BareBeside(repository, model, texts, opts.threads, opts.bare_batch) for model in models}
        if bare_by_model and opts.bare_beside
        else {}
    )
    # The bare model's speed measured right after the previous cell, and that cell's model.
    last_beside = 0.0
    last_model = ""
    results = []
    # Cells that are compared with each other (models, APIs at one concurrency and size) run back to back, so a
    # change in the machine's background load affects them alike.
    grid = [
        (model, api, c, n)
        for n in _grid(opts.texts_per_request)
        for c in _grid(opts.concurrency)
        for model in models
        for api in apis
    ]
    for model, api, concurrency, size in grid:
        requests = max(concurrency * 4, opts.texts_per_cell // size)
        cell = Cell(concurrency, size, api, model)
        label = f"{api:<6} c={concurrency:<4} n={size:<3}" + (f" {model}" if len(models) > 1 else "")
        probe = (
            Probe(
                ProbeSettings(
                    opts.target,
                    model,
                    texts[0],
                    opts.probe_interval_ms / 1000,
                    opts.deadline_s,
                    opts.tls_ca,
                    opts.tls_cert,
                    opts.tls_key,
                    opts.tls_server_name,
                    opts.api_key,
                )
            )
            if opts.probe_interval_ms > 0
            else None
        )
        if model in beside and model != last_model:
            # Measured after a cell of another model (or none yet): measure this one now.
            last_beside = beside[model].measure()
        with tqdm(total=requests, desc=label, leave=False, unit="req") as progress, probe or contextlib.nullcontext():
            asyncio.run(
                run_cell(
                    opts.target,
                    model,
                    texts,
                    cell,
                    requests,
                    opts.deadline_s,
                    progress,
                    credentials,
                    opts.tls_server_name,
                    opts.api_key,
                    opts.honor_retry_info,
                )
            )
        nearby: list[float] = []
        if model in beside:
            # The measurement after this cell is also the one before the next cell, when that is of the same model.
            nearby = [last_beside, beside[model].measure()]
            last_beside, last_model = nearby[1], model
        summary = cell.summary(bare_by_model.get(model, {}).get("ceiling_texts_per_s", 0.0), nearby)
        if probe is not None:
            summary["probe"] = probe.summary()
            print(f"{label}  probe: {summary['probe']}", flush=True)
        results.append(summary)
        print(
            f"{label}  {summary['texts_per_s']:8.1f} texts/s  "
            f"x{summary['ratio_to_bare']:.2f} bare  p50 {summary['p50_ms']:7.2f}  p90 {summary['p90_ms']:7.2f}  "
            f"p99 {summary['p99_ms']:7.2f} ms  codes {summary['codes']}"
            + (
                f"  (x{summary['ratio_to_bare_beside']:.2f} of the bare model beside it: "
                f"{summary['bare_beside_texts_per_s']:.1f} texts/s)"
                if nearby
                else ""
            ),
            flush=True,
        )
    if bare_by_model and opts.bare_after:
        print("the bare model again, after the cells:", flush=True)
        for model in models:
            again = measure_bare(repository, model, texts, opts.threads, opts.bare_batch)
            bare_by_model[model] = combine_bare([bare_by_model[model], again])
        bare = bare_by_model[models[0]]
        ceiling = bare["ceiling_texts_per_s"]
        for result in results:
            best = bare_by_model[result["model"]]["ceiling_texts_per_s"]
            result["ratio_to_bare"] = result["texts_per_s"] / best
        print("ratios to the best of both ceilings:", flush=True)
        for result in results:
            model = f" {result['model']}" if len(models) > 1 else ""
            print(
                f"{result['api']:<6} c={result['concurrency']:<4} n={result['texts_per_request']:<3}{model}  "
                f"{result['texts_per_s']:8.1f} texts/s  x{result['ratio_to_bare']:.2f} bare "
                f"(ceiling {bare_by_model[result['model']]['ceiling_texts_per_s']:.1f})"
                + (
                    f"  x{result['ratio_to_bare_beside']:.2f} beside"
                    if not math.isnan(result["ratio_to_bare_beside"])
                    else ""
                ),
                flush=True,
            )
    opts.out.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": {"cpus": os.cpu_count(), "usable_cpus": usable_cpus(), "uname": " ".join(os.uname())},
        "settings": {k: str(v) for k, v in vars(opts).items()},
        "bare": bare,
        "bare_by_model": bare_by_model,
        "results": results,
    }
    (opts.out / "bench.json").write_text(json.dumps(report, indent=2))
    plot(results, ceiling, opts.out / "bench.png")
    print(f"wrote {opts.out / 'bench.json'} and {opts.out / 'bench.png'}")
    return 0
