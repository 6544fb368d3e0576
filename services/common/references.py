"""What requests and management calls name: 'name', 'name:version' or 'name@alias', and the checks that keep a
name one plain folder of the repository.

One rule for model names everywhere (requests, management calls, the CLI, folders in the repository): 1-128
characters of ASCII letters, digits, '_', '-' and '.', starting with a letter or a digit. The gateway and every
stage check it before anything touches the file system, so no name a caller sends can reach a path."""

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


def _shown(text: str, limit: int = 80) -> str:
    """A caller's text for an error message: quoted and escaped by repr, cut to `limit` characters."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


def parse_reference(ref: str, field_name: str = "model") -> Reference:
    """'name', 'name:version' or 'name@alias' (an empty name: the default model); INVALID_ARGUMENT on `field_name`
    for anything outside the name, version and alias rules."""
    if "@" in ref:
        name, _, alias = ref.partition("@")
        if ":" in name:
            raise errors.invalid_argument(f"name a version or an alias, not both: {_shown(ref)}", field_name)
        check_alias(alias, field_name)
        version = None
    else:
        name, sep, text = ref.partition(":")
        if sep and not VERSION_PATTERN.fullmatch(text):
            raise errors.invalid_argument(
                f"model version must be a number from 1 to 999999999, got {_shown(text)}", field_name
            )
        version, alias = (text if sep else None), None
    if name:
        check_name(name, field_name)
    return Reference(name, version, alias)


def check_reference(ref: str, field_name: str = "model") -> str:
    """The reference unchanged when it follows the rules (see parse_reference), else INVALID_ARGUMENT."""
    parse_reference(ref, field_name)
    return ref


def check_name(name: str, field_name: str = "name") -> str:
    """A model name that is one plain folder name (no separators, no '..', not absolute): INVALID_ARGUMENT if not."""
    if not NAME_PATTERN.fullmatch(name):
        raise errors.invalid_argument(
            f"model name must be 1-128 ASCII letters, digits, '_', '-' or '.', starting with a letter or a digit; got"
            f" {_shown(name)}",
            field_name,
        )
    return name


def check_version(version: str, field_name: str = "version") -> str:
    if not VERSION_PATTERN.fullmatch(version):
        raise errors.invalid_argument(
            f"version must be a number from 1 to 999999999, got {_shown(version)}", field_name
        )
    return version


def check_alias(alias: str, field_name: str = "alias") -> str:
    if not ALIAS_PATTERN.fullmatch(alias):
        raise errors.invalid_argument(
            f"alias must be a letter followed by letters, digits, '_', '-' or '.' (at most 64), got {_shown(alias)}",
            field_name,
        )
    return alias
