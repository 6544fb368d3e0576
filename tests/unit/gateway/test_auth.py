"""API keys without a server: the keys file, the headers a key is read from, and which listen addresses count as
loopback."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.__main__ import is_loopback
from gateway.auth import ADMIN, INFER, KeyRing, parse_keys, presented_key
from gateway.priority import OPEN, PriorityPolicy
from services.common.priority import Priority


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


def test_keys_carry_a_default_priority_and_a_cap() -> None:
    plain, batch, vip, both = parse_keys(
        "p; b priority=low; v infer max_priority=high; x admin priority=high max_priority=1", "env"
    )
    assert (plain.priority, plain.max_priority) == (Priority.NORMAL, Priority.NORMAL)
    assert (batch.priority, batch.max_priority) == (Priority.LOW, Priority.LOW)
    assert (vip.priority, vip.max_priority, vip.scopes) == (Priority.NORMAL, Priority.HIGH, frozenset({INFER}))
    assert (both.priority, both.max_priority, both.scopes) == (Priority.HIGH, Priority.HIGH, frozenset({ADMIN}))
    with pytest.raises(ValueError, match="entry 1: priority 'urgent' is not one of high"):
        parse_keys("k priority=urgent", "keys.txt")
    with pytest.raises(ValueError, match="entry 2: unknown option 'weight'"):
        parse_keys("a\nk weight=3", "keys.txt")
    with pytest.raises(ValueError, match="priority high is above max_priority normal"):
        parse_keys("k priority=high max_priority=normal", "keys.txt")


def test_a_request_asking_above_its_cap_is_lowered_to_it() -> None:
    normal_key = PriorityPolicy(Priority.NORMAL, Priority.NORMAL)
    assert normal_key.grant(None) == Priority.NORMAL
    assert normal_key.grant(Priority.HIGH) == Priority.NORMAL  # capped, not refused
    assert normal_key.grant(Priority.LOW) == Priority.LOW  # lowering is always allowed
    batch_key = PriorityPolicy(Priority.LOW, Priority.NORMAL)
    assert batch_key.grant(None) == Priority.LOW and batch_key.grant(Priority.HIGH) == Priority.NORMAL
    assert OPEN.grant(Priority.HIGH) == Priority.HIGH and OPEN.grant(None) == Priority.NORMAL


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
