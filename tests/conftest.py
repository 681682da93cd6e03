import os
import subprocess
import tempfile
import warnings
from pathlib import Path

import anndata as ad
import pytest
from helpers import SYMPHONY_HELD_OUT, mark_singletons_unlabelled

warnings.filterwarnings("ignore", message=".*_make_column_categorical.*")

REQUIRE_DATA_VARIABLE = "CELLULAR_REQUIRE_DATA"
REPOSITORY = Path(__file__).resolve().parents[1]
# Caches of tools, not outputs of the tests.
_TOOL_CACHES = (
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".egg-info",
    "docs/_build",
    "docs/generated",
    "docs/tutorials",
)

# hypothesis keeps its example data under .hypothesis/ in the working directory unless told otherwise.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", str(Path(tempfile.gettempdir()) / "cellular-hypothesis"))


def _files_outside_git() -> set[str] | None:
    """Untracked and ignored paths of the checkout (tool caches left out); ``None`` outside a git checkout."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--others", "--ignored", "--exclude-standard", "--directory"],
            cwd=REPOSITORY,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return {path for path in listed.splitlines() if not any(cache in path for cache in _TOOL_CACHES)}


def pytest_sessionstart(session):
    session.config.stash_files_before = _files_outside_git()


def pytest_sessionfinish(session, exitstatus):
    """The tests leave the checkout as they found it: whatever they write goes to temporary folders."""
    before = getattr(session.config, "stash_files_before", None)
    after = _files_outside_git()
    if before is None or after is None:
        return
    new = sorted(after - before)
    if new:
        session.config.get_terminal_writer().line(f"ERROR: the tests wrote into the checkout: {new}", red=True)
        session.exitstatus = 1


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
