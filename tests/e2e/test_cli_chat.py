"""`tandem generate` and `tandem chat` (tandem/cli/generate.py, chat.py) as processes against a live `tandem serve` of
tiny-llama-chat (tests/fixtures/tiny_causal.py): one-shot answers from an argument or stdin, a chat in a pipe and at
a pseudo-terminal (history, /reset), and Ctrl-C mid-answer, which must cancel the generation on the server (the
inference stage's /metrics shows no running sequence, and fewer tokens generated than asked for) and keep the
session."""

from __future__ import annotations

import codecs
import contextlib
import fcntl
import os
import re
import select
import signal
import socket
import subprocess
import sys
import termios
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.deployment import tandem_serve
from tests.fixtures import tiny_causal

pytestmark = pytest.mark.e2e

MODEL = "tiny-llama-chat"
QUESTION = "sun 🍎 moon"
ANSWER = tiny_causal.expected_continuation(QUESTION, chat=True)  # "猫 star 東京 café 🐍 rain 🌊"
CLI = [sys.executable, "-m", "tandem.cli"]
# Plain output whatever the terminal: the tests read text, not escape sequences (ANSI is also stripped below).
ENV = dict(os.environ, PYTHONIOENCODING="utf-8", PYTHONUNBUFFERED="1", NO_COLOR="1", TERM="dumb")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@dataclass(frozen=True)
class Served:
    address: str
    metrics_url: str
    pid: int  # tandem serve's

    def dump_stacks(self) -> None:
        """SIGUSR1 to the four services (services/common/diagnostics.py): their threads and asyncio tasks go to their
        stderr, which pytest shows with the failure."""
        children = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        for pid in children.read_text().split() if children.exists() else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGUSR1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """`tandem serve` with only tiny-llama-chat, the inference stage's /metrics on a port of its own."""
    repository = tmp_path_factory.mktemp("generation-repository")
    tiny_causal.make_llama_chat(repository)
    port = free_port()
    extra = ["--inference-args", f"--metrics-port {port}"]
    with tandem_serve(tmp_path_factory.mktemp("home"), repository=repository, extra=extra) as (address, proc):
        yield Served(address, f"http://127.0.0.1:{port}/metrics", proc.pid)


def tandem(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], input=stdin, capture_output=True, text=True, encoding="utf-8", env=ENV, timeout=60
    )


SAMPLE = re.compile(r"^(\w+)\{(.*)\} (\S+)$", re.MULTILINE)
LABEL = re.compile(r'(\w+)="([^"]*)"')
INFERENCE_GENERATE = "/tandem.inference.v1.InferenceService/Generate"


def metric(served: Served, name: str, *, required: bool = True, labels: dict[str, str] | None = None) -> float:
    """The sum of `name`'s samples with `labels` (default model=MODEL) in the inference stage's /metrics; a counter
    not yet counted (no sample: `required=False`) is 0."""
    with urllib.request.urlopen(served.metrics_url, timeout=5) as reply:
        text = reply.read().decode()
    wanted = labels or {"model": MODEL}
    values = [
        float(value)
        for sample, label_text, value in SAMPLE.findall(text)
        if sample == name and wanted.items() <= dict(LABEL.findall(label_text)).items()
    ]
    assert values or not required, f"{name} {wanted} not in /metrics"
    return sum(values)


def settled(served: Served) -> None:
    """Waits (up to 10 s) until the inference stage runs no sequence of MODEL."""
    deadline = time.monotonic() + 10
    while metric(served, "tandem_generation_running_sequences") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(served, "tandem_generation_running_sequences") == 0


def verbose_fields(text: str) -> list[dict[str, str]]:
    """The -v lines (`key=value ...` with finish_reason) in the order they came."""
    return [
        dict(pair.split("=", 1) for pair in line.split())
        for line in text.splitlines()
        if "finish_reason=" in line and line.strip()
    ]


# ----------------------------------------------------------------------------------------------------------------------
# tandem generate


def test_generate_streams_the_answer(served: Served) -> None:
    done = tandem("generate", "--chat", QUESTION, "--model", MODEL, "--addr", served.address, "-v")
    assert done.returncode == 0, done.stderr
    assert done.stdout == ANSWER + "\n"
    [fields] = verbose_fields(done.stderr)
    assert fields["finish_reason"] == "stop" and fields["model"] == f"{MODEL}:1"
    assert int(fields["generated_tokens"]) > 0 and int(fields["prompt_tokens"]) > 0


@pytest.mark.parametrize("prompt_arg", [["-"], []], ids=["dash", "no-prompt"])
def test_generate_reads_the_prompt_from_stdin(served: Served, prompt_arg: list[str]) -> None:
    done = tandem(
        "generate", *prompt_arg, "--chat", "--model", MODEL, "--target", served.address, stdin=QUESTION + "\n"
    )
    assert done.returncode == 0, done.stderr
    assert (done.stdout, done.stderr) == (ANSWER + "\n", "")


