"""The model repository: one folder per model with tandem.json, numbered version folders of Hugging Face files,
aliases (aliases.json) and per-version metadata (metadata.json), read the same way by every stage."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from services.common import errors
from services.common.errors import Reason
from services.common.references import (
    ALIAS_PATTERN,
    NAME_PATTERN,
    VERSION_PATTERN,
    check_alias,
    check_name,
    check_version,
    parse_reference,
)
from services.common.repository import files
from services.common.repository.config import ALIASES_FILE, CONFIG_FILE, ModelConfig, ModelVersion, VersionPolicy
from services.common.repository.versions import load_version

log = logging.getLogger(__name__)

# The alias that requests naming only the model follow, when a model has it.
DEFAULT_ALIAS = "stable"


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


@dataclass(frozen=True)
class Listing:
    """One model folder as last read: versions (ascending), aliases, version policy, and what could not be read."""

    versions: tuple[str, ...]
    aliases: Mapping[str, str]
    policy: VersionPolicy
    config_error: str = ""
    aliases_error: str = ""


class UnknownNames:
    """Names recently found not to be models, each remembered for `ttl_s` and at most `max_names` of them (the
    oldest go first): asking for one again soon costs no file-system lookup, and callers who invent names cannot make
    the memory or the work of a stage grow."""

    def __init__(self, ttl_s: float = 2.0, max_names: int = 1024) -> None:
        self.ttl_s = ttl_s
        self.max_names = max_names
        self._until: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def __contains__(self, name: object) -> bool:
        with self._lock:
            until = self._until.get(name)  # type: ignore[call-overload]
            if until is None:
                return False
            if until > time.monotonic():
                return True
            del self._until[name]  # type: ignore[arg-type]
            return False

    def __len__(self) -> int:
        return len(self._until)

    def add(self, name: str) -> None:
        with self._lock:
            self._until.pop(name, None)
            self._until[name] = time.monotonic() + self.ttl_s
            while len(self._until) > self.max_names:
                self._until.popitem(last=False)

    def discard(self, name: str) -> None:
        with self._lock:
            self._until.pop(name, None)


class ModelRepository:
    """Reads models from a repository folder; resolves 'name', 'name:version' and 'name@alias'."""

    def __init__(
        self, root: Path, default_model: str | None = None, rescan_s: float = 1.0, gguf_cache: Path | None = None
    ) -> None:
        self.root = root
        self.rescan_s = rescan_s
        # Where models given as GGUF files (tandem.json's gguf_file) are converted to; None: ~/.cache/tandem/gguf.
        self.gguf_cache = gguf_cache
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str], ModelVersion] = {}
        # Listings are reused for `rescan_s`, so a request costs no directory scan on the event loop, while a
        # version folder or alias added to the repository is still seen within a second.
        self._listings: dict[str, tuple[float, Listing | None]] = {}
        self.unknown = UnknownNames(ttl_s=max(rescan_s, 1.0))
        self.default_model = default_model or self._marked_default()

    def _marked_default(self) -> str | None:
        """The only model, or the only one whose tandem.json says "default": true; None when neither picks one."""
        names = self.names()
        if len(names) == 1:
            return names[0]
        marked = []
        for name in names:
            try:
                if json.loads((self.root / name / CONFIG_FILE).read_text()).get("default") is True:
                    marked.append(name)
            except (OSError, ValueError, AttributeError):
                continue  # a broken tandem.json is reported when that model is loaded
        if len(marked) > 1:
            log.warning("models %s are each marked default in %s: requests must name a model", marked, self.root)
        return marked[0] if len(marked) == 1 else None

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        # A folder whose name breaks the naming rule could never be named by a request: it is not listed.
        return sorted(
            p.name for p in self.root.iterdir() if NAME_PATTERN.fullmatch(p.name) and (p / CONFIG_FILE).is_file()
        )

    def versions(self, name: str) -> list[str]:
        folder = self._model_folder(name)
        found = (int(p.name) for p in folder.iterdir() if p.name.isdigit() and not p.name.startswith("0"))
        return [str(v) for v in sorted(found) if (folder / str(v)).is_dir()]

    def _model_folder(self, name: str) -> Path:
        # Names follow the one rule (a single plain path component, short enough for any file system) before the
        # file system is asked anything: nothing outside the root can be named, no name can make an OSError.
        check_name(name, "model")
        if not (self.root / name / CONFIG_FILE).is_file():
            raise errors.not_found(f"model {name!r} not found", model=name)
        return self.root / name

    def contained_folder(self, name: str, version: str | None = None) -> Path:
        """The folder of a model (or of one version) named by a management request, refused with INVALID_ARGUMENT
        when the name is not a plain folder name or the folder (through symlinks) lies outside the repository.

        Only names and links are looked at, no file is read, so a refused request reads nothing."""
        check_name(name, "name")
        if version is not None:
            check_version(version, "version")
        root = self.root.resolve()
        folder = self.root / name
        if (folder.is_symlink() or folder.exists()) and (
            not _inside(folder.resolve(), root) or folder.resolve() == root
        ):
            raise errors.invalid_argument(f"model folder {name!r} points outside the repository", "name")
        if not (folder / CONFIG_FILE).is_file():
            raise errors.not_found(f"model {name!r} not found", model=name)
        if version is None:
            return folder
        target = folder / version
        if (target.is_symlink() or target.exists()) and not _inside(target.resolve(), root):
            raise errors.invalid_argument(f"version folder {name}/{version} points outside the repository", "version")
        if not target.is_dir():
            raise errors.not_found(f"model {name!r} has no version {version}", model=name, version=version)
        return target

    def config(self, name: str) -> ModelConfig:
        path = self._model_folder(name) / CONFIG_FILE
        try:
            return ModelConfig.model_validate(files.read_json(path))
        except (ValidationError, ValueError, OSError) as exc:
            raise errors.failed_precondition(
                f"model {name!r} has an invalid {CONFIG_FILE}: {exc}", reason=Reason.MODEL_CONFIG_INVALID, model=name
            ) from exc

    def aliases(self, name: str) -> dict[str, str]:
        """aliases.json of a model, read now: alias -> version. ValueError when the file is unreadable."""
        path = self._model_folder(name) / ALIASES_FILE
        if not path.is_file():
            return {}
        aliases: dict[str, str] = {}
        for alias, version in files.read_json(path).items():
            # Written as strings; numbers typed by hand ({"stable": 2}) are taken too.
            text = str(version) if isinstance(version, int) and not isinstance(version, bool) else version
            if not isinstance(text, str) or not ALIAS_PATTERN.fullmatch(alias) or not VERSION_PATTERN.fullmatch(text):
                raise ValueError(f"{ALIASES_FILE} maps {alias!r} to {version!r}; expected alias -> version number")
            aliases[alias] = text
        return aliases

    def set_alias(self, name: str, alias: str, version: str) -> dict[str, str]:
        """Points an alias at an existing version in aliases.json (atomically, under the model's lock)."""
        check_alias(alias)
        folder = self.contained_folder(name, version).parent
        with self._writing(name, folder):
            current = self.aliases(name)
            current[alias] = version
            files.write_json_atomic(folder / ALIASES_FILE, dict(sorted(current.items())))
        self.invalidate(name, versions=False)
        return current

    def delete_alias(self, name: str, alias: str) -> dict[str, str]:
        check_alias(alias)
        folder = self.contained_folder(name)
        with self._writing(name, folder):
            current = self.aliases(name)
            if alias not in current:
                raise errors.not_found(f"model {name!r} has no alias {alias!r}", model=name, alias=alias)
            del current[alias]
            files.write_json_atomic(folder / ALIASES_FILE, dict(sorted(current.items())))
        self.invalidate(name, versions=False)
        return current

    @contextlib.contextmanager
    def _writing(self, name: str, folder: Path) -> Iterator[None]:
        """The model folder locked for a change of aliases.json; FAILED_PRECONDITION when it cannot be written
        (a repository mounted read-only), and for an aliases.json that cannot be read."""
        try:
            with files.locked(folder):
                yield
        except OSError as exc:
            raise errors.failed_precondition(
                f"cannot change {ALIASES_FILE} of {name!r}: {exc}", reason=Reason.REPOSITORY_NOT_WRITABLE, model=name
            ) from exc
        except ValueError as exc:
            raise errors.failed_precondition(
                f"{ALIASES_FILE} of {name!r} is invalid: {exc}", reason=Reason.MODEL_CONFIG_INVALID, model=name
            ) from exc

    def listing(self, name: str) -> Listing:
        """The model folder read now (NOT_FOUND for unknown models)."""
        versions = tuple(self.versions(name))
        config_error = aliases_error = ""
        try:
            policy = self.config(name).version_policy
        except errors.TandemError as exc:
            policy, config_error = VersionPolicy(), str(exc)
        try:
            aliases = self.aliases(name)
        except (OSError, ValueError) as exc:
            aliases, aliases_error = {}, f"{ALIASES_FILE} of {name!r} is invalid: {exc}"
        return Listing(versions, aliases, policy, config_error, aliases_error)

    def _listed(self, name: str, fresh: bool = False) -> Listing:
        now = time.monotonic()
        with self._lock:
            hit = self._listings.get(name)
        if not fresh and hit is None and name in self.unknown:
            raise errors.not_found(f"model {name!r} not found", model=name)
        if fresh or hit is None or hit[0] <= now:
            try:
                listing: Listing | None = self.listing(name)
            except errors.TandemError:
                listing = None
            hit = (now + self.rescan_s, listing)
            if listing is None:  # unknown names go to the bounded negative cache: callers choose them
                self.unknown.add(name)
                with self._lock:
                    self._listings.pop(name, None)
            else:
                self.unknown.discard(name)
                with self._lock:
                    self._listings[name] = hit
        if hit[1] is None:
            raise errors.not_found(f"model {name!r} not found", model=name)
        return hit[1]

    def invalidate(self, name: str, versions: bool = True) -> None:
        """Forgets what was read of a model, so that the next request reads its folder again."""
        with self._lock:
            self._listings.pop(name, None)
            if versions:
                for key in [k for k in self._cache if k[0] == name]:
                    del self._cache[key]

    @staticmethod
    def default_version(listing: Listing) -> str | None:
        """The version a bare name gets: the `stable` alias when set, else the newest the policy loads."""
        stable = listing.aliases.get(DEFAULT_ALIAS)
        if stable is not None and stable in listing.versions:
            return stable
        chosen = listing.policy.select(listing.versions)
        if chosen:
            return chosen[-1]
        return listing.versions[-1] if listing.versions else None

    def target(self, ref: str) -> tuple[str, str]:
        """(name, version) a reference names, without reading the version folder; NOT_FOUND when there is none."""
        parsed = parse_reference(ref)
        name = parsed.name
        if not name:
            if self.default_model is None:
                raise errors.invalid_argument("no model named and this server has no default model", "model")
            name = self.default_model
        listing = self._listed(name)
        if parsed.version is not None:
            if parsed.version not in listing.versions:
                # A version added since the listing was read (a pinned request from another stage): read again.
                listing = self._listed(name, fresh=True)
                if parsed.version not in listing.versions:
                    raise errors.not_found(
                        f"model {name!r} has no version {parsed.version}", model=name, version=parsed.version
                    )
            return name, parsed.version
        if listing.aliases_error and (parsed.alias is not None or DEFAULT_ALIAS not in listing.aliases):
            raise errors.failed_precondition(listing.aliases_error, reason=Reason.MODEL_CONFIG_INVALID, model=name)
        if parsed.alias is not None:
            version = listing.aliases.get(parsed.alias)
            if version is None:
                listing = self._listed(name, fresh=True)
                version = listing.aliases.get(parsed.alias)
            if version is None:
                raise errors.not_found(f"model {name!r} has no alias {parsed.alias!r}", model=name, alias=parsed.alias)
            if version not in listing.versions:
                raise errors.not_found(
                    f"alias {parsed.alias!r} of model {name!r} names version {version}, which is not in the repository",
                    model=name,
                    alias=parsed.alias,
                )
            return name, version
        if not listing.versions:
            raise errors.not_found(f"model {name!r} has no versions", model=name)
        version = self.default_version(listing)
        assert version is not None
        return name, version

    def load(self, name: str, version: str) -> ModelVersion:
        """A version's metadata, read once and cached; FAILED_PRECONDITION when its files are missing or broken."""
        with self._lock:
            cached = self._cache.get((name, version))
        if cached is not None:
            return cached
        try:
            loaded = load_version(name, version, self.root / name / version, self.config(name), self.gguf_cache)
        except (OSError, ValueError, KeyError) as exc:
            raise errors.failed_precondition(
                f"model {name}:{version} is broken: {exc}", reason=Reason.MODEL_BROKEN, model=name, version=version
            ) from exc
        with self._lock:
            self._cache[(name, version)] = loaded
        return loaded

    def resolve(self, ref: str) -> ModelVersion:
        """The model version a request names; NOT_FOUND for unknown models, versions or aliases."""
        return self.load(*self.target(ref))
