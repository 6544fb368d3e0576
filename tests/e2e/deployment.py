"""Runs `tandem serve` as a real subprocess tree for end-to-end tests, and always tears it down."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

READY_PREFIX = "tandem: serving on "


@contextmanager
def tandem_serve(
    home: Path,
    repository: Path | None = None,
    extra: list[str] | None = None,
    timeout_s: float = 300,
    chat_model: bool = False,
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """Yields (gateway address, process); the four services are separate OS processes. On the built-in repository
    the chat model is left out unless `chat_model` (its first start converts the GGUF and it holds ~1 GB; only the
    tests of the chat model need it)."""
    command = [
        sys.executable,
        "-m",
        "tandem.cli",
        "serve",
        "--port",
        "0",
        "--home",
        str(home),
        "--log-level",
        "WARNING",
    ]
    if repository is not None:
        command += ["--model-repository", str(repository)]
    elif not chat_model:
        command += ["--no-chat-model"]
    command += extra or []
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    address: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(READY_PREFIX) and not address:
                address.append(line[len(READY_PREFIX) :].strip())
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        deadline = time.monotonic() + timeout_s
        while not ready.wait(0.2):
            if time.monotonic() > deadline:
                raise TimeoutError("tandem serve did not become ready")
        if not address:
            raise RuntimeError(f"tandem serve exited with {proc.wait()} before becoming ready")
        yield address[0], proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