def test_generate_without_model_picks_the_generation_model(served: Served) -> None:
    done = tandem("generate", "--chat", QUESTION, "--system", "Be brief.", "--addr", served.address)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ANSWER + "\n"


def test_generate_reports_errors_on_stderr(served: Served) -> None:
    done = tandem("generate", QUESTION, "--model", "no-such-model", "--addr", served.address)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith("tandem generate: NOT_FOUND")


# ----------------------------------------------------------------------------------------------------------------------
# tandem chat in a pipe


def test_chat_in_a_pipe_keeps_history_and_resets(served: Served) -> None:
    lines = [QUESTION, QUESTION, "/reset", QUESTION, "/exit", QUESTION]
    done = tandem(
        "chat", "-v", "--model", MODEL, "--max-new-tokens", "40", "--addr", served.address, stdin="\n".join(lines)
    )
    assert done.returncode == 0, done.stderr
    # Plain text: each answer on its line and nothing else (no prompt, banner or notice); nothing after /exit.
    assert done.stdout.startswith(ANSWER + "\n") and done.stdout.endswith("\n" + ANSWER + "\n")
    first, second, third = verbose_fields(done.stderr)
    assert (first["messages"], second["messages"], third["messages"]) == ("1", "3", "1")
    # The second question was sent after the first exchange; /reset sent the third alone again.
    assert int(second["prompt_tokens"]) > int(first["prompt_tokens"]) == int(third["prompt_tokens"])


# ----------------------------------------------------------------------------------------------------------------------
# tandem chat at a terminal


