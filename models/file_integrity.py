"""SHA-256 records of the files a folder holds, written with them and verified on load.

A model folder (`config.json`, `model.safetensors`) records its files' hashes in
`checksums.json`; an engine folder records them in its manifest (`files_sha256`), and the manifest
its own hash. A flipped byte, a truncated file, two files swapped or a file pointed at another
stage's is refused, naming the file, instead of loading and giving another image.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from models.atomic_files import atomic_write

CHECKSUMS = "checksums.json"
_CHUNK = 8 << 20


class IntegrityError(ValueError):
    """A file whose content is not what was written, naming it and how to write it again."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_json(data: dict) -> str:
    """Hash of a JSON object in canonical form (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def verify_files(folder: Path, recorded: dict[str, str], hint: str) -> None:
    """Every recorded file exists inside `folder` and has its recorded hash."""
    root = folder.resolve()
    for name, digest in recorded.items():
        path = (folder / name).resolve()
        if root not in path.parents:
            raise IntegrityError(f"{folder}: the record names {name!r}, outside the folder; {hint}")
        if not path.is_file():
            raise IntegrityError(f"{folder / name}: missing; {hint}")
        if sha256_file(path) != digest:
            raise IntegrityError(f"{folder / name}: its content differs from what was written (SHA-256 mismatch: "
                                 f"damaged, replaced or swapped); {hint}")


def write_checksums(folder: Path, names: list[str]) -> None:
    """Record `names`' hashes in `folder/checksums.json` (atomically)."""
    data = {"sha256": {name: sha256_file(folder / name) for name in names}}
    atomic_write(folder / CHECKSUMS, lambda p: p.write_text(json.dumps(data, indent=2)))


def read_checksums(folder: Path, hint: str) -> dict[str, str] | None:
    """The recorded hashes of `folder` (None when it has no `checksums.json`)."""
    path = folder / CHECKSUMS
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        recorded = data["sha256"]
        if not isinstance(recorded, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                     for k, v in recorded.items()):
            raise TypeError("sha256 must map file names to hex digests")
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise IntegrityError(f"{path}: unreadable ({type(exc).__name__}: {exc}); {hint}") from None
    return recorded
