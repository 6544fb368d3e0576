"""The gateway's request limits without a server: the per-key token bucket, what a request costs, the settings."""

from __future__ import annotations

import pytest

from gateway.limits import RateLimiter, request_cost
from gateway.settings import GatewaySettings
from tandem.gateway.v1 import gateway_pb2
from tandem.oip.v2 import grpc_service_pb2 as oip


def test_the_bucket_refills_and_big_requests_go_into_debt() -> None:
    now = [0.0]
    limiter = RateLimiter(rate=10, burst=5, clock=lambda: now[0])
    assert limiter.take("a", 5) == 0
    assert limiter.take("a", 1) == pytest.approx(0.1)  # empty: one text needs 0.1 s
    assert limiter.take("b", 5) == 0  # callers have their own buckets
    now[0] = 0.3
    assert limiter.take("a", 3) == 0  # refilled by 3
    # A request bigger than the bucket waits for a full bucket, then leaves a debt.
    now[0] = 10.0
    assert limiter.take("a", 25) == 0
    assert limiter.take("a", 1) == pytest.approx(2.1)  # 20 texts of debt, then 1
    now[0] = 12.2
    assert limiter.take("a", 1) == 0


def test_idle_callers_are_forgotten_when_there_are_many() -> None:
    now = [0.0]
    limiter = RateLimiter(rate=1, burst=2, clock=lambda: now[0], max_callers=3)
    for caller in "abc":
        limiter.take(caller, 1)
    now[0] = 5.0  # all full again
    limiter.take("d", 1)
    assert set(limiter._buckets) == {"d"}


def test_cost_counts_texts() -> None:
    assert request_cost(gateway_pb2.EmbedRequest(inputs=["a", "b"])) == 2
    assert request_cost(gateway_pb2.RerankRequest(query="q", documents=["a", "b", "c"])) == 3
    assert request_cost(gateway_pb2.ListModelsRequest()) == 1
    assert request_cost(gateway_pb2.EmbedRequest()) == 1
    assert request_cost(gateway_pb2.EmbedStreamRequest(request=gateway_pb2.EmbedRequest(inputs=["a"] * 4))) == 4
    text = oip.ModelInferRequest.InferInputTensor(
        name="text", datatype="BYTES", shape=[2, 1], contents=oip.InferTensorContents(bytes_contents=[b"a", b"b"])
    )
    assert request_cost(oip.ModelInferRequest(model_name="tiny-embed", inputs=[text])) == 2


def test_limits_are_settings() -> None:
    settings = GatewaySettings.from_args(
        [
            "--max-input-chars=500",
            "--max-concurrent-streams=8",
            "--rate-limit-texts-per-s=100",
            "--rate-limit-burst=50",
            "--api-keys=k1 admin;k2",
            "--no-auth-open-reflection",
        ],
        "tandem gateway",
    )
    assert (settings.max_input_chars, settings.max_concurrent_streams) == (500, 8)
    assert (settings.rate_limit_texts_per_s, settings.rate_limit_burst) == (100, 50)
    assert settings.api_keys is not None and "k1" not in repr(settings)
    assert not settings.auth_open_reflection and settings.auth_open_health
    defaults = GatewaySettings()
    assert (defaults.max_input_chars, defaults.rate_limit_texts_per_s, defaults.api_keys_file) == (100_000, 0, None)
