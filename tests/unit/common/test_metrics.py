"""Metrics, timing trailers and the access log without a server: settings, where /metrics binds, trailer text."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry

from services.common import timing
from services.common.metrics import (
    GatewayMetrics,
    metrics_host,
    serve_metrics,
)
from services.common.settings import ServiceSettings


def test_metrics_are_off_unless_a_port_is_set() -> None:
    assert ServiceSettings.from_args([], "t").metrics_port is None
    assert serve_metrics(CollectorRegistry(), "127.0.0.1:0", None) is None
    assert ServiceSettings.from_args(["--metrics-port", "0"], "t").metrics_port == 0


@pytest.mark.parametrize(
    ("listen", "host"),
    [("127.0.0.1:50051", "127.0.0.1"), ("0.0.0.0:50051", "0.0.0.0"), ("[::1]:5", "::1"), ("unix:/tmp/s", "127.0.0.1")],
)
def test_metrics_bind_where_grpc_listens(listen: str, host: str) -> None:
    assert metrics_host(listen) == host


def test_timings_round_trip() -> None:
    text = timing.format_timings({"total": 0.0051, "postprocess": 0.0003, "tokenize": 0.00041})
    assert text == "tokenize=0.41ms, postprocess=0.30ms, total=5.10ms"
    assert timing.parse_timings(text + ", junk, x=1s") == pytest.approx(
        {"tokenize": 0.00041, "postprocess": 0.0003, "total": 0.0051}
    )


def test_the_access_log_can_be_turned_off(caplog: pytest.LogCaptureFixture) -> None:
    record = timing.CallRecord({"tokenize": 0.001, "total": 0.002}, {"inputs": 1, "served_model": "m"})
    with caplog.at_level(logging.INFO, logger="tandem.access"):
        GatewayMetrics(CollectorRegistry(), access_log_enabled=False).observe("/x/Y", "OK", 0.002, record)
        assert not caplog.records
        GatewayMetrics(CollectorRegistry()).observe("/x/Y", "OK", 0.002, record)
    (line,) = caplog.records
    assert getattr(line, "fields") == {  # noqa: B009
        "method": "/x/Y",
        "code": "OK",
        "inputs": 1,
        "model": "m",
        "tokenize_ms": 1.0,
        "total_ms": 2.0,
    }
