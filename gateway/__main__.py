"""Runs the gateway: settings -> stage clients -> pipeline -> server; its health follows the stages."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Sequence

from prometheus_client import REGISTRY

from gateway.clients import InferenceClient, PostprocessClient, TokenizerClient
from gateway.core import Pipeline
from gateway.management.client import ManagementClient
from gateway.management.servicer import registrar as management_registrar
from gateway.oip.servicer import registrar as oip_registrar
from gateway.servicer import registrar
from gateway.settings import GatewaySettings
from services.common import logging as tandem_logging
from services.common import tls, tracing
from services.common.metrics import GatewayMetrics, MetricsInterceptor, ServiceMetrics, serve_metrics
from services.common.server import RunningServer, exit_with_parent, start_server, wait_for_termination

log = logging.getLogger(__name__)


def build_pipeline(settings: GatewaySettings, security: tls.ChannelSecurity | None = None) -> Pipeline:
    size = settings.max_message_bytes
    return Pipeline(
        TokenizerClient(settings.tokenizer, size, settings.hedge_after_s, security=security),
        InferenceClient(settings.inference, size, settings.hedge_after_s, security=security),
        PostprocessClient(settings.postprocess, size, settings.hedge_after_s, security=security),
        default_timeout_s=settings.default_timeout_s,
        max_inputs=settings.max_inputs,
        model_cache_ttl_s=settings.model_cache_ttl_s,
        coalesce=settings.coalesce,
        coalesce_max_inputs=settings.coalesce_max_inputs,
    )


async def follow_stage_health(running: RunningServer, pipeline: Pipeline, interval_s: float) -> None:
    """The gateway is SERVING exactly while all three stages answer SERVING."""
    serving: bool | None = None
    while True:
        try:
            now = await pipeline.stages_serving(timeout_s=max(interval_s, 0.5))
        except Exception:  # the watcher must outlive any failure, or health would freeze at its last value
            log.exception("checking the stages' health failed")
            now = False
        if now != serving:
            log.info("stages %s", "reachable: SERVING" if now else "not all reachable: NOT_SERVING")
            await running.set_serving(now)
            serving = now
        await asyncio.sleep(interval_s)


async def serve(settings: GatewaySettings, security: tls.ServiceTls | None = None) -> None:
    security = security or tls.load(settings)
    pipeline = build_pipeline(settings, security.channels)
    management = ManagementClient(settings.inference, settings.max_message_bytes, security=security.channels)
    running = await start_server(
        settings.listen,
        # The native API and the Open Inference Protocol (KServe v2 / Triton clients) on one port; the model
        # lifecycle API forwarded to the inference stage.
        [
            registrar(pipeline),
            oip_registrar(pipeline, management),
            management_registrar(management, settings.management_timeout_s),
        ],
        reflection_enabled=settings.reflection,
        max_message_bytes=settings.max_message_bytes,
        address_file=settings.address_file,
        serving=False,
        max_connection_age_s=None,
        interceptors=[
            *tracing.server_interceptors("gateway"),
            MetricsInterceptor(
                ServiceMetrics("gateway"), [GatewayMetrics(REGISTRY, access_log_enabled=settings.access_log).observe]
            ),
        ],
        credentials=security.server,
    )
    metrics_server = serve_metrics(REGISTRY, settings.listen, settings.metrics_port)
    log.info("gateway serving on %s", running.address)
    watcher = asyncio.create_task(follow_stage_health(running, pipeline, settings.health_interval_s))

    async def close() -> None:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await pipeline.close()
        await management.close()
        if metrics_server is not None:
            metrics_server.close()

    await wait_for_termination(running, settings.grace_s, close)


def main(argv: Sequence[str] | None = None) -> None:
    settings = GatewaySettings.from_args(sys.argv[1:] if argv is None else argv, "tandem gateway")
    tandem_logging.configure(settings.log_level, settings.json_logs, service="gateway")
    tracing.configure(settings.otlp_endpoint, "gateway", settings.otel_service_name, settings.trace_sample_ratio)
    security = tls.load_or_exit(settings, "tandem gateway")
    exit_with_parent(settings.parent_pid)
    asyncio.run(serve(settings, security))


if __name__ == "__main__":
    main()
