"""The `tandem` command: `serve` runs all four services as separate processes; each stage can also run alone."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

STAGES = ("tokenizer", "inference", "postprocess")
MODULES = {
    "tokenizer": "services.tokenizer",
    "inference": "services.inference",
    "postprocess": "services.postprocess",
    "gateway": "gateway",
}


def _die_with_parent() -> None:
    """Children get SIGTERM if `tandem serve` itself dies, so no stage outlives it."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


@dataclass
class Supervisor:
    """Starts the stage processes and the gateway, waits for health, stops them all on a signal."""

    host: str
    port: int
    repository: Path | None
    home: Path | None
    log_level: str
    tcp_stages: bool
    startup_timeout_s: float
    extra: dict[str, list[str]] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    run_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="tandem-")))

    def _spawn(self, role: str, args: list[str]) -> None:
        command = [sys.executable, "-m", MODULES[role], *args, "--log-level", self.log_level, *self.extra.get(role, [])]
        self.processes[role] = subprocess.Popen(command, preexec_fn=_die_with_parent)

    def _common(self) -> list[str]:
        args: list[str] = []
        if self.repository is not None:
            args += ["--model-repository", str(self.repository)]
        if self.home is not None:
            args += ["--home", str(self.home)]
        return args

    def start(self) -> str:
        from services.common.default_model import ensure_default_repository
        from services.common.settings import default_home

        if self.repository is None:
            # Made once here rather than racing in three processes.
            self.repository = ensure_default_repository(self.home or default_home())
        addresses: dict[str, str] = {}
        for stage in STAGES:
            listen = "127.0.0.1:0" if self.tcp_stages else f"unix:{self.run_dir / stage}.sock"
            address_file = self.run_dir / f"{stage}.address"
            self._spawn(stage, ["--listen", listen, "--address-file", str(address_file), *self._common()])
        for stage in STAGES:
            addresses[stage] = self._wait_for_file(self.run_dir / f"{stage}.address", stage)
        gateway_file = self.run_dir / "gateway.address"
        self._spawn(
            "gateway",
            [
                "--listen",
                f"{self.host}:{self.port}",
                "--address-file",
                str(gateway_file),
                "--tokenizer",
                addresses["tokenizer"],
                "--inference",
                addresses["inference"],
                "--postprocess",
                addresses["postprocess"],
            ],
        )
        gateway = self._wait_for_file(gateway_file, "gateway")
        self._wait_for_health(gateway)
        return gateway

    def _check_alive(self) -> None:
        for role, proc in self.processes.items():
            if proc.poll() is not None:
                raise RuntimeError(f"the {role} process exited with code {proc.returncode} during start-up")

    def _wait_for_file(self, path: Path, role: str) -> str:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if path.exists():
                return path.read_text().strip()
            self._check_alive()
            time.sleep(0.05)
        raise TimeoutError(f"the {role} process did not start listening within {self.startup_timeout_s:.0f}s")

    def _wait_for_health(self, address: str) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + self.startup_timeout_s
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                self._check_alive()
                with contextlib.suppress(grpc.RpcError):
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                time.sleep(0.1)
        raise TimeoutError(f"the services did not become healthy within {self.startup_timeout_s:.0f}s")

    def stop(self, grace_s: float = 15.0) -> None:
        """Gateway first (stop taking requests), then the stages; SIGKILL whatever outlives the grace period."""
        for role in ("gateway", *STAGES):
            proc = self.processes.get(role)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(grace_s if role == "gateway" else 0)
        deadline = time.monotonic() + grace_s
        for proc in self.processes.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def wait(self) -> int:
        """Blocks until a signal arrives or a process dies; returns the exit code for `tandem serve`."""
        stop = False

        def on_signal(signum: int, frame: object) -> None:
            nonlocal stop
            stop = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        while not stop:
            for role, proc in self.processes.items():
                if proc.poll() is not None:
                    print(f"tandem: the {role} process exited with code {proc.returncode}", file=sys.stderr)
                    return 1
            time.sleep(0.2)
        return 0


def serve(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="tandem serve", description="Run gateway, tokenizer, inference, postprocess.")
    parser.add_argument("--host", default="127.0.0.1", help="gateway host (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=50051, help="gateway port (default 50051; 0 picks one)")
    parser.add_argument("--model-repository", type=Path, default=None, help="default: the built-in all-MiniLM-L6-v2")
    parser.add_argument("--home", type=Path, default=None, help="cache folder (default ~/.cache/tandem)")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--tcp-stages", action="store_true", help="stages on loopback TCP instead of Unix sockets")
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for health")
    for role in MODULES:
        parser.add_argument(f"--{role}-args", default="", help=f"extra flags for the {role} process")
    opts = parser.parse_args(argv)
    supervisor = Supervisor(
        host=opts.host,
        port=opts.port,
        repository=opts.model_repository,
        home=opts.home,
        log_level=opts.log_level,
        tcp_stages=opts.tcp_stages,
        startup_timeout_s=opts.startup_timeout,
        extra={role: getattr(opts, f"{role}_args").split() for role in MODULES},
    )
    try:
        address = supervisor.start()
        print(f"tandem: serving on {address}", flush=True)
        print(
            "try:\n"
            f"  grpcurl -plaintext {address} list\n"
            f'  grpcurl -plaintext -d \'{{"inputs": ["hello world"]}}\' {address} '
            "tandem.gateway.v1.GatewayService/Embed\n"
            f'  buf curl --protocol grpc --http2-prior-knowledge --data \'{{"inputs": ["hello world"]}}\' '
            f"http://{address}/tandem.gateway.v1.GatewayService/Embed",
            flush=True,
        )
        code = supervisor.wait()
    except (RuntimeError, TimeoutError) as exc:
        print(f"tandem: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 0
    finally:
        supervisor.stop()
    return code


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: tandem {serve,bench,tokenizer,inference,postprocess,gateway} [options]"
    if not args or args[0] in ("-h", "--help"):
        print(usage)
        print("  serve        run all four services (gateway on 127.0.0.1:50051)")
        print("  tokenizer    run the tokenizer stage alone     (tandem tokenizer --help)")
        print("  inference    run the inference stage alone     (tandem inference --help)")
        print("  postprocess  run the postprocess stage alone   (tandem postprocess --help)")
        print("  gateway      run the gateway alone             (tandem gateway --help)")
        print("  bench        load a running gateway and compare with the bare model (tandem bench --help)")
        sys.exit(0 if args else 2)
    command, rest = args[0], args[1:]
    if command == "serve":
        sys.exit(serve(rest))
    if command == "bench":
        from tandem import bench

        sys.exit(bench.main(rest))
    if command in MODULES:
        os.execv(sys.executable, [sys.executable, "-m", MODULES[command], *rest])
    print(usage, file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
