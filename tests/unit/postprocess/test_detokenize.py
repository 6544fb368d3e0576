"""Unit tests of incremental detokenization: streamed deltas against a whole decode, for byte-level BPE, a Llama-like
SentencePiece BPE with byte fallback and BERT-style WordPiece tokenizers trained here on tiny corpora, and stop
strings cut exactly on hand-made vocabularies."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from services.postprocess.detokenize import IncrementalDetokenizer, TextDelta

EOS = "<|endoftext|>"
EMOJI_CJK = ("🍎", "👍🏽", "猫", "東京")
# English lines repeat so that merges form on them; the emoji and CJK line is there once, so their bytes stay split.
_ENGLISH = [
    "the quick brown fox jumps over the lazy dog.",
    "hello world, hello there! it's a fine day, isn't it?",
    "playing played player plays running runner runs",
    "stop here and go there; then stop again at the end.",
]
_CORPUS = _ENGLISH * 20 + ["tokyo 東京 and a cat 猫 eat an apple 🍎 thumbs up 👍🏽 é"]
TEXTS = [
    "hello world",
    "  the lazy dog\n\njumps  over",
    "it's a fine day, isn't it? playing!",
    "an apple 🍎 and thumbs 👍🏽 up",
    "猫 in 東京🍎🍎👍🏽 ok",
    "é🍎x",
]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-ins for bytes, the alphabet of pre_tokenizers.ByteLevel."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_CHARS = _bytes_to_unicode()


def _byte_piece(piece: str | bytes) -> str:
    raw = piece.encode() if isinstance(piece, str) else piece
    return "".join(BYTE_CHARS[b] for b in raw)


def _merges(tokenizer: Tokenizer) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for merge in json.loads(tokenizer.to_str())["model"]["merges"]:
        first, second = merge.split(" ", 1) if isinstance(merge, str) else merge
        pairs.append((first, second))
    return pairs


def _train_byte_level() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, min_frequency=5, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(_CORPUS, trainer)
    return tokenizer


def _llama_decoder() -> decoders.Decoder:
    return decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )


def _train_sentencepiece() -> Tokenizer:
    """A Llama-like BPE: Metaspace, the <0xNN> byte tokens of byte fallback, Llama's decoder.

    The trainer cannot make byte tokens that are not special, so the vocabulary is trained on ASCII and then
    rebuilt with the 256 byte tokens in front, as SentencePiece lays it out; everything else falls back to bytes.
    """
    specials = ["<unk>", "<s>", "</s>"]
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    trained.train_from_iterator(_ENGLISH * 20, trainers.BpeTrainer(vocab_size=300, special_tokens=specials))
    vocab = {token: i for i, token in enumerate(specials)}
    vocab.update({f"<0x{b:02X}>": len(specials) + b for b in range(256)})
    for token, _ in sorted(trained.get_vocab().items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=_merges(trained), unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tokenizer.add_special_tokens(specials)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tokenizer.decoder = _llama_decoder()
    return tokenizer


def _train_wordpiece() -> Tokenizer:
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tokenizer.train_from_iterator(_CORPUS, trainer)
    return tokenizer


BYTE_LEVEL = _train_byte_level()
SENTENCEPIECE = _train_sentencepiece()
WORDPIECE = _train_wordpiece()
TRAINED = {"byte_level": BYTE_LEVEL, "sentencepiece": SENTENCEPIECE, "wordpiece": WORDPIECE}


def _hand_byte_level(*pieces: str | bytes) -> Tokenizer:
    """A GPT-2-style tokenizer whose vocabulary is the 256 bytes plus the given pieces; only ever decoded."""
    vocab = {char: i for i, char in enumerate(BYTE_CHARS.values())}
    for piece in pieces:
        vocab.setdefault(_byte_piece(piece), len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.add_special_tokens([EOS])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


HAND = _hand_byte_level(
    "ab", " c", " d", " the END of", "abc", "abcd", "x", " y", b"\xf0\x9f", b"\x8d", b"\x8e", b"\x8d\x8e", b"\x8e\xf0",
    b"\x9f\x91\x8d", b"\xff",
)  # fmt: skip


def hand_ids(*pieces: str | bytes) -> list[int]:
    ids = []
    for piece in pieces:
        token = EOS if piece == EOS else _byte_piece(piece)
        token_id = HAND.token_to_id(token)
        assert token_id is not None, piece
        ids.append(token_id)
    return ids


def stream(
    tokenizer: Tokenizer,
    ids: Sequence[int],
    *,
    prompt_ids: Sequence[int] = (),
    stop: Sequence[str] = (),
    skip_special_tokens: bool = True,
    chunks: Iterable[int] | None = None,
) -> tuple[list[TextDelta], str, IncrementalDetokenizer]:
    """Feeds ids in chunks of the given sizes (one at a time by default) until a stop; returns deltas and finish()."""
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=prompt_ids, stop=stop, skip_special_tokens=skip_special_tokens)
    sizes = iter(chunks) if chunks is not None else itertools.repeat(1)
    deltas, at = [], 0
    while at < len(ids) and not detok.stopped:
        size = max(1, next(sizes, 1))
        deltas.append(detok.feed(ids[at : at + size]))
        at += size
    return deltas, detok.finish(), detok


def reference(tokenizer: Tokenizer, prompt: Sequence[int], ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    """What the stream should add up to: the generated ids' text in the context of the prompt, without the prompt's.

    Without a prompt that is decode(ids). With one it is decode(prompt + ids) less decode(prompt): a SentencePiece
    decoder strips the first space of the whole text, so decode(ids) alone would lose the space of the first word.
    Where the prompt ends inside a character, its text ends in U+FFFD that the full text has replaced by the
    completed character, which belongs to the stream; the prompt's share is then its text up to the last complete
    character (at most three ids back), or, where its last bytes stay invalid, what the two texts have in common.
    """
    full = tokenizer.decode([*prompt, *ids], skip_special_tokens=skip_special_tokens)
    if not prompt:
        return full.rstrip("\ufffd")
    head = tokenizer.decode(list(prompt), skip_special_tokens=skip_special_tokens)
    common = 0
    while common < min(len(head), len(full)) and head[common] == full[common]:
        common += 1
    read = len(prompt)
    while head.endswith("\ufffd") and read > max(len(prompt) - 3, 0):
        read -= 1
        head = tokenizer.decode(list(prompt[:read]), skip_special_tokens=skip_special_tokens)
    # A character left incomplete at the very end is dropped by finish(), not shown as U+FFFD.
    return full[max(common, len(head.rstrip("\ufffd"))) :].rstrip("\ufffd")


def check_stream(
    tokenizer: Tokenizer,
    prompt: Sequence[int],
    ids: Sequence[int],
    *,
    skip_special_tokens: bool = True,
    chunks: Sequence[int] | None = None,
) -> str:
    """Streams ids after the prompt and checks the deltas against the reference; returns the reference."""
    skip = skip_special_tokens
    deltas, tail, detok = stream(tokenizer, ids, prompt_ids=prompt, skip_special_tokens=skip, chunks=chunks)
    expected = reference(tokenizer, prompt, ids, skip)
    assert "".join(d.text for d in deltas) + tail == expected
    assert detok.text == expected
    assert all(d.stop is None and d.stop_token_count is None for d in deltas)
    if "\ufffd" not in expected:
        assert not any("\ufffd" in d.text for d in deltas) and "\ufffd" not in tail
    else:
        # Only a character whose bytes may still come is held; a delta never ends in one.
        assert not any(d.text.endswith("\ufffd") for d in deltas)
    return expected


# ----------------------------------------------------------------------------------------------------------------------
# The trained tokenizers split what they should


@pytest.mark.parametrize("text", EMOJI_CJK)
def test_byte_level_splits_emoji_and_cjk_into_byte_tokens(text: str) -> None:
    assert len(BYTE_LEVEL.encode(text).ids) >= 2


@pytest.mark.parametrize("text", EMOJI_CJK)
def test_sentencepiece_falls_back_to_byte_tokens(text: str) -> None:
    tokens = SENTENCEPIECE.encode(text).tokens
    assert sum(t.startswith("<0x") for t in tokens) == len(text.encode())


def test_wordpiece_has_continuations() -> None:
    assert any(t.startswith("##") for t in WORDPIECE.encode("isnt ok, hellos").tokens)


# ----------------------------------------------------------------------------------------------------------------------
# Streams add up to the decode


@pytest.mark.parametrize("name", TRAINED)
@pytest.mark.parametrize("text", TEXTS)
def test_stream_adds_up_to_decode(name: str, text: str) -> None:
    tokenizer = TRAINED[name]
    ids = tokenizer.encode(text).ids
    assert check_stream(tokenizer, (), ids) == tokenizer.decode(ids)
    # Every cut between prompt and generation: the first generated token keeps its leading space.
    for cut in range(1, len(ids)):
        check_stream(tokenizer, ids[:cut], ids[cut:])


@pytest.mark.parametrize("name", TRAINED)
def test_multi_id_feeds_match_single_feeds(name: str) -> None:
    tokenizer = TRAINED[name]
    rng = random.Random(7)
    ids = tokenizer.encode(" ".join(TEXTS)).ids
    single, single_tail, _ = stream(tokenizer, ids)
    for _ in range(20):
        chunks = [rng.randint(1, 6) for _ in ids]
        deltas, tail, _ = stream(tokenizer, ids, chunks=chunks)
        assert "".join(d.text for d in deltas) + tail == "".join(d.text for d in single) + single_tail


@pytest.mark.parametrize("name", ["byte_level", "sentencepiece"])
@pytest.mark.parametrize("text", EMOJI_CJK)
def test_emoji_and_cjk_one_id_at_a_time_stream_whole_characters(name: str, text: str) -> None:
    tokenizer = TRAINED[name]
    ids = tokenizer.encode(f"a {text} b").ids
    deltas, tail, _ = stream(tokenizer, ids)
    assert not any("\ufffd" in d.text for d in deltas)
    assert "".join(d.text for d in deltas) + tail == tokenizer.decode(ids) == f"a {text} b"


def test_sentencepiece_first_generated_word_gets_its_space_from_the_prompt() -> None:
    prompt = SENTENCEPIECE.encode("hello").ids
    generated = SENTENCEPIECE.encode("hello world").ids[len(prompt) :]
    assert (SENTENCEPIECE.id_to_token(generated[0]) or "").startswith("▁")
    deltas, _, _ = stream(SENTENCEPIECE, generated, prompt_ids=prompt)
    assert deltas[0].text.startswith(" w")
    # No prompt: like decode, the stripped leading space.
    deltas, _, _ = stream(SENTENCEPIECE, generated)
    assert deltas[0].text.startswith("w")


def test_wordpiece_continuation_joins_without_a_space() -> None:
    vocab = {"[UNK]": 0, "[SEP]": 1, "play": 2, "##ing": 3, "the": 4, ".": 5}
    tokenizer = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tokenizer.add_special_tokens(["[UNK]", "[SEP]"])
    tokenizer.decoder = decoders.WordPiece()
    deltas, _, _ = stream(tokenizer, [3, 4, 5, 1, 2, 3], prompt_ids=[4, 2])
    assert [d.text for d in deltas] == ["ing", " the", ".", "", " play", "ing"]
    deltas, _, _ = stream(tokenizer, [2, 3])
    assert [d.text for d in deltas] == ["play", "ing"]


def test_byte_level_spaces_and_special_tokens() -> None:
    ids = hand_ids("x", " y", EOS, " c")
    deltas, _, _ = stream(HAND, ids)
    assert [d.text for d in deltas] == ["x", " y", "", " c"]
    deltas, _, _ = stream(HAND, ids, skip_special_tokens=False)
    assert [d.text for d in deltas] == ["x", " y", EOS, " c"]


def test_sentencepiece_special_token_between_words_keeps_the_space() -> None:
    words = SENTENCEPIECE.encode("hello world").ids
    eos = SENTENCEPIECE.token_to_id("</s>")
    assert eos is not None
    split = next(i for i, t in enumerate(SENTENCEPIECE.encode("hello world").tokens) if i and t.startswith("▁"))
    ids = [*words[:split], eos, *words[split:]]
    assert check_stream(SENTENCEPIECE, (), ids) == "hello world"
    assert check_stream(SENTENCEPIECE, (), ids, skip_special_tokens=False) == "hello</s> world"


# ----------------------------------------------------------------------------------------------------------------------
# Incomplete characters


def test_character_is_held_until_its_last_byte() -> None:
    deltas, tail, _ = stream(HAND, hand_ids("x", b"\xf0\x9f", b"\x8d", b"\x8e", " y"))
    assert [d.text for d in deltas] == ["x", "", "", "🍎", " y"]
    assert tail == ""


def test_token_spanning_two_characters_emits_the_complete_one() -> None:
    # b"\x8e\xf0" ends 🍎 and starts 👍: the apple is out at once, the thumb waits for its bytes.
    deltas, _, _ = stream(HAND, hand_ids(b"\xf0\x9f", b"\x8d", b"\x8e\xf0", b"\x9f\x91\x8d"))
    assert [d.text for d in deltas] == ["", "", "🍎", "👍"]


def test_finish_drops_an_incomplete_character() -> None:
    ids = hand_ids("x", b"\xf0\x9f")
    deltas, tail, detok = stream(HAND, ids)
    assert [d.text for d in deltas] == ["x", ""]
    assert HAND.decode(ids) == "x\ufffd"
    assert tail == "" and detok.text == "x"


def test_invalid_byte_is_emitted_once_text_follows() -> None:
    ids = hand_ids("x", b"\xff", " y")
    deltas, tail, _ = stream(HAND, ids)
    assert [d.text for d in deltas] == ["x", "", "\ufffd y"]
    assert tail == "" and HAND.decode(ids) == "x\ufffd y"


def test_prompt_ending_inside_a_character_streams_the_character_whole() -> None:
    deltas, _, _ = stream(HAND, hand_ids(b"\x8d\x8e", " y"), prompt_ids=hand_ids("x", b"\xf0\x9f"))
    assert [d.text for d in deltas] == ["🍎", " y"]
    # An invalid byte at the end of the prompt is the prompt's, and stays out of the stream.
    deltas, tail, _ = stream(HAND, hand_ids(" y"), prompt_ids=hand_ids("x", b"\xff"))
    assert [d.text for d in deltas] == [" y"] and tail == ""
    deltas, tail, _ = stream(HAND, hand_ids(b"\x8d"), prompt_ids=hand_ids("x", b"\xff", b"\xf0\x9f"))
    assert [d.text for d in deltas] == [""] and tail == ""
    deltas, _, _ = stream(HAND, hand_ids(b"\x8d\x8e"), prompt_ids=hand_ids("x", b"\xff", b"\xf0\x9f"))
    assert [d.text for d in deltas] == ["🍎"]


# ----------------------------------------------------------------------------------------------------------------------
# Stop strings


def test_stop_string_spanning_tokens_cuts_exactly() -> None:
    ids = hand_ids("x", "a", "b", " c", " d")
    deltas, tail, detok = stream(HAND, ids, stop=["ab c"])
    assert [d.text for d in deltas] == ["x", "", "", ""]
    assert deltas[-1] == TextDelta("", "ab c", 4)
    assert detok.stopped and detok.text == "x" and tail == ""


def test_stop_string_inside_a_token() -> None:
    deltas, _, detok = stream(HAND, hand_ids("x", " the END of", " y"), stop=["END"])
    assert deltas[-1] == TextDelta(" the ", "END", 2)
    assert detok.text == "x the "


def test_stop_string_completed_by_a_character_split_over_tokens() -> None:
    deltas, _, _ = stream(HAND, hand_ids("x", b"\xf0\x9f", b"\x8d", b"\x8e\xf0", b"\x9f\x91\x8d"), stop=["x🍎"])
    assert deltas[-1] == TextDelta("", "x🍎", 4)


def test_unfinished_stop_prefix_is_released_later_and_at_finish() -> None:
    deltas, tail, detok = stream(HAND, hand_ids("x", "a", "b", "x"), stop=["ab c"])
    assert [d.text for d in deltas] == ["x", "", "", "abx"]
    assert not detok.stopped and tail == ""
    deltas, tail, detok = stream(HAND, hand_ids("x", "a", "b"), stop=["ab c"])
    assert [d.text for d in deltas] == ["x", "", ""]
    assert tail == "ab" and detok.text == "xab" and not detok.stopped


@pytest.mark.parametrize(
    ("pieces", "stops", "expected"),
    [
        (("x", "a", "b", " c", " d"), ("c d", "b"), TextDelta("xa", "b", 3)),
        (("x", "a", "b", " c", " d"), ("b c", "ab c d"), TextDelta("xa", "b c", 4)),
        # One token completes both: the one that ends first wins...
        (("x", "abcd"), ("abcd", "bc"), TextDelta("xa", "bc", 2)),
        # ...and of two that end together, the one that starts first.
        (("x", "abc"), ("bc", "abc"), TextDelta("x", "abc", 2)),
    ],
)
def test_earliest_stop_string_wins(pieces: tuple[str, ...], stops: tuple[str, ...], expected: TextDelta) -> None:
    for order in (stops, stops[::-1]):
        deltas, _, _ = stream(HAND, hand_ids(*pieces), stop=order)
        assert TextDelta("".join(d.text for d in deltas), deltas[-1].stop, deltas[-1].stop_token_count) == expected


def test_multi_id_feed_stops_like_single_feeds() -> None:
    ids = hand_ids("x", "a", "b", " c", " d", "x")
    detok = IncrementalDetokenizer(HAND, stop=["ab c"])
    assert detok.feed(ids) == TextDelta("x", "ab c", 4)
    for chunks in ([2, 2, 2], [1, 3, 2], [3, 3], [5, 1]):
        deltas, _, _ = stream(HAND, ids, stop=["ab c"], chunks=chunks)
        assert "".join(d.text for d in deltas) == "x"
        assert (deltas[-1].stop, deltas[-1].stop_token_count) == ("ab c", 4)


def test_after_a_stop_feed_is_empty_and_finish_too() -> None:
    detok = IncrementalDetokenizer(HAND, stop=["y"])
    assert detok.feed(hand_ids("x", " y")) == TextDelta("x ", "y", 2)
    assert detok.feed(hand_ids(" c")) == TextDelta("", None)
    assert detok.finish() == "" and detok.text == "x "


def test_feed_after_finish_raises() -> None:
    detok = IncrementalDetokenizer(HAND)
    detok.feed(hand_ids("x"))
    assert detok.finish() == ""
    assert detok.finish() == ""
    with pytest.raises(RuntimeError):
        detok.feed(hand_ids("x"))


def test_empty_stop_string_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        IncrementalDetokenizer(HAND, stop=["a", ""])


def test_stop_string_in_the_prompt_does_not_stop() -> None:
    deltas, tail, detok = stream(HAND, hand_ids(" c"), prompt_ids=hand_ids("a", "b"), stop=["ab"])
    assert [d.text for d in deltas] == [" c"] and not detok.stopped and tail == ""


def test_window_stays_small_over_a_long_stream() -> None:
    ids = BYTE_LEVEL.encode(" ".join(TEXTS) * 20).ids
    detok = IncrementalDetokenizer(BYTE_LEVEL, stop=["never said"])
    for token_id in ids:
        detok.feed([token_id])
        assert len(detok._ids) <= 8
    assert detok.text + detok.finish() == BYTE_LEVEL.decode(ids)


# ----------------------------------------------------------------------------------------------------------------------
# Properties over random ids


@st.composite
def _sentencepiece_ids(draw: st.DrawFn) -> list[int]:
    """Random ids of a Llama-like tokenizer, byte tokens only as whole characters.

    ByteFallback decodes a run of byte tokens that is not valid UTF-8 as U+FFFD for every byte, characters complete
    before the bad byte included, which a stream cannot take back (see the module's docstring).
    """
    first_piece = 3 + 256
    piece = st.integers(0, SENTENCEPIECE.get_vocab_size() - 1).filter(lambda i: i < 3 or i >= first_piece)
    char = st.sampled_from([*"é猫東京", "🍎", "👍", "🏽"]).map(lambda c: [3 + b for b in c.encode()])
    groups = draw(st.lists(st.one_of(piece.map(lambda i: [i]), char), max_size=25))
    return [i for group in groups for i in group]


def _random_ids(tokenizer: Tokenizer, max_size: int) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, tokenizer.get_vocab_size() - 1), max_size=max_size)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), name=st.sampled_from(["byte_level", "wordpiece", "hand"]), skip=st.booleans())
def test_random_ids_stream_to_decode(data: st.DataObject, name: str, skip: bool) -> None:
    tokenizer = HAND if name == "hand" else TRAINED[name]
    prompt = data.draw(_random_ids(tokenizer, 8), label="prompt")
    ids = data.draw(_random_ids(tokenizer, 30), label="ids")
    chunks = data.draw(st.lists(st.integers(1, 5), max_size=30), label="chunks")
    check_stream(tokenizer, prompt, ids, skip_special_tokens=skip, chunks=chunks)


@settings(max_examples=100, deadline=None)
@given(data=st.data(), skip=st.booleans())
def test_random_sentencepiece_ids_stream_to_decode(data: st.DataObject, skip: bool) -> None:
    prompt = data.draw(_sentencepiece_ids(), label="prompt")
    ids = data.draw(_sentencepiece_ids(), label="ids")
    chunks = data.draw(st.lists(st.integers(1, 5), max_size=30), label="chunks")
    check_stream(SENTENCEPIECE, prompt, ids, skip_special_tokens=skip, chunks=chunks)


def _expected_stop(
    tokenizer: Tokenizer, prompt: Sequence[int], ids: Sequence[int], stops: Sequence[str]
) -> TextDelta | None:
    """The first generated id after which the complete text holds a stop string, and the text before it.

    The text after k ids is the reference less a trailing U+FFFD run (bytes that may still become a character).
    """
    for k in range(1, len(ids) + 1):
        text = reference(tokenizer, prompt, ids[:k]).rstrip("\ufffd")
        found = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
        if found:
            _, start, stop = min(found)
            return TextDelta(text[:start], stop, k)
    return None


@settings(max_examples=150, deadline=None)
@given(data=st.data(), name=st.sampled_from(["byte_level", "wordpiece", "hand"]))
def test_random_stop_strings_cut_at_the_first_completion(data: st.DataObject, name: str) -> None:
    tokenizer = HAND if name == "hand" else TRAINED[name]
    prompt = data.draw(_random_ids(tokenizer, 4), label="prompt")
    ids = data.draw(_random_ids(tokenizer, 25), label="ids")
    full = reference(tokenizer, prompt, ids)
    # Stops taken from the text itself (so that some match), and short ones that may or may not.
    cut = st.tuples(st.integers(0, len(full)), st.integers(1, 6)).map(lambda ab: full[ab[0] : ab[0] + ab[1]])
    other = st.text(alphabet="abc th.,", min_size=1, max_size=3)
    stops = data.draw(st.lists(st.one_of(cut, other).filter(lambda s: s and "\ufffd" not in s), max_size=3))
    chunks = data.draw(st.lists(st.integers(1, 5), max_size=25), label="chunks")
    deltas, tail, detok = stream(tokenizer, ids, prompt_ids=prompt, stop=stops, chunks=chunks)
    expected = _expected_stop(tokenizer, prompt, ids, stops)
    emitted = "".join(d.text for d in deltas)
    if expected is None:
        assert not detok.stopped and emitted + tail == full
    else:
        assert detok.stopped and tail == ""
        assert TextDelta(emitted, deltas[-1].stop, deltas[-1].stop_token_count) == expected
    # No stop string ever reaches the stream.
    for stop in stops:
        assert stop not in detok.text
