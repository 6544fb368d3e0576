"""The `tandem` command: `serve` runs all four services as separate processes; each stage can also run alone."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from tandem.cli.supervisor import MODULES, ServeTls, Supervisor, parse_in_process, parse_replicas


def serve(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="tandem serve", description="Run gateway, tokenizer, inference, postprocess.")
    parser.add_argument("--host", default="127.0.0.1", help="gateway host (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=50051, help="gateway port (default 50051; 0 picks one)")
    parser.add_argument(
        "--model-repository",
        type=Path,
        default=None,
        help="default: the built-in models, all-MiniLM-L6-v2 (the default model) and SmolLM2-135M-Instruct (chat)",
    )
    parser.add_argument(
        "--no-chat-model",
        action="store_true",
        help="built-in repository: serve the embedder alone, without the chat model (small machines, embed-only)",
    )
    parser.add_argument("--home", type=Path, default=None, help="cache folder (default ~/.cache/tandem)")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument(
        "--otlp-endpoint",
        default=None,
        help="send traces of every process over OTLP gRPC, e.g. http://127.0.0.1:4317 (or OTEL_EXPORTER_OTLP_ENDPOINT)",
    )
    parser.add_argument("--tcp-stages", action="store_true", help="stages on loopback TCP instead of Unix sockets")
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for health")
    parser.add_argument(
        "--replicas", default="", help="processes per stage, e.g. tokenizer=2,inference=2,postprocess=1 (default 1)"
    )
    parser.add_argument(
        "--in-process",
        default="none",
        help="light stages to run inside the gateway's process: tokenizer,postprocess, one of them, or none (each "
        "its own process; the default). In-process saves a hop per stage on every request (docs/performance.md)",
    )
    parser.add_argument(
        "--api-keys-file", type=Path, default=None, help="gateway API keys, 'KEY [SCOPES]' a line (default: no auth)"
    )
    for role in MODULES:
        parser.add_argument(f"--{role}-args", default="", help=f"extra flags for the {role} process(es)")
    tls_group = parser.add_argument_group(
        "TLS", "all three set: TLS on every listener and link, mTLS (client certificates signed by --tls-ca) on each"
    )
    tls_group.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate every process serves")
    tls_group.add_argument("--tls-key", type=Path, default=None, help="its PEM private key")
    tls_group.add_argument("--tls-ca", type=Path, default=None, help="PEM CA that signs servers' and clients' certs")
    tls_group.add_argument(
        "--tls-server-name", default="localhost", help="name the stages' certificate is checked for (default localhost)"
    )
    tls_group.add_argument(
        "--tls-no-public-client-auth",
        action="store_true",
        help="the gateway's public port takes clients without a certificate (TLS only); stage links stay mTLS",
    )
    opts = parser.parse_args(argv)
    extra = {role: getattr(opts, f"{role}_args").split() for role in MODULES}
    if opts.api_keys_file is not None:
        extra["gateway"] += ["--api-keys-file", str(opts.api_keys_file.resolve())]
    try:
        replicas = parse_replicas(opts.replicas)
        in_process = parse_in_process(opts.in_process)
    except ValueError as exc:
        parser.error(str(exc))
    for stage in in_process:
        if replicas[stage] > 1:
            parser.error(f"--replicas {stage}={replicas[stage]}: the {stage} stage runs in the gateway's process")
        if extra[stage]:
            parser.error(f"--{stage}-args: the {stage} stage runs in the gateway's process; use --gateway-args")
    tls: ServeTls | None = None
    tls_paths = (opts.tls_cert, opts.tls_key, opts.tls_ca)
    if any(p is not None for p in tls_paths):
        if not all(p is not None for p in tls_paths):
            parser.error("TLS needs all three of --tls-cert, --tls-key and --tls-ca")
        tls = ServeTls(
            opts.tls_cert, opts.tls_key, opts.tls_ca, opts.tls_server_name or None, not opts.tls_no_public_client_auth
        )
        from services.common.tls import TlsError

        try:
            tls.check()
        except TlsError as exc:
            parser.error(str(exc))
    supervisor = Supervisor(
        host=opts.host,
        port=opts.port,
        repository=opts.model_repository,
        home=opts.home,
        chat_model=not opts.no_chat_model,
        log_level=opts.log_level,
        tcp_stages=opts.tcp_stages,
        startup_timeout_s=opts.startup_timeout,
        replicas=replicas,
        in_process=in_process,
        otlp_endpoint=opts.otlp_endpoint,
        extra=extra,
        tls=tls,
    )
    try:
        address = supervisor.start()
        print(f"tandem: serving on {address}", flush=True)
        print(try_lines(address, tls), flush=True)
        stop = False

        def on_signal(signum: int, frame: object) -> None:
            nonlocal stop
            stop = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        supervisor.watch(lambda: stop)
        code = 0
    except (RuntimeError, TimeoutError) as exc:
        print(f"tandem: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 0
    finally:
        supervisor.stop()
    return code


def try_lines(address: str, tls: ServeTls | None) -> str:
    """Commands to try against the gateway just started, with the certificate flags TLS needs."""
    data = '\'{"inputs": ["hello world"]}\''
    if tls is None:
        grpcurl, buf, scheme = "grpcurl -plaintext", "buf curl --protocol grpc --http2-prior-knowledge", "http"
    else:
        # Any client certificate the CA signed will do; tandem/cli/devcerts.py writes one next to the CA.
        cert, key = tls.ca.parent / "client.pem", tls.ca.parent / "client-key.pem"
        if not cert.exists():
            cert, key = Path("CLIENT.pem"), Path("CLIENT-KEY.pem")
        client = f" -cert {cert} -key {key}" if tls.public_client_auth else ""
        grpcurl = f"grpcurl -cacert {tls.ca}{client}"
        buf = f"buf curl --protocol grpc --cacert {tls.ca}{client.replace(' -', ' --')}"
        scheme = "https"
    return (
        "try:\n"
        f"  {grpcurl} {address} list\n"
        f"  {grpcurl} -d {data} {address} tandem.gateway.v1.GatewayService/Embed\n"
        f"  {buf} --data {data} {scheme}://{address}/tandem.gateway.v1.GatewayService/Embed"
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: tandem {serve,models,bench,generate,chat,tokenizer,inference,postprocess,gateway} [options]"
    if not args or args[0] in ("-h", "--help"):
        print(usage)
        print("  serve        run all four services (gateway on 127.0.0.1:50051)")
        print("  tokenizer    run the tokenizer stage alone     (tandem tokenizer --help)")
        print("  inference    run the inference stage alone     (tandem inference --help)")
        print("  postprocess  run the postprocess stage alone   (tandem postprocess --help)")
        print("  gateway      run the gateway alone             (tandem gateway --help)")
        print("  models       manage a model repository: add, export, quantize, list, alias, promote, remove")
        print("  bench        load a running gateway and compare with the bare model (tandem bench --help)")
        print("  generate     stream one generation from a running gateway   (tandem generate --help)")
        print("  chat         chat with a running gateway's generation model (tandem chat --help)")
        sys.exit(0 if args else 2)
    command, rest = args[0], args[1:]
    from services.common import diagnostics

    diagnostics.install()  # SIGUSR1: every thread's stack, to stderr (the stages add their asyncio tasks)
    if command == "serve":
        sys.exit(serve(rest))
    if command == "models":
        from tandem.cli import models as models_cli

        sys.exit(models_cli.main(rest))
    if command == "bench":
        from tandem.bench import run as bench

        sys.exit(bench.main(rest))
    if command == "generate":
        from tandem.cli import generate

        sys.exit(generate.main(rest))
    if command == "chat":
        from tandem.cli import chat

        sys.exit(chat.main(rest))
    if command in MODULES:
        os.execv(sys.executable, [sys.executable, "-m", MODULES[command], *rest])
    print(usage, file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
