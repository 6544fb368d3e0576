"""Runs a whole Tandem deployment on one host: replicas of each stage and the gateway, as separate processes.

`tandem serve` uses it; the fault tests drive it directly to kill, hang and restart replicas.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import grpc

log = logging.getLogger(__name__)

STAGES = ("tokenizer", "inference", "postprocess")
# Stages that may run inside the gateway's process instead of their own (gateway flag `--STAGE in-process`).
LIGHT_STAGES = ("tokenizer", "postprocess")
MODULES = {
    "tokenizer": "services.tokenizer",
    "inference": "services.inference",
    "postprocess": "services.postprocess",
    "gateway": "gateway",
}


def parse_in_process(text: str) -> tuple[str, ...]:
    """'tokenizer,postprocess' (or 'none') -> the light stages to run in the gateway's process."""
    names = tuple(filter(None, (p.strip() for p in text.split(","))))
    if names in ((), ("none",)):
        return ()
    for name in names:
        if name not in LIGHT_STAGES:
            raise ValueError(f"bad in-process stage {name!r}: use {', '.join(LIGHT_STAGES)} or none")
    return tuple(s for s in LIGHT_STAGES if s in names)


def parse_replicas(text: str) -> dict[str, int]:
    """'tokenizer=2,inference=2' -> counts per stage (1 for the ones not named)."""
    counts = dict.fromkeys(STAGES, 1)
    for part in filter(None, (p.strip() for p in text.split(","))):
        stage, _, number = part.partition("=")
        if stage not in STAGES or not number.isdigit() or int(number) < 1:
            raise ValueError(f"bad replica count {part!r}: use STAGE=N with STAGE in {', '.join(STAGES)}")
        counts[stage] = int(number)
    return counts


@dataclass
class Replica:
    """One process of a role; `listen` is fixed after the first bind so a restart comes back at the same address."""

    name: str
    role: str
    listen: str
    process: subprocess.Popen[bytes] | None = None
    address: str | None = None
    restarts: int = 0


@dataclass(frozen=True)
class ServeTls:
    """TLS for a whole deployment: one CA, one server identity that every process shows.

    Every stage listener requires a client certificate signed by `ca` (the gateway presents `cert`); the gateway's
    public listener does too unless `public_client_auth` is off. `server_name` is the name the stages' certificate
    is checked against (they listen on loopback or Unix sockets, whose addresses a certificate may not name).
    """

    cert: Path
    key: Path
    ca: Path
    server_name: str | None = "localhost"
    public_client_auth: bool = True

    def check(self) -> None:
        """Reads every file as the services will; raises services.common.tls.TlsError with the flag's name."""
        from services.common import tls

        tls.server_credentials(self.cert, self.key, self.ca)
        tls.channel_security(self.ca, self.cert, self.key, cert_setting="tls-cert", key_setting="tls-key")

    def args(self, role: str) -> list[str]:
        args = ["--tls-cert", str(self.cert), "--tls-key", str(self.key)]
        if role != "gateway" or self.public_client_auth:
            args += ["--tls-client-ca", str(self.ca)]
        if role == "gateway":
            args += ["--tls-ca", str(self.ca)]
            args += ["--tls-server-name", self.server_name] if self.server_name else []
        return args


