"""API keys without a server: the keys file, the headers a key is read from, and which listen addresses count as
loopback."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.__main__ import is_loopback
from gateway.auth import ADMIN, INFER, KeyRing, parse_keys, presented_key


def test_keys_parse_with_scopes_comments_and_semicolons(tmp_path: Path) -> None:
    keys = parse_keys("a;b admin # ops\n\n c infer,admin", "env")
    assert [sorted(k.scopes) for k in keys] == [[INFER], [ADMIN], [ADMIN, INFER]]
    assert all(len(k.key_id) == 8 and k.key_id not in "abc" for k in keys)
    ring = KeyRing(keys)
    assert ring.find("b") is keys[1] and ring.find("d") is None and ring.find("") is None
    assert keys[1].allows(INFER)  # admin implies infer
    with pytest.raises(ValueError, match="unknown scope 'root'"):
        parse_keys("k root", "keys.txt")
    with pytest.raises(ValueError, match="entry 1"):
        parse_keys("k admin extra", "keys.txt")
    file = tmp_path / "keys"
    file.write_text("x admin\n")
    assert len(KeyRing.load(file, "y").keys) == 2
    assert not KeyRing.load(None, None).enabled


def test_credentials_are_read_from_either_header() -> None:
    assert presented_key([("x-api-key", " k1 ")]) == "k1"
    assert presented_key([("authorization", "Bearer k2")]) == "k2"
    assert presented_key([("authorization", "Basic k3")]) is None
    assert presented_key([("authorization", "Bearer ")]) is None
    assert presented_key(None) is None


@pytest.mark.parametrize(
    ("listen", "loopback"),
    [
        ("127.0.0.1:1", True),
        ("localhost:1", True),
        ("[::1]:1", True),
        ("unix:/tmp/x", True),
        ("0.0.0.0:1", False),
        ("[::]:1", False),
        ("10.0.0.5:1", False),
        ("gw.example:1", False),
    ],
)
def test_loopback_addresses(listen: str, loopback: bool) -> None:
    assert is_loopback(listen) is loopback
