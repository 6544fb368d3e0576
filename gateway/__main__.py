"""Runs the gateway: settings -> stage clients -> pipeline -> server; its health follows the stages."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import sys
from collections.abc import Sequence

import grpc
from prometheus_client import REGISTRY

from gateway.auth import AuthInterceptor, KeyRing
from gateway.clients import InferenceClient, PostprocessClient, TokenizerClient
from gateway.core import Pipeline
from gateway.limits import RateLimiter, RateLimitInterceptor
from gateway.management.client import ManagementClient
from gateway.management.servicer import registrar as management_registrar
from gateway.oip.servicer import registrar as oip_registrar
from gateway.servicer import registrar
from gateway.settings import GatewaySettings
from services.common import logging as tandem_logging
from services.common import tls, tracing
from services.common.metrics import GatewayMetrics, MetricsInterceptor, ServiceMetrics, serve_metrics
from services.common.server import (
    RunningServer,
    exit_with_parent,
    freeze_imported_objects,
    start_server,
    wait_for_termination,
)

log = logging.getLogger(__name__)


def build_pipeline(settings: GatewaySettings, security: tls.ChannelSecurity | None = None) -> Pipeline:
    size = settings.max_message_bytes
    return Pipeline(
        TokenizerClient(settings.tokenizer, size, settings.hedge_after_s, security=security),
        InferenceClient(settings.inference, size, settings.hedge_after_s, security=security),
        PostprocessClient(settings.postprocess, size, settings.hedge_after_s, security=security),
        default_timeout_s=settings.default_timeout_s,
        max_inputs=settings.max_inputs,
        max_input_chars=settings.max_input_chars,
        model_cache_ttl_s=settings.model_cache_ttl_s,
        coalesce=settings.coalesce,
        coalesce_max_inputs=settings.coalesce_max_inputs,
        coalesce_max_queued=settings.coalesce_max_queued,
        coalesce_max_runs=settings.coalesce_max_runs,
    )


def is_loopback(listen: str) -> bool:
    """Whether `listen` is reachable only from this machine (a Unix socket, localhost, 127.0.0.0/8, ::1)."""
    if listen.startswith("unix:"):
        return True
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name, or empty (all interfaces)
        return False


def build_interceptors(settings: GatewaySettings) -> list[grpc.aio.ServerInterceptor]:
    """Authentication first (so the rate limiter knows the key), then the per-key rate limit."""
    keys = KeyRing.load(
        settings.api_keys_file, settings.api_keys.get_secret_value() if settings.api_keys is not None else None
    )
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if keys.enabled:
        log.info("authentication on: %d API keys (%s)", len(keys.keys), ", ".join(k.key_id for k in keys.keys))
        interceptors.append(
            AuthInterceptor(keys, open_health=settings.auth_open_health, open_reflection=settings.auth_open_reflection)
        )
    elif not is_loopback(settings.listen):
        log.warning(
            "authentication is off and the gateway listens on %s: anyone who can reach it may call every RPC, "
            "management included; set --api-keys-file",
            settings.listen,
        )
    if settings.rate_limit_texts_per_s > 0:
        limiter = RateLimiter(settings.rate_limit_texts_per_s, settings.rate_limit_burst)
        interceptors.append(RateLimitInterceptor(limiter, max_cost=settings.max_inputs))
    return interceptors


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


async def serve(
    settings: GatewaySettings,
    security: tls.ServiceTls | None = None,
    access: Sequence[grpc.aio.ServerInterceptor] | None = None,
) -> None:
    """`access`: the authentication and rate-limit interceptors (built from the settings when not given)."""
    security = security or tls.load(settings)
    access = build_interceptors(settings) if access is None else access
    pipeline = build_pipeline(settings, security.channels)
    management = ManagementClient(settings.inference, settings.max_message_bytes, security=security.channels)
    running = await start_server(
        settings.listen,
        # The native API and the Open Inference Protocol (KServe v2 / Triton clients) on one port; the model
        # lifecycle API forwarded to the inference stage.
        [
            registrar(pipeline, settings.stream_window),
            oip_registrar(pipeline, management),
            management_registrar(management, settings.management_timeout_s),
        ],
        reflection_enabled=settings.reflection,
        max_message_bytes=settings.max_message_bytes,
        address_file=settings.address_file,
        serving=False,
        max_connection_age_s=None,
        # Tracing and metrics outermost, so refused calls are traced and counted too; then who may call, and how much.
        interceptors=[
            *tracing.server_interceptors("gateway"),
            MetricsInterceptor(
                ServiceMetrics("gateway"), [GatewayMetrics(REGISTRY, access_log_enabled=settings.access_log).observe]
            ),
            *access,
        ],
        options=[("grpc.max_concurrent_streams", settings.max_concurrent_streams)],
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
    try:
        access = build_interceptors(settings)
    except (OSError, ValueError) as exc:  # a bad keys file stops the gateway with a message, not a traceback
        raise SystemExit(f"tandem gateway: cannot load API keys: {exc}") from None
    freeze_imported_objects()
    asyncio.run(serve(settings, security, access))


if __name__ == "__main__":
    main()