@dataclass
class Supervisor:
    """Starts replicas of each stage and the gateway, waits for health, restarts what dies, stops in order."""

    host: str = "127.0.0.1"
    port: int = 50051
    repository: Path | None = None
    home: Path | None = None
    # Built-in repository only: serve SmolLM2-135M-Instruct beside all-MiniLM-L6-v2.
    chat_model: bool = True
    log_level: str = "INFO"
    tcp_stages: bool = False
    startup_timeout_s: float = 600.0
    replicas: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STAGES, 1))
    # Light stages that run inside the gateway's process (no process, no hop of their own).
    in_process: tuple[str, ...] = ()
    extra: dict[str, list[str]] = field(default_factory=dict)
    # Every process traces to this OTLP gRPC endpoint (OTEL_EXPORTER_OTLP_ENDPOINT reaches them anyway, inherited).
    otlp_endpoint: str | None = None
    tls: ServeTls | None = None
    run_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="tandem-")))
    members: dict[str, Replica] = field(default_factory=dict)
    _builtin: bool = False

    def _address_file(self, replica: Replica) -> Path:
        return self.run_dir / f"{replica.name}.address"

    def _common(self) -> list[str]:
        args: list[str] = []
        if self.repository is not None:
            args += ["--model-repository", str(self.repository)]
        if self._builtin:
            # The built-in repository holds two models; a request that names none gets the embedder.
            from services.common.default_model import DEFAULT_MODEL_NAME

            args += ["--default-model", DEFAULT_MODEL_NAME]
        if self.home is not None:
            args += ["--home", str(self.home)]
        return args

    def _args(self, replica: Replica) -> list[str]:
        args = ["--listen", replica.listen, "--address-file", str(self._address_file(replica))]
        # Each child asks the kernel to stop it when this process dies (services.common.server.exit_with_parent).
        args += ["--parent-pid", str(os.getpid())]
        if self.otlp_endpoint:
            args += ["--otlp-endpoint", self.otlp_endpoint]
        args += self.tls.args(replica.role) if self.tls is not None else []
        # The gateway gets its stage targets from spawn's extra_args; stages get the repository.
        return args if replica.role == "gateway" else args + self._common()

    def spawn(self, replica: Replica, extra_args: list[str] | None = None) -> None:
        self._address_file(replica).unlink(missing_ok=True)
        command = [
            sys.executable,
            "-m",
            MODULES[replica.role],
            *self._args(replica),
            *(extra_args or []),
            "--log-level",
            self.log_level,
            *self.extra.get(replica.role, []),
        ]
        replica.process = subprocess.Popen(command)

    def stage_target(self, stage: str) -> str:
        """One address, or an `ipv4:` list that gRPC's round_robin spreads calls over."""
        addresses = [m.address for m in self.members.values() if m.role == stage and m.address]
        if len(addresses) == 1:
            return addresses[0]
        return "ipv4:" + ",".join(a.removeprefix("ipv4:") for a in addresses)

    def start(self) -> str:
        from services.common.default_model import ensure_default_repository
        from services.common.settings import default_home

        if self.repository is None:
            # Made once here rather than racing in every stage process.
            self.repository = ensure_default_repository(self.home or default_home(), self.chat_model)
            self._builtin = True
        for stage in STAGES:
            if stage in self.in_process:
                continue
            count = self.replicas.get(stage, 1)
            for index in range(count):
                # Several replicas need distinct TCP ports (a gRPC target lists many ip:port, not many sockets).
                unix = not self.tcp_stages and count == 1
                listen = f"unix:{self.run_dir / stage}.sock" if unix else "127.0.0.1:0"
                replica = Replica(f"{stage}-{index}", stage, listen)
                self.members[replica.name] = replica
                self.spawn(replica)
        for replica in list(self.members.values()):
            self._settle(replica)
        # Every replica, not just one per stage: the gateway's first calls may go to any of them (an inference
        # replica answers NOT_SERVING until its models are warm).
        for replica in list(self.members.values()):
            assert replica.address is not None
            self.wait_for_health(replica.address)
        gateway = Replica("gateway-0", "gateway", f"{self.host}:{self.port}")
        self.members[gateway.name] = gateway
        self.spawn(gateway, self._gateway_args())
        self._settle(gateway)
        assert gateway.address is not None
        self.wait_for_health(gateway.address)
        return gateway.address

    def _gateway_args(self) -> list[str]:
        args: list[str] = []
        for stage in STAGES:
            args += [f"--{stage}", "in-process" if stage in self.in_process else self.stage_target(stage)]
        # The stages in the gateway's process read the repository as their own processes would.
        return args + (self._common() if self.in_process else [])

    def _settle(self, replica: Replica) -> None:
        """Waits for the replica's bound address and pins it, so a restart binds the same one."""
        path = self._address_file(replica)
        deadline = time.monotonic() + self.startup_timeout_s
        while not path.exists():
            if replica.process is not None and replica.process.poll() is not None:
                raise RuntimeError(f"{replica.name} exited with code {replica.process.returncode} during start-up")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{replica.name} did not start listening within {self.startup_timeout_s:.0f}s")
            time.sleep(0.05)
        replica.address = path.read_text().strip()
        replica.listen = replica.address if not replica.address.startswith("unix:") else replica.listen

    def wait_for_health(self, address: str, timeout_s: float | None = None) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + (timeout_s or self.startup_timeout_s)
        with self._channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                for replica in self.members.values():
                    if replica.process is not None and replica.process.poll() is not None and replica.restarts == 0:
                        raise RuntimeError(f"{replica.name} exited with code {replica.process.returncode}")
                with contextlib.suppress(grpc.RpcError):
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                time.sleep(0.1)
        raise TimeoutError(f"{address} did not become healthy in time")

    def _channel(self, address: str) -> grpc.Channel:
        """A blocking channel for health checks: with TLS, the same CA, client identity and server name as the
        gateway's stage links (the supervisor must pass every listener's client-certificate check)."""
        import grpc

        if self.tls is None:
            return grpc.insecure_channel(address)
        from services.common import tls

        security = tls.channel_security(
            self.tls.ca,
            self.tls.cert,
            self.tls.key,
            self.tls.server_name,
            cert_setting="tls-cert",
            key_setting="tls-key",
        )
        assert security is not None
        return grpc.secure_channel(address, security.credentials, security.options(address))

    def restart(self, name: str) -> None:
        """Starts a replica again at its pinned address (after it died or was stopped)."""
        replica = self.members[name]
        if replica.process is not None and replica.process.poll() is None:
            raise RuntimeError(f"{name} is still running")
        replica.restarts += 1
        self.spawn(replica, self._gateway_args() if replica.role == "gateway" else None)
        self._settle(replica)

    def terminate(self, name: str, grace_s: float = 30.0) -> None:
        """Graceful stop of one replica: SIGTERM, then it drains and exits."""
        replica = self.members[name]
        if replica.process is None or replica.process.poll() is not None:
            return
        replica.process.send_signal(signal.SIGTERM)
        try:
            replica.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            replica.process.kill()
            replica.process.wait()

    def stop(self, grace_s: float = 15.0) -> None:
        """Gateway first (stop taking requests), then the stages; SIGKILL whatever outlives the grace period."""
        order = sorted(self.members.values(), key=lambda r: r.role != "gateway")
        for replica in order:
            proc = replica.process
            if proc is None or proc.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)  # a stopped (hung) process cannot handle SIGTERM otherwise
                proc.send_signal(signal.SIGTERM)
            if replica.role == "gateway":
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(grace_s)
        deadline = time.monotonic() + grace_s
        for replica in order:
            proc = replica.process
            if proc is None:
                continue
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def watch(self, should_stop: Callable[[], bool], poll_s: float = 0.2) -> None:
        """Restarts any replica that dies (with backoff), until `should_stop()`; like a tiny kubelet."""
        next_try: dict[str, float] = {}
        while not should_stop():
            for name, replica in self.members.items():
                proc = replica.process
                if proc is None or proc.poll() is None:
                    continue
                now = time.monotonic()
                if now < next_try.get(name, 0.0):
                    continue
                log.warning("%s exited with code %s; restarting", name, proc.returncode)
                print(f"tandem: {name} exited with code {proc.returncode}; restarting", file=sys.stderr, flush=True)
                next_try[name] = now + min(30.0, 2.0 ** min(replica.restarts, 5))
                try:
                    self.restart(name)
                except (RuntimeError, TimeoutError) as exc:
                    print(f"tandem: restarting {name} failed: {exc}", file=sys.stderr, flush=True)
            time.sleep(poll_s)
