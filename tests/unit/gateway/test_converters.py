"""The gateway's public-proto converters: the wire-level shortcut for embeddings equals the plain construction."""

from __future__ import annotations

import numpy as np
import pytest

from gateway import converters
from gateway.core import Embeddings, Served
from tandem.gateway.v1 import gateway_pb2


@pytest.mark.parametrize("shape", [(1, 384), (32, 384), (3, 1), (2, 40), (0, 8), (2, 0)])
def test_packed_embeddings_equal_the_message_built_element_by_element(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal(shape).astype(np.float32)
    if vectors.size:
        vectors.flat[0] = np.inf  # special values travel bit for bit
        vectors.flat[-1] = -0.0
    result = Embeddings(Served("m", "2", np.full(shape[0], 5, dtype=np.int32)), vectors)
    got = converters.embed_response(result)
    want = gateway_pb2.EmbedResponse(
        embeddings=[gateway_pb2.Embedding(values=row) for row in vectors.tolist()],
        model="m",
        model_version="2",
        usage=gateway_pb2.Usage(prompt_tokens=5 * shape[0], total_tokens=5 * shape[0]),
    )
    assert got == want
    assert got.SerializeToString(deterministic=True) == want.SerializeToString(deterministic=True)
    np.testing.assert_array_equal(
        np.array([e.values for e in got.embeddings], dtype=np.float32).reshape(shape), vectors
    )


def test_a_non_matrix_is_refused() -> None:
    with pytest.raises(ValueError, match="2-D"):
        converters.embed_response(Embeddings(Served("m", "1", np.zeros(1, np.int32)), np.zeros(3, np.float32)))
