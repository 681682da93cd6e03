"""The tutorials run top to bottom (with few epochs)."""

import runpy
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"


def test_train_embed_tutorial_runs(shared_data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CELLULAR_DATA_DIR", str(shared_data_dir))
    monkeypatch.setenv("TUTORIAL_MAX_EPOCHS", "3")
    monkeypatch.chdir(tmp_path)
    namespace = runpy.run_path(str(TUTORIALS / "train_embed_symphony.py"))
    joint = namespace["joint"]
    assert "X_umap" in joint.obsm and joint.obsm["X_cellular"].shape[1] == namespace["model"].n_latent
    assert (tmp_path / "training_history.png").exists()
