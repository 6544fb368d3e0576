"""The wiring every model stage shares (tokenizer, inference, postprocess): settings, logging, tracing, TLS, server."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import Any, TypeVar

from prometheus_client import REGISTRY

from services.common import logging as tandem_logging
from services.common import tls, tracing
from services.common.metrics import CallObserver, MetricsInterceptor, ServiceMetrics, serve_metrics
from services.common.server import (
    Registrar,
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
) -> None:
    """Serves `registrars` with the stage's interceptors and /metrics until SIGTERM, then drains and runs `close`.

    With `warm_up` the server binds and answers health checks NOT_SERVING while it runs (model export and warm-up can
    take minutes), and turns SERVING once it is done.
    """
    security = security or tls.load(settings)
    running = await start_server(
        settings.listen,
        registrars,
        reflection_enabled=settings.reflection,
        max_message_bytes=settings.max_message_bytes,
        serving=warm_up is None,
        address_file=settings.address_file,
        interceptors=[*tracing.server_interceptors(role), MetricsInterceptor(ServiceMetrics(role), observers)],
        credentials=security.server,
        echo_request_id=False,  # the gateway, the only caller, sent the id itself
    )
    metrics_server = serve_metrics(REGISTRY, settings.listen, settings.metrics_port)
    if warm_up is not None:
        log.info("%s listening on %s; loading models", role, running.address)
        await warm_up()
        await running.set_serving(True)
    log.info("%s serving on %s", role, running.address)

    async def stop() -> None:
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
    freeze_imported_objects()
    asyncio.run(serve_stage(settings, security))
