"""Model management through the gateway reaches every inference replica, as `tandem serve --replicas inference=2`
runs them: an unload or load applies to both, so a request for the model gets the same answer whichever replica it
lands on; ListModels shows each replica's state, and a disagreement between them; a call that one replica missed
fails, saying which.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import grpc
import pytest

from tandem.cli.supervisor import Supervisor
from tandem.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tandem.management.v1 import management_pb2 as M  # noqa: N812
from tandem.management.v1 import management_pb2_grpc
from tests.status import details_of

pytestmark = pytest.mark.e2e

MODEL = "tiny-embed"
REQUESTS = 6  # enough for round_robin to send requests to both replicas several times
READY, UNLOADED, MIXED = M.VERSION_STATE_READY, M.VERSION_STATE_UNLOADED, M.VERSION_STATE_MIXED


@pytest.fixture(scope="module")
def deployment(served_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Supervisor]:
    """One tokenizer, two inference replicas, one postprocess, behind one gateway (as `tandem serve --replicas
    inference=2`), with the gateway's default model cache: whether a request finds a description from before the
    unload or after it, the inference replica it reaches is what answers it, so the code is the same."""
    repository = tmp_path_factory.mktemp("replicas-repo")
    shutil.copytree(served_repository / MODEL, repository / MODEL)
    supervisor = Supervisor(
        port=0,
        repository=repository,
        home=tmp_path_factory.mktemp("replicas-home"),
        log_level="WARNING",
        startup_timeout_s=240,
        replicas={"tokenizer": 1, "inference": 2, "postprocess": 1},
        extra={
            **{role: ["--grace-s", "2"] for role in ("tokenizer", "inference", "postprocess")},
        },
    )
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        supervisor.start()
        yield supervisor
    finally:
        supervisor.stop(grace_s=10)


def address_of(supervisor: Supervisor, name: str) -> str:
    address = supervisor.members[name].address
    assert address is not None
    return address


def replica_addresses(supervisor: Supervisor) -> list[str]:
    """The inference replicas as the gateway names them (host:port), in the order of its `ipv4:` target."""
    return [address_of(supervisor, f"inference-{i}").removeprefix("ipv4:") for i in range(2)]


def states(model: M.ModelStatus) -> set[int]:
    return {v.state for v in model.versions}


def only(models: Iterable[M.ModelStatus], name: str = MODEL) -> M.ModelStatus:
    models = list(models)
    found = [m for m in models if m.name == name]
    assert len(found) == 1, models
    return found[0]


def request_outcomes(channel: grpc.Channel) -> tuple[list[tuple[grpc.StatusCode, str, str]], set[bool]]:
    """(code, reason, message) of REQUESTS embed requests, then what REQUESTS GetModels say of `ready`.

    The gateway sends inference calls to the replicas in turn (round_robin), so both replicas answer Embeds and both
    answer GetModels. (Before management reached every replica, an unload reached one: Embeds failed or succeeded by
    the replica they landed on, and GetModel said ready on one of them.)
    """
    stub = gateway_pb2_grpc.GatewayServiceStub(channel)
    outcomes: list[tuple[grpc.StatusCode, str, str]] = []
    for _ in range(REQUESTS):
        try:
            stub.Embed(gateway_pb2.EmbedRequest(model=MODEL, inputs=["hello replicas"]), timeout=30)
            outcomes.append((grpc.StatusCode.OK, "", ""))
        except grpc.RpcError as exc:
            d = details_of(exc)
            outcomes.append((d.code, d.reason or "", d.message))
    ready = {stub.GetModel(gateway_pb2.GetModelRequest(model=MODEL), timeout=30).model.ready for _ in range(REQUESTS)}
    return outcomes, ready


def all_served(channel: grpc.Channel) -> bool:
    outcomes, ready = request_outcomes(channel)
    return {c for c, _, _ in outcomes} == {grpc.StatusCode.OK} and ready == {True}


def test_unload_and_load_reach_every_replica_and_list_models_shows_them(deployment: Supervisor) -> None:
    replicas = replica_addresses(deployment)
    with grpc.insecure_channel(address_of(deployment, "gateway-0")) as channel:
        management = management_pb2_grpc.ManagementServiceStub(channel)
        assert all_served(channel)

        listed = management.ListModels(M.ListModelsRequest(), timeout=30)
        assert [r.address for r in listed.replicas] == replicas
        assert [(r.code, states(only(r.models))) for r in listed.replicas] == [(0, {READY}), (0, {READY})]
        assert states(only(listed.models)) == {READY}

        # Unloaded through the gateway: on both replicas, so every request fails alike, wherever it lands.
        unloaded = management.UnloadModel(M.UnloadModelRequest(name=MODEL, wait=True), timeout=60)
        assert [(r.address, r.code, states(only(r.models))) for r in unloaded.replicas] == [
            (replicas[0], 0, {UNLOADED}),
            (replicas[1], 0, {UNLOADED}),
        ]
        assert states(unloaded.model) == {UNLOADED}
        outcomes, ready = request_outcomes(channel)
        assert ready == {False}
        assert len(set(outcomes)) == 1, outcomes
        code, reason, message = outcomes[0]
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "MODEL_NOT_LOADED"), outcomes
        assert MODEL in message
        listed = management.ListModels(M.ListModelsRequest(), timeout=30)
        assert [states(only(r.models)) for r in listed.replicas] == [{UNLOADED}, {UNLOADED}]
        assert states(only(listed.models)) == {UNLOADED}

        # Loaded again through the gateway: back on both.
        loaded = management.LoadModel(M.LoadModelRequest(name=MODEL, wait=True), timeout=120)
        assert [(r.code, states(only(r.models))) for r in loaded.replicas] == [(0, {READY}), (0, {READY})]
        assert states(loaded.model) == {READY}
        assert all_served(channel)

        # One replica unloaded behind the gateway's back (on its own address): the gateway's listing shows the
        # disagreement instead of whichever replica answered.
        with grpc.insecure_channel(address_of(deployment, "inference-0")) as direct:
            management_pb2_grpc.ManagementServiceStub(direct).UnloadModel(
                M.UnloadModelRequest(name=MODEL, wait=True), timeout=60
            )
        listed = management.ListModels(M.ListModelsRequest(), timeout=30)
        by_address = {r.address: states(only(r.models)) for r in listed.replicas}
        inference_0 = address_of(deployment, "inference-0").removeprefix("ipv4:")
        inference_1 = address_of(deployment, "inference-1").removeprefix("ipv4:")
        assert by_address == {inference_0: {UNLOADED}, inference_1: {READY}}
        merged = only(listed.models)
        assert states(merged) == {MIXED}
        assert merged.default_version == ""
        reason = merged.versions[0].reason
        assert f"{inference_0}: UNLOADED" in reason and f"{inference_1}: READY" in reason, reason

        # LoadModel through the gateway brings them together again.
        management.LoadModel(M.LoadModelRequest(name=MODEL, wait=True), timeout=120)
        assert states(only(management.ListModels(M.ListModelsRequest(), timeout=30).models)) == {READY}
        assert all_served(channel)


def test_a_call_one_replica_missed_fails_saying_which(deployment: Supervisor) -> None:
    """Last in the module: it stops a replica."""
    inference_1 = address_of(deployment, "inference-1").removeprefix("ipv4:")
    inference_0 = address_of(deployment, "inference-0").removeprefix("ipv4:")
    deployment.terminate("inference-1", grace_s=10)
    with grpc.insecure_channel(address_of(deployment, "gateway-0")) as channel:
        management = management_pb2_grpc.ManagementServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            management.UnloadModel(M.UnloadModelRequest(name=MODEL, wait=True), timeout=60)
        d = details_of(caught.value)
        assert (d.code, d.reason) == (grpc.StatusCode.UNAVAILABLE, "STAGE_UNAVAILABLE")
        assert d.message.startswith("UnloadModel failed on 1 of 2 inference replicas"), d.message
        assert f"applied on {inference_0}" in d.message
        assert d.metadata["failed_replicas"] == inference_1
        assert d.metadata["applied_replicas"] == inference_0

        # The listing still answers, from the replica that does, and names the one that did not.
        listed = management.ListModels(M.ListModelsRequest(), timeout=30)
        codes = {r.address: r.code for r in listed.replicas}
        assert codes == {inference_0: 0, inference_1: grpc.StatusCode.UNAVAILABLE.value[0]}
        assert states(only(listed.models)) == {UNLOADED}
