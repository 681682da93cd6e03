"""Tutorial notebooks need the shared datasets: skipped without them, failed under CELLULAR_REQUIRE_DATA=1."""

import os
from pathlib import Path

import pytest

DATASETS = ("pbmc_symphony_3tech.h5ad", "pbmc3k_seurat.h5ad")


def _data_dir() -> Path:  # as in the notebooks: $CELLULAR_DATA_DIR, else shared/data beside the repository
    return Path(os.environ.get("CELLULAR_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def pytest_runtest_setup(item):
    missing = [name for name in DATASETS if not (_data_dir() / name).exists()]
    if item.path.suffix != ".ipynb" or not missing:
        return
    reason = f"tutorial datasets {missing} not found in {_data_dir()}; set CELLULAR_DATA_DIR to the shared data folder"
    if os.environ.get("CELLULAR_REQUIRE_DATA") == "1":
        pytest.fail(f"{reason} (CELLULAR_REQUIRE_DATA=1 forbids skipping real-data tests)")
    pytest.skip(reason)
