"""The Open Inference Protocol's BYTES tensors in raw form: the gateway's codec against an encoding written here."""

from __future__ import annotations

import struct
from collections.abc import Sequence

import pytest

from gateway.oip import converters
from services.common import errors


def raw_bytes(elements: Sequence[bytes]) -> bytes:
    """BYTES in raw form, written here independently of the server's codec: 4-byte LE length, then the bytes."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


@pytest.mark.parametrize("elements", [[], [b""], [b"a", b"", "naïve ☕".encode(), b"\x00" * 300]])
def test_bytes_tensor_codec(elements: list[bytes]) -> None:
    raw = converters.encode_bytes_tensor(elements)
    assert raw == raw_bytes(elements)
    assert converters.decode_bytes_tensor(raw, len(elements), "text") == elements
    with pytest.raises(errors.TandemError):
        converters.decode_bytes_tensor(raw, len(elements) + 1, "text")
