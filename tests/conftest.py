import os
import warnings
from pathlib import Path

import anndata as ad
import pytest
from helpers import SYMPHONY_HELD_OUT, mark_singletons_unlabelled

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
def symphony_split(symphony):
    """Symphony PBMCs: train on 3' v1 + 5', hold out the 3' v2 technology."""
    train = symphony[symphony.obs["batch"] != SYMPHONY_HELD_OUT].copy()
    test = symphony[symphony.obs["batch"] == SYMPHONY_HELD_OUT].copy()
    mark_singletons_unlabelled(train)
    return train, test


@pytest.fixture(scope="session")
def symphony_model(symphony_split):
    """A CELLULAR model (with its classifier head) trained with default settings on the symphony split."""
    from cellular import CELLULAR

    train, _ = symphony_split
    CELLULAR.setup_anndata(train, labels_key="cell_type", batch_key="batch")
    model = CELLULAR(train)
    model.train(progress_bar=False)
    return model


@pytest.fixture(scope="session")
def shared_data_dir(symphony) -> Path:
    return data_dir().resolve()
