import os


def _share_cores_between_workers() -> None:
    """Under pytest-xdist each worker, and the notebook kernels it starts, gets its share of the cores.

    Before torch, numpy and numba load (so before the imports below): their thread pools read these variables
    once. Without them every worker starts one thread per core in each library (and JAX, which scib-metrics uses,
    as many again), and the workers fight over the cores: the suite ran slower on two workers than on one.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers < 2:
        return
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(variable, threads)
    os.environ.setdefault("RAYON_NUM_THREADS", threads)  # the tokenizers of sentence-transformers
    if threads == "1":
        os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")


_share_cores_between_workers()

import subprocess
import tempfile
import warnings
from pathlib import Path

import anndata as ad
import pytest
from helpers import SYMPHONY_HELD_OUT, mark_singletons_unlabelled
from xdist import is_xdist_worker

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


# pytest-xdist's ``-n auto`` (pyproject's addopts): one worker per core, at most this many. Each worker loads the
# datasets it needs; more workers would mostly add memory.
MAX_WORKERS = 4


def pytest_xdist_auto_num_workers(config):
    return max(1, min(MAX_WORKERS, os.cpu_count() or 1))


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
    if is_xdist_worker(session):  # the controller checks the checkout once, around all workers
        return
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
