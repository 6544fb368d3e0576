"""Runs the inference stage: settings -> core -> servicer -> server, SERVING only once every model is warm."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Sequence

from prometheus_client import REGISTRY

from services.common import stage, tls
from services.common.default_model import open_repository
from services.common.metrics import InferenceMetrics
from services.inference.backends.base import cuda_present
from services.inference.core import Inference
from services.inference.servicer import management_registrar, registrar
from services.inference.settings import InferenceSettings

# Python's thread switch interval with a GPU present (settings.switch_interval_ms).
GPU_SWITCH_INTERVAL_MS = 0.5


def build_core(settings: InferenceSettings, metrics: InferenceMetrics | None = None) -> Inference:
    repository = open_repository(settings)
    return Inference(
        repository,
        home=settings.home,
        intra_op_threads=settings.intra_op_threads,
        device=settings.device,
        spinning=settings.intra_op_spinning,
        instances=settings.model_instances,
        run_alone=settings.run_alone,
        inline_lone_ms=settings.inline_lone_ms,
        compute_nice=settings.compute_nice,
        watch_s=settings.watch_interval_s or None,
        unload_idle_s=settings.unload_idle_s,
        unload_timeout_s=settings.unload_timeout_s,
        observers=metrics.recorder if metrics is not None else None,
    )


def _quiet_model_libraries() -> None:
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


async def serve(settings: InferenceSettings, security: tls.ServiceTls | None = None) -> None:
    interval_ms = settings.switch_interval_ms
    if interval_ms is None and cuda_present():
        interval_ms = GPU_SWITCH_INTERVAL_MS
    if interval_ms is not None:
        sys.setswitchinterval(interval_ms / 1000)
    metrics = InferenceMetrics(REGISTRY)
    core = build_core(settings, metrics)
    metrics.watch(core)
    await stage.serve(
        "inference",
        settings,
        security,
        [registrar(core), management_registrar(core)],
        warm_up=core.start,
        close=core.close,
        on_drain=core.drain,
    )


def main(argv: Sequence[str] | None = None) -> None:
    _quiet_model_libraries()
    stage.main("inference", InferenceSettings, serve, argv)


if __name__ == "__main__":
    main()
