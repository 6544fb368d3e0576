"""A gRPC health probe over mTLS, for the kubelet's exec probes: exit 0 while grpc.health.v1 answers SERVING.

The kubelet's native gRPC probe speaks plaintext only, so once every listener requires TLS and a client certificate
the probes have to run inside the container. Mounted from a ConfigMap by deploy/components/mtls; needs only grpcio
and grpcio-health-checking, which the image has. Connects with the pod's own certificate, like the gateway does:

    python health_probe.py --address 127.0.0.1:50052 --server-name tandem-tokenizer --tls-dir /etc/tandem/tls

Exit status: 0 SERVING, 1 any other status or no answer (the reason on stderr, which the kubelet records as the
probe's message in the pod's events).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, server_name: str, tls_dir: Path, timeout_s: float, service: str = "") -> str:
    """The status name the server reports for `service`; raises grpc.RpcError when there is no answer."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(tls_dir / "ca.crt").read_bytes(),
        private_key=(tls_dir / "tls.key").read_bytes(),
        certificate_chain=(tls_dir / "tls.crt").read_bytes(),
    )
    # The certificate names the Service (tandem-<role>), not 127.0.0.1.
    options = [("grpc.ssl_target_name_override", server_name)]
    with grpc.secure_channel(address, credentials, options=options) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
        )
    name: str = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return name


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True, help="HOST:PORT of the server, e.g. 127.0.0.1:50052")
    parser.add_argument("--server-name", required=True, help="a DNS name the server's certificate carries")
    parser.add_argument("--tls-dir", type=Path, required=True, help="folder with tls.crt, tls.key and ca.crt")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    parser.add_argument("--service", default="", help="the service whose health to ask for ('': the server's)")
    opts = parser.parse_args(argv)
    try:
        status = check(opts.address, opts.server_name, opts.tls_dir, opts.timeout, opts.service)
    except OSError as exc:
        print(f"health probe: cannot read the certificates: {exc}", file=sys.stderr)
        return 1
    except grpc.RpcError as exc:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        print(f"health probe: {opts.address}: {code.name if code else 'no answer'}: {details}", file=sys.stderr)
        return 1
    if status != "SERVING":
        print(f"health probe: {opts.address}: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
