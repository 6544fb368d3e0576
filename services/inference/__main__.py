"""Runs the inference stage: settings -> core -> servicer -> server, SERVING only once every model is warm."""

from __future__ import annotations

import asyncio
import logging
import sys
import warnings
from collections.abc import Sequence

from prometheus_client import REGISTRY

from services.common import logging as tandem_logging
from services.common import tls, tracing
from services.common.default_model import repository_root
from services.common.metrics import InferenceMetrics, MetricsInterceptor, ServiceMetrics, serve_metrics
from services.common.repository import ModelRepository
from services.common.server import exit_with_parent, start_server, wait_for_termination
from services.inference.core import Inference
from services.inference.servicer import management_registrar, registrar
from services.inference.settings import InferenceSettings

log = logging.getLogger(__name__)


def build_core(settings: InferenceSettings, metrics: InferenceMetrics | None = None) -> Inference:
    repository = ModelRepository(repository_root(settings.model_repository, settings.home), settings.default_model)
    return Inference(
        repository,
        home=settings.home,
        intra_op_threads=settings.intra_op_threads,
        device=settings.device,
        spinning=settings.intra_op_spinning,
        watch_s=settings.watch_interval_s or None,
        unload_idle_s=settings.unload_idle_s,
        unload_timeout_s=settings.unload_timeout_s,
        observers=metrics.recorder if metrics is not None else None,
    )


async def serve(settings: InferenceSettings, security: tls.ServiceTls | None = None) -> None:
    security = security or tls.load(settings)
    metrics = InferenceMetrics(REGISTRY)
    core = build_core(settings, metrics)
    metrics.watch(core)
    # Bound and answering health checks (NOT_SERVING) while models export and warm up, which can take minutes.
    running = await start_server(
        settings.listen,
        [registrar(core), management_registrar(core)],
        reflection_enabled=settings.reflection,
        max_message_bytes=settings.max_message_bytes,
        serving=False,
        address_file=settings.address_file,
        interceptors=[*tracing.server_interceptors("inference"), MetricsInterceptor(ServiceMetrics("inference"))],
        credentials=security.server,
    )
    metrics_server = serve_metrics(REGISTRY, settings.listen, settings.metrics_port)
    log.info("inference listening on %s; loading models", running.address)
    await core.start()
    await running.set_serving(True)
    log.info("inference serving on %s", running.address)

    async def close() -> None:
        await core.close()
        if metrics_server is not None:
            metrics_server.close()

    await wait_for_termination(running, settings.grace_s, close)


def main(argv: Sequence[str] | None = None) -> None:
    settings = InferenceSettings.from_args(sys.argv[1:] if argv is None else argv, "tandem inference")
    tandem_logging.configure(settings.log_level, settings.json_logs, service="inference")
    tracing.configure(settings.otlp_endpoint, "inference", settings.otel_service_name, settings.trace_sample_ratio)
    security = tls.load_or_exit(settings, "tandem inference")
    exit_with_parent(settings.parent_pid)
    # Progress bars from model loading would interleave with the structured log lines.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    # The ONNX exporter's libraries log every graph rewrite at INFO and warn about optional torchvision ops and
    # about dimension names shared between inputs (which is the point: all inputs share batch and sequence).
    for name in ("onnx_ir", "onnxscript"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="# The axis name", category=UserWarning)
    warnings.filterwarnings("ignore", message=".*LeafSpec", category=FutureWarning)
    asyncio.run(serve(settings, security))


if __name__ == "__main__":
    main()
