"""Logging configured once per process, with the request id of the current call in every line."""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


_base_factory = logging.getLogRecordFactory()


def _record_with_request_id(*args: object, **kwargs: object) -> logging.LogRecord:
    # Every record, whoever handles it, carries the request id of the call it was logged in.
    record = _base_factory(*args, **kwargs)
    record.request_id = request_id.get()
    return record


logging.setLogRecordFactory(_record_with_request_id)


# What a value may not carry into a text log line as is: control characters (a forged line, a NUL, terminal escapes),
# the separators of `key=value` fields, and the invisible or direction-changing characters that make a line read
# other than it is.
_UNSAFE_IN_VALUE = re.compile(r'[\x00-\x20\x7f-\xa0"=\\\u200b-\u200f\u2028-\u202e\u2066-\u2069]')
_UNSAFE_IN_LINE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def log_value(value: object) -> str:
    """A value for a text log line: as is when it is plain, else quoted with every control character escaped (JSON
    string syntax), so a value a caller chose (a model name, a request id) can never split, forge or garble a line."""
    text = str(value)
    if text and not _UNSAFE_IN_VALUE.search(text):
        return text
    return json.dumps(text)


def _escape_line(text: str) -> str:
    return _UNSAFE_IN_LINE.sub(lambda m: json.dumps(m.group())[1:-1], text)


class _TextFormatter(logging.Formatter):
    """One line per record: control characters in the message and in the request id are escaped (a traceback,
    appended after the message by the base class, keeps its lines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802
        record.message = _escape_line(record.message)
        rid = getattr(record, "request_id", "-")
        if not _UNSAFE_IN_VALUE.search(rid):
            return super().formatMessage(record)
        record.request_id = log_value(rid)  # for this line only: other handlers get the id as it came
        try:
            return super().formatMessage(record)
        finally:
            record.request_id = rid


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            line.update(extra)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line)


def configure(level: str = "INFO", json_logs: bool = False, service: str = "tandem") -> None:
    """Call once, from a service's __main__."""
    handler = logging.StreamHandler(sys.stderr)
    if json_logs:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(
            _TextFormatter(f"%(asctime)s %(levelname)s {service} [%(request_id)s] %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
