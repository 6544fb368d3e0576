"""The wiring every model stage shares (tokenizer, inference, postprocess): settings, logging, tracing, TLS, server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import Any, TypeVar

import grpc
from prometheus_client import REGISTRY

from services.common import diagnostics, event_loop, tls, tracing
from services.common import logging as tandem_logging
from services.common.metrics import CallObserver, MetricsInterceptor, ServiceMetrics, serve_metrics
from services.common.server import (
    Registrar,
    RunningServer,
    exit_with_parent,
    freeze_imported_objects,
    start_server,
    wait_for_termination,
)
from services.common.settings import ServiceSettings

log = logging.getLogger(__name__)

S = TypeVar("S", bound=ServiceSettings)


async def serve(
    role: str,
    settings: ServiceSettings,
    security: tls.ServiceTls | None,
    registrars: Sequence[tuple[Registrar, str]],
    *,
    observers: Iterable[CallObserver] = (),
    warm_up: Callable[[], Awaitable[None]] | None = None,
    close: Callable[[], Awaitable[None]] | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    health: Callable[[RunningServer], Coroutine[Any, Any, None]] | None = None,
    public: bool = False,
    options: Sequence[tuple[str, Any]] = (),
    on_drain: Callable[[], None] | None = None,
) -> None:
    """Serves `registrars` with the stage's interceptors and /metrics until SIGTERM, then drains and runs `close`.

    With `warm_up` the server binds and answers health checks NOT_SERVING while it runs (model export and warm-up can
    take minutes), and turns SERVING once it is done. With `health` it starts NOT_SERVING and `health` sets it for
    as long as the server runs (the gateway's follows its stages'). `interceptors` run after tracing and metrics, so
    the calls they refuse are traced and counted. `public` is the gateway's port: request ids are echoed to callers
    and connections are never recycled. `options` are more gRPC server arguments. `on_drain` is told when shutting
    down starts (before the grace period).
    """
    security = security or tls.load(settings)
    diagnostics.install(asyncio.get_running_loop())  # SIGUSR1: what every thread and task is doing, to stderr
    service_metrics = ServiceMetrics(role)
    running = await start_server(
        settings.listen,
        registrars,
        reflection_enabled=settings.reflection,
        max_message_bytes=settings.max_message_bytes,
        serving=warm_up is None and health is None,
        address_file=settings.address_file,
        max_connection_age_s=None if public else 60.0,
        interceptors=[
            *tracing.server_interceptors(role),
            MetricsInterceptor(service_metrics, observers),
            *interceptors,
        ],
        options=options,
        credentials=security.server,
        echo_request_id=public,  # a stage's only caller, the gateway, sent the id itself
        on_serving=service_metrics.set_serving,
    )
    running.on_drain = on_drain
    metrics_server = serve_metrics(REGISTRY, settings.listen, settings.metrics_port)
    if warm_up is not None:
        log.info("%s listening on %s; loading models", role, running.address)
        await warm_up()
        await running.set_serving(True)
    log.info("%s serving on %s", role, running.address)
    follower = asyncio.create_task(health(running)) if health is not None else None

    async def stop() -> None:
        if follower is not None:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
        if close is not None:
            await close()
        if metrics_server is not None:
            metrics_server.close()

    await wait_for_termination(running, settings.grace_s, stop)


def main(
    role: str,
    settings_type: type[S],
    serve_stage: Callable[[S, tls.ServiceTls], Coroutine[Any, Any, None]],
    argv: Sequence[str] | None = None,
) -> None:
    """A stage's main(): settings from flags and environment, logging, tracing, TLS (exit 1 if unusable), then serve."""
    prog = f"tandem {role}"
    settings = settings_type.from_args(sys.argv[1:] if argv is None else argv, prog)
    tandem_logging.configure(settings.log_level, settings.json_logs, service=role)
    tracing.configure(settings.otlp_endpoint, role, settings.otel_service_name, settings.trace_sample_ratio)
    security = tls.load_or_exit(settings, prog)
    exit_with_parent(settings.parent_pid)
    try:
        loop = event_loop.name(settings.event_loop)
    except event_loop.EventLoopUnavailableError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    log.info("%s running on the %s event loop", role, loop)
    freeze_imported_objects()
    event_loop.run(serve_stage(settings, security), settings.event_loop)
