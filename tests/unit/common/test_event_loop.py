"""--event-loop: uvloop where installed (auto), asyncio's own on request, a clear error for a missing uvloop."""

from __future__ import annotations

import asyncio
import builtins
import logging
from typing import Any

import pytest

from services.common import event_loop, stage, tls
from services.postprocess.settings import PostprocessSettings


async def _loop_type() -> None:
    running.append(type(asyncio.get_running_loop()).__module__)


running: list[str] = []


@pytest.mark.parametrize(("choice", "module"), [("auto", "uvloop"), ("uvloop", "uvloop"), ("asyncio", "asyncio")])
def test_each_choice_runs_on_its_loop(choice: event_loop.EventLoop, module: str) -> None:
    pytest.importorskip("uvloop")
    running.clear()
    event_loop.run(_loop_type(), choice)
    assert running and running[0].split(".")[0] == module
    assert event_loop.name(choice) == module


@pytest.fixture
def no_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def without_uvloop(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "uvloop":
            raise ImportError("No module named 'uvloop'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_uvloop)


@pytest.mark.usefixtures("no_uvloop")
def test_without_uvloop_auto_falls_back_and_uvloop_is_refused() -> None:
    assert event_loop.loop_factory("auto") is None
    assert event_loop.name("auto") == "asyncio"
    with pytest.raises(event_loop.EventLoopUnavailableError, match="uvloop is not installed"):
        event_loop.loop_factory("uvloop")


@pytest.mark.usefixtures("no_uvloop")
def test_a_stage_asked_for_a_missing_uvloop_exits_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exit status 1 and the reason on stderr, before anything serves."""
    monkeypatch.setattr(logging.getLogger(), "handlers", list(logging.getLogger().handlers))

    async def serve_stage(settings: PostprocessSettings, security: tls.ServiceTls) -> None:
        raise AssertionError("served")

    with pytest.raises(SystemExit) as exited:
        stage.main(
            "postprocess", PostprocessSettings, serve_stage, ["--listen", "127.0.0.1:0", "--event-loop", "uvloop"]
        )
    assert exited.value.code == 1
    assert "--event-loop uvloop: uvloop is not installed" in capsys.readouterr().err
