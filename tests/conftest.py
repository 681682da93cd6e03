import os
import warnings
from pathlib import Path

import anndata as ad
import pytest

warnings.filterwarnings("ignore", message=".*_make_column_categorical.*")

REQUIRE_DATA_VARIABLE = "CELLULAR_REQUIRE_DATA"


def data_dir() -> Path:  # the project convention: $CELLULAR_DATA_DIR, else ../shared/data beside the repo
    return Path(os.environ.get("CELLULAR_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def read_dataset(name: str) -> ad.AnnData:
    path = data_dir() / f"{name}.h5ad"
    if not path.exists():
        reason = f"real dataset {path} not found; set CELLULAR_DATA_DIR to the shared data folder"
        if os.environ.get(REQUIRE_DATA_VARIABLE) == "1":
            pytest.fail(f"{reason} ({REQUIRE_DATA_VARIABLE}=1 forbids skipping real-data tests)")
        pytest.skip(reason)
    return ad.read_h5ad(path)


@pytest.fixture(scope="session")
def symphony():
    return read_dataset("pbmc_symphony_3tech")


@pytest.fixture(scope="session")
def shared_data_dir(symphony) -> Path:
    return data_dir().resolve()
