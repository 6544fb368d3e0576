"""`tandem generate`: one generation from a running gateway, streamed to stdout as it is written; and what it shares
with `tandem chat` (tandem/cli/chat.py): the connection flags, the generation flags, the choice of model and the
streaming of one answer with Ctrl-C cancelling it."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import grpc

from tandem.sdk import GenerationDelta, GenerationStream, GenerationUsage, TandemClient, TandemError

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 600.0
TEXT_GENERATION = "text-generation"

MODEL_HELP = (
    "model reference, NAME[:VERSION|@ALIAS] (default: the first ready text-generation model the gateway lists, "
    "{which}; not the server's default model, which may be an embedder)"
)


class CommandError(Exception):
    """A failure this command reports as one line on stderr, exiting 1."""


def add_connection_args(parser: argparse.ArgumentParser) -> None:
    """The gateway and how to reach it: the flags of `tandem bench`, with --addr as another name of --target."""
    parser.add_argument(
        "--target", "--addr", dest="target", default=DEFAULT_TARGET, help=f"gateway address (default {DEFAULT_TARGET})"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds one answer may take, from the call to its last token (default {DEFAULT_TIMEOUT_S:g})",
    )
    parser.add_argument("--tls-ca", type=Path, default=None, help="PEM CA of a gateway served with TLS")
    parser.add_argument("--tls-cert", type=Path, default=None, help="PEM client certificate (gateway with mTLS)")
    parser.add_argument("--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")
    parser.add_argument("--tls-server-name", default=None, help="name the gateway's certificate is checked for")
    parser.add_argument("--api-key", default=None, help="sent as x-api-key when the gateway has keys")


def add_generation_args(parser: argparse.ArgumentParser, which_model: str) -> None:
    """--model, --system, -v and the parameters of tandem.generation.v1.GenerationParams (docs/generation.md)."""
    parser.add_argument("--model", default="", help=MODEL_HELP.format(which=which_model))
    parser.add_argument(
        "--system",
        default=None,
        metavar="TEXT",
        help="a system message first in the conversation (generate: with --chat)",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="after each answer, its finish reason and token counts on stderr"
    )
    params = parser.add_argument_group(
        "generation parameters (unset: the model's defaults on the server; greedy unless its generation_config samples)"
    )
    params.add_argument("--max-new-tokens", type=int, default=None, help="most tokens to generate")
    params.add_argument("--min-new-tokens", type=int, default=0, help="end-of-sequence suppressed until this many")
    params.add_argument("--temperature", type=float, default=None, help="0 decodes greedily")
    params.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep this probability mass")
    params.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (0: all)")
    params.add_argument("--repetition-penalty", type=float, default=None, help="above 1 discourages repeats")
    params.add_argument("--seed", type=int, default=None, help="seed of the sampler, for repeatable samples")
    params.add_argument(
        "--stop", action="append", default=[], metavar="TEXT", help="end the answer before this text (repeatable)"
    )
    params.add_argument("--ignore-eos", action="store_true", help="go on past end-of-sequence tokens")


def generation_params(opts: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of TandemClient.generate that the flags set (model and prompt aside)."""
    return {
        "max_new_tokens": opts.max_new_tokens,
        "min_new_tokens": opts.min_new_tokens,
        "temperature": opts.temperature,
        "top_p": opts.top_p,
        "top_k": opts.top_k,
        "repetition_penalty": opts.repetition_penalty,
        "seed": opts.seed,
        "stop": list(opts.stop),
        "ignore_eos": opts.ignore_eos,
    }


