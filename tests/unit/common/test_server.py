"""The services' main(): what start-up creates is frozen out of the garbage collector's reach, and garbage made later
is still found."""

from __future__ import annotations

import gc
import logging
import weakref
from collections.abc import Coroutine
from typing import Any

import pytest

import gateway.__main__ as gateway_main
from services.common import event_loop, stage, tls
from services.tokenizer.settings import TokenizerSettings


class _Cycle:
    def __init__(self) -> None:
        self.me = self


@pytest.mark.parametrize("role", ["gateway", "tokenizer"])
def test_services_start_serving_with_imported_objects_out_of_the_collectors_reach(
    role: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Full collections stop the event loop for as long as they walk every object (95 ms in the inference stage
    with torch imported); main() freezes what start-up created, and garbage made while serving is still found."""
    frozen_at_serve: list[int] = []

    def fake_run(main: Coroutine[Any, Any, None], choice: str) -> None:
        frozen_at_serve.append(gc.get_freeze_count())
        main.close()

    monkeypatch.setattr(event_loop, "run", fake_run)
    monkeypatch.setattr(logging.getLogger(), "handlers", list(logging.getLogger().handlers))
    try:
        if role == "gateway":
            gateway_main.main(["--listen", "127.0.0.1:0"])
        else:

            async def serve_stage(settings: TokenizerSettings, security: tls.ServiceTls) -> None:
                return None

            stage.main("tokenizer", TokenizerSettings, serve_stage, ["--listen", "127.0.0.1:0"])
        assert frozen_at_serve and frozen_at_serve[0] > 1000
        cycle = _Cycle()
        gone = weakref.ref(cycle)
        del cycle
        gc.collect()
        assert gone() is None
    finally:
        gc.unfreeze()
