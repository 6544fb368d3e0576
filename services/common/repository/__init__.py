"""The model repository every stage reads: one folder per model with tandem.json, numbered version folders of
Hugging Face files, aliases (aliases.json) and per-version metadata (metadata.json).

The package's API is re-exported here; its rooms are config (schemas), files (JSON IO and locks), fingerprint
(tokenizer hashes), versions (reading a version folder) and store (the repository); names, versions and aliases
follow the rules of services.common.references.
"""

from services.common.references import (
    Reference,
    check_alias,
    check_name,
    check_reference,
    check_version,
    parse_reference,
)
from services.common.repository.config import (
    ALIASES_FILE,
    CONFIG_FILE,
    METADATA_FILE,
    AccuracyReport,
    Derivation,
    GenerationSettings,
    ModelConfig,
    ModelVersion,
    Precision,
    SpeedReport,
    Task,
    VersionMetadata,
    VersionPolicy,
)
from services.common.repository.files import locked, read_json, write_json_atomic
from services.common.repository.fingerprint import tokenizer_fingerprint
from services.common.repository.store import DEFAULT_ALIAS, Listing, ModelRepository
from services.common.repository.versions import load_version, read_metadata

__all__ = [
    "ALIASES_FILE",
    "CONFIG_FILE",
    "DEFAULT_ALIAS",
    "METADATA_FILE",
    "AccuracyReport",
    "Derivation",
    "GenerationSettings",
    "Listing",
    "ModelConfig",
    "ModelRepository",
    "ModelVersion",
    "Precision",
    "Reference",
    "SpeedReport",
    "Task",
    "VersionMetadata",
    "VersionPolicy",
    "check_alias",
    "check_name",
    "check_reference",
    "check_version",
    "load_version",
    "locked",
    "parse_reference",
    "read_json",
    "read_metadata",
    "tokenizer_fingerprint",
    "write_json_atomic",
]
