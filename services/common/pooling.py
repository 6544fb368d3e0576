"""Sentence pooling as sentence-transformers' Pooling does it, for both layouts the stages hold token rows in.

The postprocess stage pools ragged rows (every row a real token, sequences split by cu_seqlens); the inference stage
pools the padded [rows, width, dim] output of a model call before answering (InferRequest.pool), so the token rows
never cross a hop. Both accumulate means in float64 and give the same numbers.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

POOLINGS = ("mean", "cls", "max")
# What sentence-transformers clamps the token count to.
_MIN_TOKENS = 1e-9

FloatArray = npt.NDArray[np.float32]


def check_pooling(pooling: str) -> str:
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    return pooling


def pool_ragged(token_embeddings: FloatArray, cu_seqlens: npt.NDArray[np.integer], pooling: str) -> FloatArray:
    """[n, dim] from [total_tokens, dim] split by cu_seqlens. Sequences must be non-empty: np.*.reduceat gives the
    row at the index, not an empty reduction, for a zero-length segment."""
    starts = cu_seqlens[:-1]
    pooled: npt.NDArray[np.floating]
    if pooling == "cls":
        pooled = token_embeddings[starts]
    elif pooling == "max":
        pooled = np.maximum.reduceat(token_embeddings, starts, axis=0)
    else:
        # A float64 accumulator: reduceat sums sequentially, and float32 drifts over thousands of tokens.
        sums = np.add.reduceat(token_embeddings, starts, axis=0, dtype=np.float64)
        counts = np.maximum(np.diff(cu_seqlens).astype(np.float64), _MIN_TOKENS)
        pooled = sums / counts[:, None]
    return pooled.astype(np.float32, copy=False)


def pool_padded(hidden: FloatArray, attention_mask: npt.NDArray[np.integer], pooling: str) -> FloatArray:
    """[rows, dim] from a padded model output [rows, width, dim] and the attention mask it ran with [rows, width]
    (1 for a real token, real tokens first)."""
    if pooling == "cls":
        return np.ascontiguousarray(hidden[:, 0], dtype=np.float32)
    real = attention_mask.astype(bool)
    pooled: npt.NDArray[np.floating]
    if pooling == "max":
        pooled = np.where(real[:, :, None], hidden, -np.inf).max(axis=1)
    else:
        sums = np.einsum("rtd,rt->rd", hidden, real, dtype=np.float64)
        pooled = sums / np.maximum(real.sum(axis=1, dtype=np.float64), _MIN_TOKENS)[:, None]
    return pooled.astype(np.float32, copy=False)
