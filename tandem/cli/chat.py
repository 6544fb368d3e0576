"""`tandem chat`: a conversation with a running gateway's text-generation model, one line per question.

The conversation (a system message if --system, then the user and assistant turns) is kept and sent whole as
`messages` with every question, so the model's chat template renders it. Each answer streams as it is written.
Ctrl-C while an answer streams cancels that call (the server stops generating) and drops the turn: neither the
question nor the partial answer joins the conversation, and the session goes on. Ctrl-C at the prompt, Ctrl-D (end
of input) or /exit quits; /reset starts the conversation again.

With stdout a terminal it shows a `> ` prompt, line editing and colours; otherwise (a pipe) it reads lines from stdin
and writes each answer as one plain line, nothing else on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from typing import TextIO

from tandem.cli.generate import (
    CommandError,
    add_connection_args,
    add_generation_args,
    connect,
    describe,
    generation_params,
    pick_model,
    stream_answer,
)
from tandem.sdk import TandemClient, TandemError

COMMANDS = {"/reset": "clear the conversation", "/exit": "quit (or Ctrl-D)", "/help": "this list"}
DIM, BOLD, RED, RESET = "\033[2m", "\033[1m", "\033[31m", "\033[0m"


def use_colour(stream: TextIO) -> bool:
    return stream.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


class Session:
    """One chat: the conversation so far and the terminal's ways (or a pipe's lack of them)."""

    def __init__(self, client: TandemClient, opts: argparse.Namespace, model: str) -> None:
        self.client = client
        self.opts = opts
        self.model = model
        self.params = generation_params(opts)
        self.interactive = sys.stdout.isatty()
        self.line_editing = self.interactive and sys.stdin.isatty()
        self.colour = use_colour(sys.stdout)
        self.messages: list[dict[str, str]] = []
        self.failed = False
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.opts.system}] if self.opts.system is not None else []

    def paint(self, text: str, style: str, stream: TextIO) -> str:
        return f"{style}{text}{RESET}" if self.colour and stream.isatty() else text

    def notice(self, text: str) -> None:
        """Session messages, on stderr and only at a terminal: a pipe's stdout and stderr stay plain."""
        if self.interactive:
            print(self.paint(text, DIM, sys.stderr), file=sys.stderr, flush=True)

    def error(self, text: str) -> None:
        self.failed = True
        sys.stdout.flush()
        print(self.paint(f"tandem chat: {text}", RED, sys.stderr), file=sys.stderr, flush=True)

    def read_line(self) -> str | None:
        """The next line without its newline; None at end of input. Ctrl-C here raises KeyboardInterrupt."""
        if self.line_editing:
            # \001 and \002 tell readline that the colour codes take no room on the line.
            prompt = f"\001{BOLD}\002> \001{RESET}\002" if self.colour else "> "
            try:
                return input(prompt)
            except EOFError:
                print()
                return None
        line = sys.stdin.readline()
        return line.rstrip("\r\n") if line else None

    def run(self) -> int:
        self.notice(
            f"chatting with {self.model} at {self.opts.target}: /reset clears the conversation, /exit or Ctrl-D "
            "quits, Ctrl-C stops an answer"
        )
        while True:
            try:
                line = self.read_line()
            except KeyboardInterrupt:
                print()
                break
            if line is None:
                break
            text = line.strip()
            if not text:
                continue
            if text in COMMANDS:
                if text == "/exit":
                    break
                if text == "/reset":
                    self.reset()
                    self.notice("(conversation cleared)")
                else:
                    self.notice("\n".join(f"{c:<7} {h}" for c, h in COMMANDS.items()))
                continue
            try:
                self.turn(line)
            except KeyboardInterrupt:  # just after the answer ended: it is kept, the session goes on
                print(flush=True)
        return 1 if self.failed else 0

    def turn(self, question: str) -> None:
        """Asks `question` with the conversation so far; keeps the exchange only if the answer came whole."""
        messages = [*self.messages, {"role": "user", "content": question}]
        try:
            answer = stream_answer(self.client, sys.stdout, model=self.model, messages=messages, params=self.params)
        except TandemError as exc:
            self.error(str(exc))
            return
        except KeyboardInterrupt:  # before the stream began: no call is left running
            answer = None
        print(flush=True)
        if answer is None or answer.interrupted:
            self.notice("(interrupted: the answer was cancelled on the server and is not kept in the conversation)")
            return
        self.messages = [*messages, {"role": "assistant", "content": answer.text}]
        if self.opts.verbose:
            print(describe(answer, messages=len(messages)), file=sys.stderr, flush=True)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="tandem chat",
        description="Chat with a running gateway's text-generation model: the conversation is kept and sent as "
        "messages (the model's chat template). /reset clears it; /exit, Ctrl-D or Ctrl-C at the prompt quits. Ctrl-C "
        "while an answer streams stops it (the call is cancelled, so the server stops generating) and drops that "
        "question and its partial answer from the conversation. Piped (stdout not a terminal): one plain answer line "
        "per input line.",
    )
    add_generation_args(parser, "preferring one with a chat template")
    add_connection_args(parser)
    opts = parser.parse_args(argv)
    try:
        with connect(opts, parser) as client:
            model = pick_model(client, opts.model, chat=True)
            session = Session(client, opts, model)
            if session.line_editing:
                with contextlib.suppress(ImportError):
                    import readline  # noqa: F401  (input() gains line editing and history)
            return session.run()
    except (TandemError, CommandError) as exc:
        print(f"tandem chat: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 0
