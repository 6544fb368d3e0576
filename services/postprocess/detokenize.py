"""Incremental detokenization for streamed generation: token ids in, text deltas out, cut at stop strings.

Each generated id is decoded in a small window of the ids before it, the way TGI's ``decode_token`` does with its
prefix and read offsets, and only the new suffix of the window's text is passed on. The ids before the read point
are context: byte-level BPE, SentencePiece (``▁`` and a decoder that strips the first space) and WordPiece (``##``)
all decide a token's leading space from its neighbour, so a token decoded alone would be spaced wrongly.

Text is held back in two places:

* characters whose UTF-8 bytes are not all there yet: the decoders render a partial byte sequence as U+FFFD, so a
  trailing run of U+FFFD in the window's text stays in the window until a later id completes it (or ``finish``);
* the longest tail of the decoded text that could still grow into a stop string.

What comes out, joined with what ``finish`` returns, is the decode of all generated ids in the context of the prompt:
``decode(prompt + generated)[len(decode(prompt)):]``, or ``decode(generated)`` without a prompt, less a character
whose bytes never completed at the very end (dropped rather than shown as U+FFFD). It stays exact for
decoders where a token's text depends only on its predecessor (ByteLevel, Metaspace/Llama's Replace-ByteFallback-
Fuse-Strip sequence, WordPiece, whose cleanup works one token at a time). One known difference: the ByteFallback
decoder turns a whole run of byte tokens into U+FFFD when the run is not valid UTF-8, even characters in it that were
complete; text already streamed cannot be taken back, so for such invalid id sequences the stream shows those
characters where ``decode`` shows U+FFFD. A run of ids that make no text (skipped special tokens) stays in the window,
which then grows with it, so that the next word still gets its space.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer

# How many prompt ids seed the window. One is enough for spacing; a prompt that ends inside a character needs the
# ids holding that character's first bytes (up to three) too, and the character's completion then streams whole.
_PROMPT_CONTEXT_IDS = 5

_REPLACEMENT = "\ufffd"


@dataclass(frozen=True)
class TextDelta:
    """The text a feed made safe to show, and whether a stop string ended the stream."""

    text: str
    stop: str | None
    # When stop is set: how many generated ids (over all feeds) the stream consumed, up to and including the one that
    # completed the stop string; ids after it in the same feed are not counted.
    stop_token_count: int | None = None


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas one feed at a time; per id cost is bounded by the window, not by
    the text so far.

    ``feed`` after a stop string matched returns an empty delta and ignores its ids: a batched decode loop may hand
    over ids it produced before it heard of the stop. ``feed`` after ``finish`` raises ``RuntimeError``.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        prompt_ids: Sequence[int] = (),
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must not be empty")
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stops = tuple(dict.fromkeys(stop))
        self._max_stop_len = max((len(s) for s in self._stops), default=0)

        # The window: ids[:read] are context whose text was passed on before (or is the prompt's), ids[read:] are the
        # ids since. consumed counts the characters of decode(ids) already passed on; read_chars is what it was when
        # the window last moved, so consumed > read_chars means the ids since read have produced text.
        self._ids = self._prompt_context(prompt_ids)
        seed = self._decode(self._ids)
        # The prompt's text is never streamed, except for a character it ends inside of: that one streams whole once
        # the generation completes it. So reading starts after the last complete character, at most three ids back
        # (decoded alone, since ByteFallback renders a whole run of byte tokens as U+FFFD while it ends inside a
        # character), and the window will later move on from there, on a character boundary.
        self._read, read_text = len(self._ids), seed
        while read_text.endswith(_REPLACEMENT) and self._read > max(len(self._ids) - 3, 0):
            self._read -= 1
            read_text = self._decode(self._ids[: self._read])
        self._consumed = self._read_chars = len(read_text.rstrip(_REPLACEMENT))
        # Bytes at the end of the prompt may also be plain invalid, and then the U+FFFD are the prompt's too. Which
        # one it was shows once text follows; _resolve_seed settles it.
        self._seed: str | None = seed if seed.endswith(_REPLACEMENT) else None

        self._generated = 0
        self._pending = ""  # decoded text held back because it may be the start of a stop string
        self._emitted: list[str] = []
        self._stop: str | None = None
        self._finished = False

    @property
    def stopped(self) -> bool:
        """Whether a stop string matched; the stream is over."""
        return self._stop is not None

    @property
    def text(self) -> str:
        """All text emitted so far, ``finish`` included."""
        if len(self._emitted) > 1:
            self._emitted = ["".join(self._emitted)]
        return self._emitted[0] if self._emitted else ""

    def feed(self, ids: Sequence[int]) -> TextDelta:
        """Takes one or more newly generated ids and returns the text they made safe to show.

        Ids are taken one at a time, so a feed of several ids gives the same text, stop and count as feeding them
        singly; after a stop string matches, the rest of the feed is ignored.
        """
        if self._finished:
            raise RuntimeError("feed() after finish()")
        if self._stop is not None:
            return TextDelta("", None)
        parts: list[str] = []
        for token_id in ids:
            self._generated += 1
            self._ids.append(token_id)
            out = self._on_text(self._step())
            parts.append(out)
            if self._stop is not None:
                return TextDelta("".join(parts), self._stop, self._generated)
        return TextDelta("".join(parts), None)

    def finish(self) -> str:
        """Ends the stream and returns what was held back: a stop-string prefix that never completed. Bytes of a
        character that never completed (generation ended in the middle of it) are dropped rather than shown as U+FFFD:
        a client never sees a broken character; the token ids still carry those bytes.

        Returns "" after a stop string matched, and on a second call. Should the flushed U+FFFD complete a stop string,
        the text is cut there and ``stopped`` turns true, as in ``feed``.
        """
        if self._finished:
            return ""
        self._finished = True
        if self._stop is not None:
            return ""
        text = self._decode(self._ids).rstrip(_REPLACEMENT)
        self._resolve_seed(text, final=True)
        out = self._on_text(text[self._consumed :], final=True)
        self._ids = []
        return out

    def _prompt_context(self, prompt_ids: Sequence[int]) -> list[int]:
        """The last few prompt ids, starting on a character: ByteFallback turns a run of byte tokens that starts
        inside a character into U+FFFD throughout, the generated bytes that continue the run included."""
        start = max(0, len(prompt_ids) - _PROMPT_CONTEXT_IDS)
        for first in range(start, max(start - 4, -1), -1):
            # A character is at most four bytes: some head of up to four ids decodes to something else than U+FFFD.
            heads = (self._decode(prompt_ids[first : first + n]) for n in range(1, 5))
            if first == 0 or any(not head.startswith(_REPLACEMENT) for head in heads):
                return list(prompt_ids[first:])
        return list(prompt_ids[start:])

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _step(self) -> str:
        """Decodes the window after a new id and returns the characters now known to be complete."""
        text = self._decode(self._ids)
        end = len(text.rstrip(_REPLACEMENT))
        self._resolve_seed(text, final=False)
        new = text[self._consumed : end]
        self._consumed = max(self._consumed, end)
        if end == len(text) and self._consumed > self._read_chars:
            # Nothing pending in the bytes and the ids since read made text: they become the context for the next id.
            # Moving on ids that made no text (a skipped special token) would lose the context that spaces the next
            # one, so the window keeps growing over those instead.
            self._ids = self._ids[self._read :]
            self._read = len(self._ids)
            self._consumed = self._read_chars = len(self._decode(self._ids))
        return new

    def _resolve_seed(self, text: str, *, final: bool) -> None:
        seed = self._seed
        if seed is None:
            return
        if final or len(text.rstrip(_REPLACEMENT)) > self._consumed:
            # Of the prompt's text, what the window's text still starts with: all of it when the bytes were invalid,
            # up to the split character when the generation completed it.
            common = 0
            for a, b in zip(seed, text, strict=False):
                if a != b:
                    break
                common += 1
            self._consumed = max(self._consumed, common)
            self._seed = None

    def _on_text(self, new: str, *, final: bool = False) -> str:
        """Passes decoded text through the stop-string check and returns what may be emitted now."""
        if not new and not final:
            return ""
        if not self._stops:
            return self._emit(new)
        pending = self._pending + new
        match = self._earliest_stop(pending)
        if match is not None:
            start, stop = match
            self._stop = stop
            self._pending = ""
            return self._emit(pending[:start])
        held = 0 if final else self._stop_prefix_len(pending)
        self._pending = pending[len(pending) - held :]
        return self._emit(pending[: len(pending) - held])

    def _emit(self, text: str) -> str:
        if text:
            self._emitted.append(text)
        return text

    def _earliest_stop(self, text: str) -> tuple[int, str] | None:
        """The stop string that completes first in the text (the earlier start on a tie), with its start.

        Earliest completion is what a reader of the stream sees first, and it does not depend on how the text was cut
        into tokens. Held text never contains a whole stop string, so text is at most the longest stop plus one id's.
        """
        best: tuple[int, int, str] | None = None
        for stop in self._stops:
            start = text.find(stop)
            if start < 0:
                continue
            key = (start + len(stop), start, stop)
            if best is None or key[:2] < best[:2]:
                best = key
        return None if best is None else (best[1], best[2])

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest tail of text that is the start of a stop string."""
        for n in range(min(len(text), self._max_stop_len - 1), 0, -1):
            tail = text[-n:]
            if any(stop.startswith(tail) for stop in self._stops):
                return n
        return 0
