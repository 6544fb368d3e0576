"""Texts for calibration (pruning) and distillation: a file of lines or JSONL, or the built-in corpus.

The built-in corpus is English prose that ships with every CPython, available offline under the Python Software
Foundation License (https://docs.python.org/3/license.html): the Python Language Reference topics in
`pydoc_data.topics` (the text `help("assert")` prints), then the docstrings of the standard library's modules,
classes and functions (read with `ast`, nothing imported; tests, IDLE, lib2to3 and site-packages left out).
Headings, code, doctest and grammar blocks (indented lines) are left out; paragraphs are cut at sentence ends into
texts of at most MAX_WORDS words. Then, for each of those texts, a span of 1 to SPAN_WORDS of its consecutive words
(drawn by a generator with a fixed seed): short inputs such as queries, greetings and labels, which paragraphs of
prose never are, and on which a distilled embedding student otherwise does worst (docs/models.md). Its hash is
recorded, as the texts change with the Python version. It is technical prose: a corpus from the model's own domain
(--corpus) usually distils better.
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
import re
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

BUILTIN = "builtin:python-docs"
MAX_WORDS = 48
SPAN_WORDS = 8
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_SKIPPED = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__", "turtledemo"}
_HEADING_RULE = re.compile(r"^[*=\-~^]{3,}$")


class CorpusError(ValueError):
    """The corpus cannot be read or holds no texts."""


@dataclass(frozen=True)
class Corpus:
    texts: tuple[str, ...]
    source: str  # the file, or BUILTIN
    sha256: str  # of the texts as used, one per line

    @staticmethod
    def of(texts: Sequence[str], source: str) -> Corpus:
        digest = hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()
        return Corpus(tuple(texts), source, f"sha256:{digest}")


def _wordy(text: str) -> bool:
    """Mostly letters and spaces: prose, not a table of numbers or an expression."""
    return sum(c.isalpha() or c.isspace() for c in text) >= 0.85 * len(text)


def _chunks(paragraph: str) -> list[str]:
    out: list[str] = []
    current: list[str] = []
    for sentence in _SENTENCE_END.split(paragraph):
        words = sentence.split()
        if current and len(current) + len(words) > MAX_WORDS:
            out.append(" ".join(current))
            current = []
        current += words[: MAX_WORDS * 2]
    if current:
        out.append(" ".join(current))
    return out


def _prose(text: str) -> list[str]:
    texts: list[str] = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines or any(line.startswith((" ", "\t", ">>>", "...")) for line in lines):
            continue  # code, grammar rules and tables are indented; doctests start with prompts
        if len(lines) <= 2 and (_HEADING_RULE.match(lines[-1].strip()) or len(" ".join(lines).split()) < 4):
            continue  # headings
        paragraph = " ".join(line.strip() for line in lines)
        texts += [chunk for chunk in _chunks(paragraph) if len(chunk.split()) >= 4 and _wordy(chunk)]
    return texts


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return []
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef))]
    return [doc for node in nodes if (doc := ast.get_docstring(node))]


def builtin_corpus() -> Corpus:
    from pydoc_data.topics import topics

    texts: list[str] = []
    for key in sorted(topics):
        texts += _prose(str(topics[key]))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        if _SKIPPED.intersection(path.relative_to(stdlib).parts[:-1]):
            continue
        for doc in _docstrings(path):
            texts += _prose(doc)
    texts = list(dict.fromkeys(texts))
    rng = random.Random(0)
    spans = []
    for text in texts:
        words = text.split()
        n = rng.randint(1, min(SPAN_WORDS, len(words)))
        start = rng.randint(0, len(words) - n)
        spans.append(" ".join(words[start : start + n]))
    return Corpus.of(texts + spans, BUILTIN)


def read_corpus(path: Path | None) -> Corpus:
    """Texts of a file: one per line, or JSONL (objects with a "text" field, or strings); None: the built-in
    corpus. Raises CorpusError for an unreadable or empty file."""
    if path is None:
        return builtin_corpus()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CorpusError(f"corpus {path} cannot be read: {exc}") from exc
    texts: list[str] = []
    jsonl = path.suffix in (".jsonl", ".ndjson")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not jsonl:
            texts.append(line.strip())
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"corpus {path} line {number} is not JSON: {exc}") from exc
        text = item.get("text") if isinstance(item, dict) else item
        if not isinstance(text, str):
            raise CorpusError(f'corpus {path} line {number}: want a string or an object with a "text" string')
        if text.strip():
            texts.append(text.strip())
    if not texts:
        raise CorpusError(f"corpus {path} holds no texts")
    return Corpus.of(texts, str(path.resolve()))
