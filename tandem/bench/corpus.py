"""The bench's corpus: deterministic synthetic sentences, so every run (and the bare model beside it) sees the same
texts."""

from __future__ import annotations

import random

# The words the sentences are drawn from; their order (and "the" listed twice) fixes the corpus of every seed. One
# string split, as a list literal would be formatted one word a line.
_WORDS = (  # noqa: SIM905
    "the quick brown fox jumps over lazy dog while a small team builds fast model servers for search and "
    "ranking on cheap machines with careful engineering every request travels through gateway tokenizer "
    "inference postprocess stages that scale independently across nodes in the cluster latency throughput "
    "memory cores threads batches queues deadlines errors metrics traces health checks versions models "
    "sentences words tokens vectors embeddings similarity music guitar weather market coffee river "
    "mountain city train airport garden kitchen library museum painting history science language travel "
    "morning"
).split()


def make_texts(kind: str, count: int, seed: int = 0) -> list[str]:
    """Deterministic synthetic sentences: 'short' (8-12 words, similar length) or 'mixed' (8-40 words)."""
    rng = random.Random(seed)
    low, high = (8, 12) if kind == "short" else (8, 40)
    return [
        " ".join(rng.choice(_WORDS) for _ in range(rng.randint(low, high))).capitalize() + "." for _ in range(count)
    ]


# Chat-like prompts (`tandem bench --api generate`): an opening that asks for something, a subject, and clauses of
# detail that make the lengths vary. Fixed lists, so a seed always gives the same prompts.
_ASKS = (
    "Can you explain",
    "Write a short note about",
    "What is the best way to think about",
    "Give me three ideas for",
    "Summarize what you know about",
    "How would you describe",
    "Tell me something surprising about",
    "Why do people care about",
)
_SUBJECTS = (
    "the weather in the mountains",
    "a small coffee shop by the river",
    "learning to play the guitar",
    "a train journey across the country",
    "the history of the city library",
    "painting a garden in the morning",
    "a museum of science and language",
    "cooking dinner in a tiny kitchen",
    "the market for old records",
    "travel on a tight budget",
)
_DETAILS = (
    "I am new to this",
    "keep it simple",
    "my friend asked me yesterday and I did not know what to say",
    "please use plain words",
    "it is for a class I teach on weekends",
    "I only have a few minutes",
    "the answer should fit in a paragraph",
    "assume I know nothing about it",
)

# Words of a prompt, as PROMPT_WORDS documents them: 8-48 words, about 10-60 tokens on English BPE vocabularies
# (SmolLM2's: the bench prints each run's exact token range with the model's own tokenizer).
PROMPT_WORDS = (8, 48)


def make_prompts(count: int, words: tuple[int, int] = PROMPT_WORDS, seed: int = 0) -> list[str]:
    """Deterministic chat-like prompts for generation: "<ask> <subject>? <Detail>, <detail>. <Detail> ..." cut to a
    word count drawn uniformly from `words` (inclusive), so prompt lengths vary the way short chat turns do. Each
    detail appears at most once in a prompt (a prompt runs out of them near 60 words)."""
    low, high = words
    if not 1 <= low <= high:
        raise ValueError(f"prompt words must be 1 <= low <= high, not {low}-{high}")
    rng = random.Random(f"prompts:{seed}")
    prompts = []
    for _ in range(count):
        target = rng.randint(low, high)
        details = rng.sample(_DETAILS, len(_DETAILS))
        text = f"{rng.choice(_ASKS)} {rng.choice(_SUBJECTS)}?"
        while len(text.split()) < target and details:
            detail = details.pop()
            if text[-1] in "?.":
                text += f" {detail[0].upper()}{detail[1:]}."
            else:
                text += f", {detail}."
            if rng.random() < 0.5:
                text = text[:-1]  # the next detail goes on in the same sentence
        cut = " ".join(text.split()[:target])
        prompts.append(cut if cut[-1] in "?." else cut.rstrip(",") + ".")
    return prompts
