"""Runs the postprocess stage: settings -> core -> servicer -> server."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from services.common import stage, tls
from services.common.default_model import open_repository
from services.postprocess.core import Postprocessor
from services.postprocess.servicer import registrar
from services.postprocess.settings import PostprocessSettings


def build_core(settings: PostprocessSettings) -> Postprocessor:
    repository = open_repository(settings)
    return Postprocessor(repository)


async def serve(settings: PostprocessSettings, security: tls.ServiceTls | None = None) -> None:
    core = build_core(settings)
    await asyncio.to_thread(core.preload)
    await stage.serve("postprocess", settings, security, [registrar(core)])


def main(argv: Sequence[str] | None = None) -> None:
    stage.main("postprocess", PostprocessSettings, serve, argv)


if __name__ == "__main__":
    main()
