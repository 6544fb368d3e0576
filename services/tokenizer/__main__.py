"""Runs the tokenizer stage: settings -> core -> servicer -> server."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from services.common import stage, tls
from services.common.default_model import open_repository
from services.common.metrics import TokenizerMetrics
from services.tokenizer.core import Tokenizer
from services.tokenizer.servicer import registrar
from services.tokenizer.settings import TokenizerSettings


def build_core(settings: TokenizerSettings) -> Tokenizer:
    repository = open_repository(settings)
    return Tokenizer(repository, max_inputs=settings.max_inputs)


async def serve(settings: TokenizerSettings, security: tls.ServiceTls | None = None) -> None:
    core = build_core(settings)
    await asyncio.to_thread(core.preload)
    await stage.serve("tokenizer", settings, security, [registrar(core)], observers=[TokenizerMetrics().observe])


def main(argv: Sequence[str] | None = None) -> None:
    stage.main("tokenizer", TokenizerSettings, serve, argv)


if __name__ == "__main__":
    main()
