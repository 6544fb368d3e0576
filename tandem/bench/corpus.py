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