def _take_terminal() -> None:
    """In the child, after setsid: make stdin (the pty) the controlling terminal, so ^C sends it SIGINT."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """`tandem ARGS...` on a pseudo-terminal: what it prints as the user would see it (ANSI and \\r dropped).
    `on_timeout` runs when an expect() times out, before the failure is raised (the servers' stack dumps)."""

    def __init__(self, *args: str, on_timeout: Callable[[], None] = lambda: None) -> None:
        self.on_timeout = on_timeout
        master, slave = os.openpty()
        self.proc = subprocess.Popen(
            [*CLI, *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=ENV,
            start_new_session=True,
            preexec_fn=_take_terminal,
        )
        os.close(slave)
        self.fd = master
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.seen = ""  # output not yet consumed by expect()

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def expect(self, pattern: str, timeout: float = 30) -> str:
        """Reads until the output since the last expect() matches `pattern` (a regex); returns that output, all of
        it: nothing is left for the next expect()."""
        deadline = time.monotonic() + timeout
        while True:
            text = ANSI.sub("", self.seen).replace("\r", "")
            if re.search(pattern, text):
                self.seen = ""
                return text
            chunk = self._read(deadline - time.monotonic())
            if chunk is None:
                raise AssertionError(f"no {pattern!r} within {timeout} s; output: {text!r}{self.stacks()}")
            if not chunk:
                raise AssertionError(f"chat exited ({self.proc.wait()}) before {pattern!r}; output: {text!r}")
            self.seen += self.decoder.decode(chunk)

    def _read(self, left: float) -> bytes | None:
        """What the command wrote next: None if nothing within `left` seconds, b"" once it has gone."""
        if left <= 0 or not select.select([self.fd], [], [], left)[0]:
            return None
        try:
            return os.read(self.fd, 65536)
        except OSError:  # EIO: the child has gone
            return b""

    def stacks(self) -> str:
        """Where the command and the servers are stuck: SIGUSR1 to each (tandem's processes then write their threads'
        stacks, and the servers their asyncio tasks, to stderr); the command's, read back from the terminal."""
        self.on_timeout()
        if self.proc.poll() is not None:
            return ""
        os.kill(self.proc.pid, signal.SIGUSR1)
        dump, deadline = "", time.monotonic() + 2
        while chunk := self._read(deadline - time.monotonic()):
            dump += self.decoder.decode(chunk)
        return f"\n--- the command's threads (SIGUSR1):\n{dump.replace(chr(13), '')}"

    def prompt(self, timeout: float = 30) -> str:
        """Everything up to the next `> ` prompt (which chat prints only once an answer is done)."""
        return self.expect(r"(^|\n)> $", timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.fd)


@pytest.fixture
def terminal(served: Served) -> Iterator[type[Terminal]]:
    opened: list[Terminal] = []

    class Opened(Terminal):
        def __init__(self, *args: str) -> None:
            super().__init__(*args, on_timeout=served.dump_stacks)
            opened.append(self)

    yield Opened
    for t in opened:
        t.close()


def test_chat_at_a_terminal_streams_keeps_history_and_resets(served: Served, terminal: type[Terminal]) -> None:
    chat = terminal("chat", "-v", "--model", MODEL, "--max-new-tokens", "40", "--addr", served.address)
    assert "/reset" in chat.prompt()  # the banner
    chat.send(QUESTION + "\n")
    first = chat.prompt()
    assert f"{QUESTION}\n{ANSWER}\n" in first  # the echoed line, then the answer
    chat.send(QUESTION + "\n")
    second = chat.prompt()
    chat.send("/reset\n")
    assert "(conversation cleared)" in chat.prompt()
    chat.send(QUESTION + "\n")
    third = chat.prompt()
    assert f"{ANSWER}\n" in third
    [f1], [f2], [f3] = verbose_fields(first), verbose_fields(second), verbose_fields(third)
    assert (f1["messages"], f2["messages"], f3["messages"]) == ("1", "3", "1")
    assert int(f2["prompt_tokens"]) > int(f1["prompt_tokens"]) == int(f3["prompt_tokens"])
    chat.send("/exit\n")
    assert chat.proc.wait(10) == 0


def test_sigusr1_writes_the_chat_s_threads_and_the_session_goes_on(served: Served, terminal: type[Terminal]) -> None:
    """What a failed expect() adds to its message (Terminal.stacks), and what a person sends a stuck command."""
    chat = terminal("chat", "--model", MODEL, "--max-new-tokens", "40", "--addr", served.address)
    chat.prompt()
    dump = chat.stacks()
    assert "(most recent call first)" in dump and "tandem/cli/chat.py" in dump, dump
    chat.send(QUESTION + "\n")
    assert f"{ANSWER}\n" in chat.prompt()
    chat.send("/exit\n")
    assert chat.proc.wait(10) == 0


def test_ctrl_c_cancels_the_answer_on_the_server_and_keeps_the_session(
    served: Served, terminal: type[Terminal]
) -> None:
    max_new = 200
    chat = terminal(
        "chat", "-v", "--model", MODEL, "--max-new-tokens", str(max_new), "--ignore-eos", "--addr", served.address
    )
    chat.prompt()
    settled(served)
    tokens_before = metric(served, "tandem_generation_tokens_total", required=False)
    cancelled = {"method": INFERENCE_GENERATE, "code": "CANCELLED"}
    cancelled_before = metric(served, "tandem_requests_total", required=False, labels=cancelled)
    chat.send(QUESTION + "\n")
    chat.expect(ANSWER.split()[0])  # the answer has begun streaming
    chat.send("\x03")
    interrupted = chat.prompt()
    assert "interrupted" in interrupted and "finish_reason=" not in interrupted
    assert chat.proc.poll() is None  # the session goes on

    # The server saw the call cancelled and dropped the sequence: none runs, the inference stage counts a CANCELLED
    # Generate, and fewer tokens were generated than the answer would have had.
    settled(served)
    assert metric(served, "tandem_requests_total", labels=cancelled) == cancelled_before + 1
    assert metric(served, "tandem_generation_tokens_total", required=False) - tokens_before < max_new

    # The next question is answered in full, and alone: the cancelled turn did not join the conversation.
    chat.send(QUESTION + "\n")
    whole = chat.prompt(timeout=60)
    assert f"\n{ANSWER}" in whole
    [fields] = verbose_fields(whole)
    assert (fields["messages"], fields["generated_tokens"], fields["finish_reason"]) == ("1", str(max_new), "length")

    # Ctrl-C at the prompt quits. Not at once after the prompt shows: CPython's readline prints the prompt before it
    # waits in select(), and a SIGINT between the two only sets Python's flag (select() is not interrupted), so the
    # process would go on waiting for a line. A person cannot type that fast; a test can.
    time.sleep(0.2)
    chat.send("\x03")
    assert chat.proc.wait(10) == 0


def test_ctrl_c_stops_generate(served: Served, terminal: type[Terminal]) -> None:
    args = ["--chat", "--model", MODEL, "--max-new-tokens", "200", "--ignore-eos", "--addr", served.address]
    settled(served)
    cancelled = {"method": INFERENCE_GENERATE, "code": "CANCELLED"}
    cancelled_before = metric(served, "tandem_requests_total", required=False, labels=cancelled)
    generate = terminal("generate", QUESTION, *args)
    generate.expect(ANSWER.split()[0])
    generate.send("\x03")
    assert "interrupted" in generate.expect("interrupted.*\n")
    assert generate.proc.wait(10) == 130
    settled(served)
    assert metric(served, "tandem_requests_total", labels=cancelled) == cancelled_before + 1


def test_tandem_help_lists_generate_and_chat() -> None:
    done = tandem("--help")
    assert "generate" in done.stdout and "chat" in done.stdout
    assert "first ready text-generation model" in " ".join(tandem("generate", "--help").stdout.split())
