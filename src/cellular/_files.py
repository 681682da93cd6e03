"""Integrity of the folders the package writes: checksums, schema validation and clear errors for damaged files.

A saved folder holds one JSON metadata file and binary array files. The metadata records the SHA-256 and size of
every binary file, the shape of every array, and a SHA-256 of its own content (``metadata_sha256``, computed over
the canonical JSON without that field). Loading checks, in order: the JSON parses, it matches the schema, its own
checksum, each binary file's checksum; the loaders then check that the arrays agree with the metadata.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

METADATA_CHECKSUM = "metadata_sha256"
_CHUNK = 1 << 20

SHA256 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
FILE_RECORD = {
    "type": "object",
    "required": ["sha256", "bytes"],
    "properties": {"sha256": SHA256, "bytes": {"type": "integer", "minimum": 0}},
}
SHAPE = {"type": "array", "items": {"type": "integer", "minimum": 0}}
STRINGS = {"type": "array", "items": {"type": "string"}}
NUMBERS = {"type": "array", "items": {"type": "number"}}


class DamagedFileError(ValueError):
    """A saved file that is truncated, corrupt, edited or inconsistent with the rest of its folder."""


def damaged(path: Path, problem: str, fix: str) -> DamagedFileError:
    """The error for a damaged ``path``: names the file, the problem and the fix."""
    return DamagedFileError(f"{path}: {problem}. {fix}")


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: Path) -> dict:
    """``{"sha256": ..., "bytes": ...}`` of a file, as stored in the metadata."""
    return {"sha256": file_sha256(path), "bytes": path.stat().st_size}


def metadata_checksum(metadata: dict) -> str:
    """SHA-256 of the canonical JSON of ``metadata`` without its own checksum field."""
    content = {key: value for key, value in metadata.items() if key != METADATA_CHECKSUM}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal(metadata: dict) -> dict:
    """``metadata`` with its checksum added (the JSON round trip makes the checksum match what is written)."""
    plain = json.loads(json.dumps(metadata))
    plain[METADATA_CHECKSUM] = metadata_checksum(plain)
    return plain


def read_metadata(path: Path, fix: str) -> dict:
    """The JSON object in ``path``, or a :class:`DamagedFileError` when it is not valid UTF-8 JSON or not an object."""
    try:
        metadata = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise damaged(path, f"not valid JSON ({error}); the file is truncated or damaged", fix) from None
    if not isinstance(metadata, dict):
        raise damaged(path, f"holds a JSON {type(metadata).__name__}, not a metadata object", fix)
    return metadata


def write_metadata(path: Path, metadata: dict, binary: Path, shapes_key: str, shapes: dict) -> None:
    """Write ``metadata`` (plain JSON types) to ``path`` with the checksums and shapes that loading verifies.

    Records ``binary``'s SHA-256 and size (write it first), the array shapes under ``shapes_key`` and the metadata's
    own checksum.
    """
    metadata = {**metadata, "files": {binary.name: file_record(binary)}, shapes_key: shapes}
    path.write_text(json.dumps(seal(metadata), indent=1))


def validate(metadata: Any, schema: dict, path: Path, fix: str) -> None:
    """Check ``metadata`` against a JSON schema; the error names the file and the first offending field."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(metadata))
    if error is not None:
        field = "/".join(str(part) for part in error.absolute_path) or "(top level)"
        message = error.message if len(error.message) <= 200 else error.message[:200] + "..."
        raise damaged(path, f"field {field!r} is invalid ({message})", fix)


def verify_checksums(metadata: dict, path: Path, folder: Path, fix: str) -> None:
    """Check the metadata's own checksum and the SHA-256 and size of every binary file it records."""
    if metadata[METADATA_CHECKSUM] != metadata_checksum(metadata):
        raise damaged(path, "the content does not match its recorded SHA-256: the file was edited or damaged", fix)
    for name, record in metadata["files"].items():
        file = folder / name
        if Path(name).name != name or not file.is_file():
            raise damaged(file, "is missing (recorded in the metadata)", fix)
        if file.stat().st_size != record["bytes"] or file_sha256(file) != record["sha256"]:
            raise damaged(
                file, "does not match the size and SHA-256 recorded when it was saved: it was changed or damaged", fix
            )


def verify_metadata(
    metadata: dict, *, schema: dict, path: Path, folder: Path, fix: str, unchecked_versions: tuple[int, ...]
) -> bool:
    """Validate a current-format metadata file and verify its checksums; ``True`` when it was checked.

    A file of one of the ``unchecked_versions`` (written before checksums existed) is loaded with a warning and
    ``False``; one that claims such a version but carries checksums was edited, and is refused.
    """
    if metadata["format_version"] in unchecked_versions:
        if METADATA_CHECKSUM in metadata or "files" in metadata:
            raise damaged(path, f"claims format version {metadata['format_version']} but carries checksums", fix)
        logger.warning("%s was saved without checksums, so its files cannot be verified; save it again.", path)
        return False
    validate(metadata, schema, path, fix)
    verify_checksums(metadata, path, folder, fix)
    return True


def check_shapes(arrays: dict, recorded: dict, path: Path, fix: str) -> None:
    """The loaded arrays are exactly those recorded in the metadata, with the recorded shapes."""
    if set(arrays) != set(recorded):
        extra, missing = sorted(set(arrays) - set(recorded)), sorted(set(recorded) - set(arrays))
        raise damaged(path, f"holds arrays {extra} not recorded, and lacks recorded arrays {missing}", fix)
    for name, value in arrays.items():
        if list(value.shape) != list(recorded[name]):
            raise damaged(path, f"array {name!r} has shape {list(value.shape)}, recorded {recorded[name]}", fix)
