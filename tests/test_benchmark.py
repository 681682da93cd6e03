"""The field benchmark runner: a tiny end-to-end run on real data, the report's arithmetic and its input checks."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from benchmarks import run
from benchmarks._folds import UNLABELLED, load_dataset, lobo_folds, novel_folds
from benchmarks._methods import aligned, knn_vote
from benchmarks._report import mean_sd_table


@pytest.fixture(scope="module")
def smoke_run(shared_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("field")
    args = [
        "--tasks", "lobo", "integration", "map", "novel",
        "--methods", "cellular", "cellular_knn", "pca_knn", "cellular_hierarchy",
        "--datasets", "pbmc_symphony_3tech",
        "--map-pairs", "pbmc3k_seurat:pbmc_symphony_3tech",
        "--max-epochs", "3", "--max-folds", "1", "--threads", str(torch.get_num_threads()),
        "--data-dir", str(shared_data_dir), "--out", str(out),
    ]  # fmt: skip
    summary = run.main(args)
    return out, args, summary


def test_smoke_run_writes_long_results_summary_and_figures(smoke_run):
    out, _, summary = smoke_run
    results = pd.read_csv(out / "results.csv")
    assert list(results.columns) == ["task", "dataset", "fold", "seed", "method", "metric", "value"]
    assert set(results["task"]) == {"lobo", "integration", "map", "novel"}
    assert "failed" not in set(results["metric"])
    lobo = results[results["task"] == "lobo"]
    methods = {"cellular", "cellular_knn", "pca_knn", "cellular_hierarchy"}
    assert set(lobo["method"]) == methods
    assert set(lobo["fold"]) == {"3pv1"}  # --max-folds 1: the first batch only
    scores = lobo[lobo["metric"].isin(["accuracy", "balanced_accuracy", "macro_f1", "weighted_f1"])]["value"]
    assert scores.between(0, 1).all() and len(scores) == 4 * len(methods)
    hierarchical = results[results["metric"] == "hierarchical_f1"]  # PBMC folds: the lineage map applies
    assert set(hierarchical["task"]) == {"lobo", "map"} and set(hierarchical["method"]) == methods
    assert hierarchical["value"].between(0, 1).all()
    assert lobo["metric"].str.startswith("f1:").any()
    for metric in ("fit_seconds", "predict_seconds", "peak_rss_mb", "fit_cells_per_second"):
        assert (lobo[lobo["metric"] == metric]["value"] > 0).all()
    integration = results[results["task"] == "integration"]
    # the kNN path shares the classifier's embedding; the hierarchy's embedding is left out of scIB
    assert set(integration["method"]) == {"cellular", "pca_knn"}
    total = integration[integration["metric"] == "Total"].set_index("method")["value"]
    parts = integration[integration["metric"].isin(["Bio conservation", "Batch correction"])]
    parts = parts.pivot(index="method", columns="metric", values="value")
    np.testing.assert_allclose(total, 0.6 * parts["Bio conservation"] + 0.4 * parts["Batch correction"], rtol=1e-6)
    novel = results[(results["task"] == "novel") & (results["metric"] == "auroc")]
    assert len(novel) == len(methods) and novel["fold"].iloc[0].startswith("B cell")
    text = summary.read_text()
    assert "- Novelty AUROC on pbmc_symphony_3tech: CELLULAR" in text  # per-dataset target against the best baseline
    for heading in ("### Targets", "Annotation macro-F1", "Hierarchical F1", "Novel cell-type detection AUROC", "scIB"):
        assert heading in text
    for figure in ("annotation_macro_f1.png", "novelty_auroc.png", "scib_table.png"):
        assert (out / figure).stat().st_size > 0 and f"]({figure})" in text


def test_smoke_run_quality_against_pca_baseline(smoke_run):
    out, _, _ = smoke_run
    results = pd.read_csv(out / "results.csv")
    f1 = results[(results["task"] == "lobo") & (results["metric"] == "macro_f1")].set_index("method")["value"]
    assert max(f1["cellular"], f1["cellular_knn"]) > f1["pca_knn"]
    scib = results[(results["task"] == "integration") & (results["metric"] == "Total")].set_index("method")["value"]
    assert scib["cellular"] > scib["pca_knn"]
    auroc = results[(results["task"] == "novel") & (results["metric"] == "auroc")].set_index("method")["value"]
    assert auroc["cellular"] > 0.8


def test_rerun_skips_finished_work_and_regenerates_the_same_report(smoke_run, capsys):
    out, args, summary = smoke_run
    before = summary.read_text()
    raw = sorted(path.name for path in (out / "raw").glob("*.csv"))
    assert len(raw) == 3  # lobo+integration, map and novel shards
    run.main(args)
    assert "exists, skipped" in capsys.readouterr().out
    assert summary.read_text() == before
    run.main([*args, "--report-only"])
    assert summary.read_text() == before


def test_an_integration_only_rerun_keeps_the_lobo_scores(smoke_run, tmp_path):
    """Rerunning the integration task alone writes its own shard; its timings are the integration task's, so the
    lobo scores of the same methods in the lobo+integration shard survive."""
    import shutil

    out, args, _ = smoke_run
    copy = tmp_path / "field"
    shutil.copytree(out, copy)
    threads, data_dir = args[args.index("--threads") + 1], args[args.index("--data-dir") + 1]
    rerun = [
        "--tasks", "integration", "--methods", "pca_knn", "--datasets", "pbmc_symphony_3tech",
        "--max-epochs", "3", "--max-folds", "1", "--threads", threads,
        "--data-dir", data_dir, "--out", str(copy), "--overwrite", "--no-figures",
    ]  # fmt: skip
    run.main(rerun)
    results = pd.read_csv(copy / "results.csv")
    lobo = results[(results["task"] == "lobo") & (results["method"] == "pca_knn")]
    assert "macro_f1" in set(lobo["metric"])
    assert not results.duplicated(["task", "dataset", "fold", "seed", "method", "metric"]).any()


def test_mean_over_folds_then_mean_and_sd_over_seeds():
    rows = [
        # seed 0: folds 0.6 and 0.8 -> 0.7; seed 1: folds 0.9 and 0.7 -> 0.8
        ("lobo", "d", "a", 0, "m", "macro_f1", 0.6),
        ("lobo", "d", "b", 0, "m", "macro_f1", 0.8),
        ("lobo", "d", "a", 1, "m", "macro_f1", 0.9),
        ("lobo", "d", "b", 1, "m", "macro_f1", 0.7),
        ("lobo", "e", "a", 0, "m", "macro_f1", 0.5),
        ("lobo", "e", "a", 1, "m", "macro_f1", 0.3),
    ]
    frame = pd.DataFrame(rows, columns=["task", "dataset", "fold", "seed", "method", "metric", "value"])
    mean, sd = mean_sd_table(frame, ["lobo"], "macro_f1")
    assert mean.loc["m", "d"] == pytest.approx(0.75) and sd.loc["m", "d"] == pytest.approx(np.std([0.7, 0.8], ddof=1))
    assert mean.loc["m", "e"] == pytest.approx(0.4)
    # the mean column averages datasets within a seed first: seed 0 (0.7 + 0.5) / 2, seed 1 (0.8 + 0.3) / 2
    assert mean.loc["m", "mean"] == pytest.approx((0.6 + 0.55) / 2)
    assert sd.loc["m", "mean"] == pytest.approx(np.std([0.6, 0.55], ddof=1))


def test_knn_vote_and_probability_alignment():
    reference = np.vstack([np.zeros((15, 2)), np.full((15, 2), 10.0)])
    labels = np.array(["a"] * 15 + ["b"] * 15)
    probabilities, distance = knn_vote(reference, labels, np.array([[0.0, 0.0], [10.0, 10.0]]), ["b", "a", "c"])
    np.testing.assert_allclose(probabilities, [[0, 1, 0], [1, 0, 0]])
    np.testing.assert_array_equal(distance, [0, 0])
    table = pd.DataFrame([[2.0, 2.0], [1.0, 3.0]], columns=["x", "b"])
    np.testing.assert_allclose(aligned(table, ["b", "a"]), [[1.0, 0.0], [1.0, 0.0]])


def test_folds_hold_out_each_batch_and_never_train_on_the_novel_type(symphony):
    folds = list(lobo_folds("symphony", symphony))
    assert [fold.name for fold in folds] == list(symphony.obs["batch"].cat.categories)
    for fold in folds:
        assert fold.name not in set(fold.train.obs["batch"]) and set(fold.test.obs["batch"]) == {fold.name}
        assert fold.train.n_obs + fold.test.n_obs == symphony.n_obs
        assert (fold.train.obs["cell_type"].value_counts().drop(UNLABELLED, errors="ignore") >= 2).all()
    for fold in novel_folds("symphony", symphony):
        assert fold.novel_type not in set(fold.train.obs["cell_type"])
        assert (fold.test.obs["cell_type"] == fold.novel_type).sum() >= 20


def test_bad_inputs_are_named(tmp_path):
    counts = sp.csr_matrix(np.ones((4, 3), dtype=np.float32))
    no_batch = ad.AnnData(counts, obs=pd.DataFrame({"cell_type": list("aabb")}, index=list("wxyz")))
    no_batch.write_h5ad(tmp_path / "a.h5ad")
    with pytest.raises(KeyError, match="batch"):
        load_dataset(str(tmp_path / "a.h5ad"), tmp_path)
    logged = ad.AnnData(counts * 0.5, obs=pd.DataFrame({"cell_type": list("aabb"), "batch": list("ssst")}))
    logged.write_h5ad(tmp_path / "b.h5ad")
    with pytest.raises(ValueError, match="raw counts"):
        load_dataset(str(tmp_path / "b.h5ad"), tmp_path)
    unlabelled = ad.AnnData(counts, obs=pd.DataFrame({"cell_type": ["a", None, "b", "b"], "batch": list("ssst")}))
    unlabelled.write_h5ad(tmp_path / "c.h5ad")
    with pytest.raises(ValueError, match="1 cells have no"):
        load_dataset(str(tmp_path / "c.h5ad"), tmp_path)
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        load_dataset("no_such_dataset", tmp_path)
    with pytest.raises(ValueError, match="QUERY:REFERENCE"):
        run.main(["--tasks", "map", "--map-pairs", "only_one", "--out", str(tmp_path), "--data-dir", str(tmp_path)])
