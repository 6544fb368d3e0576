"""Runs the gateway: settings -> stage clients -> pipeline -> server; its health follows the stages."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Sequence

import grpc
from prometheus_client import REGISTRY

from gateway.auth import AuthInterceptor, KeyRing
from gateway.clients import (
    InferenceClient,
    PostprocessClient,
    PostprocessStage,
    TokenizerClient,
    TokenizerStage,
    uses_inference_stream,
)
from gateway.core import Pipeline
from gateway.limits import RateLimiter, RateLimitInterceptor
from gateway.local import IN_PROCESS, LocalPostprocess, LocalTokenizer
from gateway.management.client import ManagementClient
from gateway.management.servicer import registrar as management_registrar
from gateway.oip.servicer import registrar as oip_registrar
from gateway.priority import PriorityInterceptor
from gateway.servicer import registrar
from gateway.settings import GatewaySettings
from services.common import stage, tls
from services.common.default_model import open_repository
from services.common.metrics import GatewayMetrics
from services.common.server import Registrar, RunningServer
from services.postprocess.core import Postprocessor
from services.tokenizer.core import Tokenizer

log = logging.getLogger(__name__)


def build_pipeline(settings: GatewaySettings, security: tls.ChannelSecurity | None = None) -> Pipeline:
    """Stage clients over channels, or the light stages' cores in this process where a target is `in-process`."""
    size = settings.max_message_bytes
    tokenizer: TokenizerStage
    postprocess: PostprocessStage
    # One repository for both stages in this process: one listing per model read every second, not one each.
    repository = open_repository(settings) if IN_PROCESS in (settings.tokenizer, settings.postprocess) else None
    if repository is not None and settings.tokenizer == IN_PROCESS:
        tokenizer = LocalTokenizer(Tokenizer(repository, max_inputs=settings.max_inputs))
    else:
        tokenizer = TokenizerClient(settings.tokenizer, size, settings.hedge_after_s, security=security)
    if repository is not None and settings.postprocess == IN_PROCESS:
        postprocess = LocalPostprocess(Postprocessor(repository))
    else:
        postprocess = PostprocessClient(settings.postprocess, size, settings.hedge_after_s, security=security)
    return Pipeline(
        tokenizer,
        InferenceClient(
            settings.inference,
            size,
            settings.hedge_after_s,
            security=security,
            stream=uses_inference_stream(settings.inference_stream, settings.inference),
        ),
        postprocess,
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
    """Authentication first (so the others know the key), then the call's priority, then the per-key rate limit."""
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
    # Each call's priority, from its metadata under its key's default and cap; before the rate limiter, so a refusal
    # there is counted under the caller's level.
    interceptors.append(PriorityInterceptor())
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


def services(
    pipeline: Pipeline,
    management: ManagementClient,
    *,
    stream_window: int = 64,
    management_timeout_s: float = 600.0,
) -> list[tuple[Registrar, str]]:
    """What the gateway serves on one port: the native API, the Open Inference Protocol (KServe v2 / Triton clients;
    its model repository calls go to the registry) and the model lifecycle API, both forwarded to the inference
    stage's ManagementService through `management`. Tests build their gateways with this too."""
    return [
        registrar(pipeline, stream_window),
        oip_registrar(pipeline, management),
        management_registrar(management, management_timeout_s),
    ]


async def serve(settings: GatewaySettings, security: tls.ServiceTls | None = None) -> None:
    security = security or tls.load(settings)
    try:
        access = build_interceptors(settings)
    except (OSError, ValueError) as exc:  # a bad keys file stops the gateway with a message, not a traceback
        raise SystemExit(f"tandem gateway: cannot load API keys: {exc}") from None
    pipeline = build_pipeline(settings, security.channels)
    # In-process stages load their tokenizers before the gateway serves, as their processes would.
    for local in (pipeline.tokenizer, pipeline.postprocess):
        if isinstance(local, LocalTokenizer | LocalPostprocess):
            log.info("the %s stage runs in the gateway's process", local.stage)
            await asyncio.to_thread(local.core.preload)
    management = ManagementClient(settings.inference, settings.max_message_bytes, security=security.channels)

    async def close() -> None:
        await pipeline.close()
        await management.close()

    # The shared stage bootstrap, with what only the gateway has: its health follows the stages', who may call and
    # how much (after tracing and metrics, so refused calls are traced and counted), the public port's options.
    await stage.serve(
        "gateway",
        settings,
        security,
        services(
            pipeline,
            management,
            stream_window=settings.stream_window,
            management_timeout_s=settings.management_timeout_s,
        ),
        observers=[GatewayMetrics(REGISTRY, access_log_enabled=settings.access_log).observe],
        close=close,
        interceptors=access,
        health=lambda running: follow_stage_health(running, pipeline, settings.health_interval_s),
        public=True,
        options=[("grpc.max_concurrent_streams", settings.max_concurrent_streams)],
    )


def main(argv: Sequence[str] | None = None) -> None:
    stage.main("gateway", GatewaySettings, serve, argv)


if __name__ == "__main__":
    main()