@contextlib.contextmanager
def connect(opts: argparse.Namespace, parser: argparse.ArgumentParser) -> Iterator[TandemClient]:
    """A blocking client of the gateway the flags name, closed on leaving."""
    credentials: grpc.ChannelCredentials | None = None
    if opts.tls_ca is not None or opts.tls_cert is not None:
        from tandem.sdk import tls_credentials

        try:
            credentials = tls_credentials(opts.tls_ca, opts.tls_cert, opts.tls_key)
        except (OSError, ValueError) as exc:
            parser.error(f"TLS: {exc}")
    elif opts.tls_key is not None or opts.tls_server_name is not None:
        parser.error("--tls-key and --tls-server-name need --tls-ca or --tls-cert")
    channel: grpc.Channel | None = None
    if credentials is not None and opts.tls_server_name:
        from tandem.sdk.channel import CHANNEL_OPTIONS

        options = [*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", opts.tls_server_name)]
        channel = grpc.secure_channel(opts.target, credentials, options)
        credentials = None
    client = TandemClient(
        opts.target, timeout=opts.timeout, credentials=credentials, channel=channel, api_key=opts.api_key
    )
    try:
        yield client
    finally:
        client.close()
        if channel is not None:
            channel.close()


def pick_model(client: TandemClient, model: str, chat: bool) -> str:
    """`model` if given; else the first ready text-generation model the gateway lists (for a chat, the first with a
    chat template, if one has one)."""
    if model:
        return model
    served = [m for m in client.list_models() if m.task == TEXT_GENERATION and m.ready]
    if chat:
        served.sort(key=lambda m: not m.chat_template)  # stable: the listing's order otherwise
    if not served:
        raise CommandError("no text-generation model is served (give --model to name one)")
    return served[0].name


@dataclass
class Answer:
    """What one streamed answer came to: its text, and the last delta's finish reason, usage and model."""

    text: str = ""
    finish_reason: str | None = None
    usage: GenerationUsage | None = None
    model: str = ""
    model_version: str = ""
    interrupted: bool = False


def stream_answer(
    client: TandemClient,
    out: TextIO,
    *,
    model: str,
    prompt: str | None = None,
    messages: Sequence[Mapping[str, str]] | None = None,
    params: Mapping[str, Any],
) -> Answer:
    """Writes the answer to `out` delta by delta (flushed each time) and returns it. Ctrl-C while it streams returns
    the partial answer with `interrupted` set, after cancelling the call (which stops the generation on the server).
    Raises TandemError when the call fails."""
    answer = Answer()
    stream = client.generate(prompt, model=model, messages=messages, **params)
    try:
        with _interrupt_cancels(stream):
            try:
                for delta in stream:
                    _add(answer, delta)
                    if delta.text:
                        out.write(delta.text)
                        out.flush()
            finally:
                stream.close()  # inside the handler's time too: it cancels the call, in gRPC's code
    except KeyboardInterrupt:
        # Only while the handler was being set: no call had been made yet.
        answer.interrupted = True
    # A Ctrl-C after the last delta came cuts nothing short: the answer is whole.
    answer.interrupted = answer.interrupted or (stream.cancelled and answer.finish_reason is None)
    return answer


@contextlib.contextmanager
def _interrupt_cancels(stream: GenerationStream) -> Iterator[None]:
    """While the answer streams, SIGINT cancels the call instead of raising KeyboardInterrupt. Raised inside gRPC's
    code, a KeyboardInterrupt can land just after gRPC's channel took its lock (a Python `threading.Condition` entered
    from Cython, which then never releases it: the main thread owns the reentrant lock and goes on, while the channel's
    thread that delivers every call's events waits for it forever), so every later call on the channel hangs: the
    next question of a chat got no answer (reproduced in a 1-second-recycling stack after 39 Ctrl-Cs; the stack dump
    showed the channel thread waiting in `next_call_event`). The iteration then ends quietly and the handler that was
    there before comes back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, lambda signum, frame: stream.cancel())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)


def _add(answer: Answer, delta: GenerationDelta) -> None:
    answer.text += delta.text
    if delta.finish_reason is not None:
        answer.finish_reason = delta.finish_reason
        answer.usage = delta.usage
        answer.model, answer.model_version = delta.model, delta.model_version


def describe(answer: Answer, **extra: object) -> str:
    """The -v line: `key=value` pairs, for people and for scripts."""
    fields: dict[str, object] = {**extra, "finish_reason": answer.finish_reason}
    if answer.usage is not None:
        fields["prompt_tokens"] = answer.usage.prompt_tokens
        fields["generated_tokens"] = answer.usage.generated_tokens
    if answer.model:
        fields["model"] = f"{answer.model}:{answer.model_version}" if answer.model_version else answer.model
    return " ".join(f"{k}={v}" for k, v in fields.items())


def read_prompt(arg: str | None, stdin: TextIO) -> str:
    """PROMPT, or stdin's whole text for `-` (or no PROMPT with stdin not a terminal), without its final newline."""
    if arg is not None and arg != "-":
        return arg
    if arg is None and stdin.isatty():
        raise CommandError("give a PROMPT, or '-' to read it from stdin")
    return stdin.read().rstrip("\r\n")


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="tandem generate",
        description="Generate text with a running gateway's text-generation model, streamed to stdout as it is "
        "written. Ctrl-C stops the generation (the call is cancelled) and exits 130.",
    )
    parser.add_argument(
        "prompt", nargs="?", default=None, metavar="PROMPT", help="the prompt; '-' (or none, stdin not a tty): stdin"
    )
    parser.add_argument(
        "--chat", action="store_true", help="send PROMPT as one user message, rendered with the model's chat template"
    )
    add_generation_args(parser, "for --chat the first with a chat template")
    add_connection_args(parser)
    opts = parser.parse_args(argv)
    if opts.system is not None and not opts.chat:
        parser.error("--system needs --chat")
    try:
        text = read_prompt(opts.prompt, sys.stdin)
        if not text:
            raise CommandError("the prompt is empty")
        messages: list[dict[str, str]] | None = None
        if opts.chat:
            messages = [{"role": "system", "content": opts.system}] if opts.system is not None else []
            messages.append({"role": "user", "content": text})
        with connect(opts, parser) as client:
            model = pick_model(client, opts.model, opts.chat)
            answer = stream_answer(
                client,
                sys.stdout,
                model=model,
                prompt=None if opts.chat else text,
                messages=messages,
                params=generation_params(opts),
            )
    except (TandemError, CommandError) as exc:
        sys.stdout.flush()
        print(f"tandem generate: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before the answer started: nothing is running on the server
        print(file=sys.stderr)
        return 130
    print(flush=True)
    if answer.interrupted:
        print("tandem generate: interrupted; the generation was cancelled", file=sys.stderr)
        return 130
    if opts.verbose:
        print(describe(answer), file=sys.stderr)
    return 0
