"""Shows one request's trace: a stand-in OTLP collector, `tandem serve --otlp-endpoint`, one Embed, the span tree.

    python scripts/trace_demo.py [--model-repository DIR] [--home DIR]

Prints every span of the request's trace as a tree (service, span name, duration in ms), from what the four
processes exported over OTLP gRPC: a check that tracing crosses every hop, and a picture of where time goes.
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import time
from concurrent import futures
from dataclasses import dataclass

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tandem.gateway.v1 import gateway_pb2, gateway_pb2_grpc


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    start_ns: int
    end_ns: int


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every exported span in memory."""

    def __init__(self) -> None:
        self.spans: list[Span] = []

    def Export(  # noqa: N802
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for rs in request.resource_spans:
            service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "?")
            for ss in rs.scope_spans:
                for s in ss.spans:
                    self.spans.append(
                        Span(
                            service,
                            s.name,
                            s.trace_id.hex(),
                            s.span_id.hex(),
                            s.parent_span_id.hex(),
                            s.start_time_unix_nano,
                            s.end_time_unix_nano,
                        )
                    )
        return trace_service_pb2.ExportTraceServiceResponse()


def print_tree(spans: list[Span]) -> None:
    children: dict[str, list[Span]] = {}
    ids = {s.span_id for s in spans}
    for s in spans:
        children.setdefault(s.parent_id if s.parent_id in ids else "", []).append(s)

    def show(parent: str, depth: int) -> None:
        for s in sorted(children.get(parent, []), key=lambda x: x.start_ns):
            ms = (s.end_ns - s.start_ns) / 1e6
            print(f"{'  ' * depth}{s.name:<{60 - 2 * depth}} {s.service:<18} {ms:8.2f} ms")
            show(s.span_id, depth + 1)

    show("", 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", default=None)
    parser.add_argument("--home", default=None)
    parser.add_argument("--model", default="")
    parser.add_argument("--text", default="hello world")
    parser.add_argument("--warm-up", type=int, default=20, help="untraced-by-us calls first (caches, first batches)")
    opts = parser.parse_args()

    collector = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    command = [sys.executable, "-m", "tandem.cli", "serve", "--port", "0", "--log-level", "WARNING"]
    command += ["--otlp-endpoint", f"http://127.0.0.1:{port}"]
    command += ["--model-repository", opts.model_repository] if opts.model_repository else []
    command += ["--home", opts.home] if opts.home else []
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        address = None
        assert proc.stdout is not None
        for line in proc.stdout:
            found = re.search(r"serving on (\S+)", line)
            if found:
                address = found.group(1)
                break
        if address is None:
            print("tandem serve did not start", file=sys.stderr)
            return 1
        trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
        with grpc.insecure_channel(address) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            request = gateway_pb2.EmbedRequest(model=opts.model, inputs=[opts.text])
            for _ in range(opts.warm_up):
                stub.Embed(request)
            reply, call = stub.Embed.with_call(
                request, metadata=(("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01"),)
            )
            timing = str(dict(call.trailing_metadata() or ()).get("x-tandem-timing", ""))
        print(f"Embed({opts.text!r}) -> {len(reply.embeddings[0].values)} dims; x-tandem-timing: {timing}")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    time.sleep(0.5)
    server.stop(0)
    spans = [s for s in collector.spans if s.trace_id == trace_id]
    print(f"trace {trace_id}: {len(spans)} spans from {len({s.service for s in spans})} services")
    print_tree(spans)
    return 0


if __name__ == "__main__":
    sys.exit(main())
