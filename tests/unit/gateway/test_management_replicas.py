"""The gateway's management over several inference replicas: which replicas a target names, how their answers merge
(no disagreement hidden), and how a call that failed on some of them is reported."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2

from gateway.management import targets
from gateway.management.client import ReplicaOutcome, settle
from gateway.management.merge import merge_models
from gateway.management.targets import Replica
from services.common import errors
from services.common.errors import Reason
from tandem.management.v1 import management_pb2 as M  # noqa: N812


@pytest.mark.parametrize(
    ("target", "replicas"),
    [
        (
            "ipv4:127.0.0.1:5001,127.0.0.1:5002",
            [Replica("127.0.0.1:5001", "ipv4:127.0.0.1:5001"), Replica("127.0.0.1:5002", "ipv4:127.0.0.1:5002")],
        ),
        ("ipv6:[::1]:5001", [Replica("[::1]:5001", "ipv6:[::1]:5001")]),
        ("127.0.0.1:50053", [Replica("127.0.0.1:50053", "127.0.0.1:50053")]),
        ("inference.local:50053", [Replica("inference.local:50053", "inference.local:50053")]),
        (
            "unix:/run/tandem/inference.sock",
            [Replica("unix:/run/tandem/inference.sock", "unix:/run/tandem/inference.sock")],
        ),
        ("dns:///tandem-inference:50053", None),
    ],
)
def test_the_replicas_a_target_lists(target: str, replicas: list[Replica] | None) -> None:
    assert targets.listed(target) == replicas


@pytest.mark.parametrize(
    ("target", "name"),
    [
        ("dns:///tandem-inference:50053", ("tandem-inference", "50053")),
        ("dns://8.8.8.8/tandem-inference:50053", ("tandem-inference", "50053")),
        ("dns:tandem-inference:50053", ("tandem-inference", "50053")),
        ("dns:///tandem-inference", ("tandem-inference", "443")),
        ("dns:///[::1]:7", ("::1", "7")),
        ("ipv4:127.0.0.1:1", None),
    ],
)
def test_dns_targets_name_a_host_and_port(target: str, name: tuple[str, str] | None) -> None:
    assert targets.dns_name(target) == name


def _info(family: int, address: str) -> tuple[Any, ...]:
    return (family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, 50053))


async def test_a_dns_name_is_every_address_it_resolves_to_in_one_family(monkeypatch: pytest.MonkeyPatch) -> None:
    async def getaddrinfo(host: str, port: str, **_: Any) -> list[tuple[Any, ...]]:
        assert (host, port) == ("tandem-inference", "50053")
        return [
            _info(socket.AF_INET6, "fd00::2"),
            _info(socket.AF_INET, "10.0.0.12"),
            _info(socket.AF_INET, "10.0.0.3"),
            _info(socket.AF_INET, "10.0.0.3"),  # once per socket type, or per family of a dual-stack pod
        ]

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", getaddrinfo)
    assert await targets.resolve("dns:///tandem-inference:50053", 5.0) == [
        Replica("10.0.0.3:50053", "ipv4:10.0.0.3:50053", "tandem-inference"),
        Replica("10.0.0.12:50053", "ipv4:10.0.0.12:50053", "tandem-inference"),
    ]


async def test_a_name_that_does_not_resolve_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    async def getaddrinfo(host: str, port: str, **_: Any) -> list[tuple[Any, ...]]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", getaddrinfo)
    with pytest.raises(errors.TandemError) as caught:
        await targets.resolve("dns:///tandem-inference:50053", 5.0)
    assert (caught.value.code, caught.value.reason) == (grpc.StatusCode.UNAVAILABLE, Reason.STAGE_UNAVAILABLE)
    assert "looking up 'tandem-inference' failed" in caught.value.message


def _model(*versions: tuple[str, M.VersionState.ValueType], default: str = "1", in_flight: int = 0) -> M.ModelStatus:
    return M.ModelStatus(
        name="emb",
        default_version=default,
        versions=[
            M.VersionStatus(version=v, state=s, is_default=v == default, in_flight=in_flight) for v, s in versions
        ],
    )


READY, UNLOADED, MIXED = M.VERSION_STATE_READY, M.VERSION_STATE_UNLOADED, M.VERSION_STATE_MIXED


def test_one_replica_is_shown_as_it_answered() -> None:
    model = _model(("1", READY), ("2", UNLOADED))
    model.versions[1].reason = "outside the version policy"
    assert merge_models([("a:1", [model])]) == [model]


def test_replicas_that_agree_are_shown_as_one_with_their_requests_summed() -> None:
    (merged,) = merge_models(
        [("a:1", [_model(("1", READY), in_flight=2)]), ("b:1", [_model(("1", READY), in_flight=3)])]
    )
    assert (merged.versions[0].state, merged.versions[0].in_flight, merged.default_version) == (READY, 5, "1")
    assert merged.reason == ""


def test_a_disagreement_is_mixed_and_names_each_replica() -> None:
    unloaded = _model(("1", UNLOADED), default="")
    unloaded.versions[0].reason = "unloaded on request"
    (merged,) = merge_models([("a:1", [unloaded]), ("b:1", [_model(("1", READY))])])
    version = merged.versions[0]
    assert (version.state, version.is_default, merged.default_version) == (MIXED, False, "")
    assert version.reason == ("inference replicas disagree: a:1: UNLOADED (unloaded on request); b:1: READY [default]")
    assert "disagree on the default version: a:1: none; b:1: 1" in merged.reason


def test_a_model_or_version_one_replica_does_not_list_is_mixed() -> None:
    merged = merge_models([("a:1", [_model(("1", READY), ("2", READY))]), ("b:1", [_model(("1", READY))])])
    assert [(v.version, v.state) for v in merged[0].versions] == [("1", READY), ("2", MIXED)]
    assert "b:1: not listed" in merged[0].versions[1].reason
    (alone,) = merge_models([("a:1", [_model(("1", READY))]), ("b:1", [])])
    assert (alone.versions[0].state, alone.default_version) == (MIXED, "")
    assert "not listed by inference replica b:1" in alone.reason


def _failed(address: str, err: errors.TandemError) -> ReplicaOutcome[M.UnloadModelResponse]:
    return ReplicaOutcome(address, error=err)


def test_a_failure_on_every_replica_is_passed_on_as_the_replica_sent_it() -> None:
    err = errors.not_found("model 'nope' not found", model="nope")
    with pytest.raises(errors.TandemError) as caught:
        settle("UnloadModel", [_failed("a:1", err), _failed("b:1", err)])
    assert caught.value is err


def test_a_failure_on_some_replicas_says_where_it_was_applied_and_where_not() -> None:
    down = errors.unavailable("the inference stage is unavailable: refused", reason=Reason.STAGE_UNAVAILABLE)
    outcomes: list[ReplicaOutcome[M.UnloadModelResponse]] = [
        ReplicaOutcome("a:1", response=M.UnloadModelResponse()),
        _failed("b:1", down),
    ]
    with pytest.raises(errors.TandemError) as caught:
        settle("UnloadModel", outcomes)
    status = caught.value.to_status_proto()
    assert status.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert status.message == (
        "UnloadModel failed on 1 of 2 inference replicas (b:1: UNAVAILABLE: the inference stage is unavailable: "
        "refused); applied on a:1"
    )
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.reason == "STAGE_UNAVAILABLE"
    assert dict(info.metadata) == {"replicas": "a:1,b:1", "failed_replicas": "b:1", "applied_replicas": "a:1"}
    # A listing needs one replica's answer; the others' errors travel in the response instead.
    assert settle("ListModels", outcomes, every=False) == outcomes[:1]


def test_an_alias_another_replica_deleted_counts_as_deleted() -> None:
    gone = errors.not_found("model 'emb' has no alias 'canary'", model="emb", alias="canary")
    outcomes: list[ReplicaOutcome[M.DeleteAliasResponse]] = [
        ReplicaOutcome("a:1", response=M.DeleteAliasResponse()),
        ReplicaOutcome("b:1", error=gone),
    ]
    assert settle("DeleteAlias", outcomes, tolerated=lambda e: e.metadata.get("alias") == "canary") == outcomes[:1]
    with pytest.raises(errors.TandemError) as caught:
        settle("DeleteAlias", [_failed("a:1", gone), _failed("b:1", gone)], tolerated=lambda e: True)
    assert caught.value is gone
