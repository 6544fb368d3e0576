"""What requests and management calls name: 'name', 'name:version' or 'name@alias', and the checks that keep a
name one plain folder of the repository."""

from __future__ import annotations

import re
from typing import NamedTuple

from services.common import errors

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
ALIAS_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]{0,63}")
VERSION_PATTERN = re.compile(r"[1-9][0-9]{0,8}")


class Reference(NamedTuple):
    """What a request names: a model (empty: the default one) and at most one of a version and an alias."""

    name: str
    version: str | None = None
    alias: str | None = None


def parse_reference(ref: str) -> Reference:
    """'name', 'name:version' or 'name@alias'."""
    if "@" in ref:
        name, _, alias = ref.partition("@")
        if ":" in name:
            raise errors.invalid_argument(f"name a version or an alias, not both: {ref!r}", "model")
        if not ALIAS_PATTERN.fullmatch(alias):
            raise errors.invalid_argument(
                f"alias must be a letter followed by letters, digits, '_', '-' or '.', got {alias!r}", "model"
            )
        return Reference(name, alias=alias)
    name, sep, version = ref.partition(":")
    if sep and not version.isdigit():
        raise errors.invalid_argument(f"model version must be a number, got {version!r}", "model")
    return Reference(name, version if sep else None)


def check_name(name: str, field_name: str = "name") -> str:
    """A model name that is one plain folder name (no separators, no '..', not absolute): INVALID_ARGUMENT if not."""
    if not NAME_PATTERN.fullmatch(name):
        raise errors.invalid_argument(
            f"model name must be one folder name of letters, digits, '_', '-' or '.' (at most 128, not starting with"
            f" '.' or '-'), got {name!r}",
            field_name,
        )
    return name


def check_version(version: str, field_name: str = "version") -> str:
    if not VERSION_PATTERN.fullmatch(version):
        raise errors.invalid_argument(f"version must be a positive number, got {version!r}", field_name)
    return version


def check_alias(alias: str, field_name: str = "alias") -> str:
    if not ALIAS_PATTERN.fullmatch(alias):
        raise errors.invalid_argument(
            f"alias must be a letter followed by letters, digits, '_', '-' or '.' (at most 64), got {alias!r}",
            field_name,
        )
    return alias
