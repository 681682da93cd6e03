"""Plotting functions (cellular.pl) on the real Symphony PBMC query, checked against independently computed numbers."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from matplotlib.collections import PathCollection
from sklearn.metrics import confusion_matrix as sk_confusion_matrix
from sklearn.metrics import f1_score

import cellular
from cellular import CELLULAR, NotTrainedError

NOVEL = "NK cell (not in reference)"


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def query(symphony_split, symphony_model):
    """The held-out technology embedded, annotated and checked for novelty; ``truth`` renames NK cells to a type
    absent from the reference (so the model can never predict it)."""
    _, test = symphony_split
    query = test.copy()
    cellular.tl.cellular_embed(query, symphony_model)
    cellular.tl.cellular_annotate(query, symphony_model, use_rep="X_cellular")
    cellular.tl.novel_types(query, symphony_model, use_rep="X_cellular")
    truth = query.obs["cell_type"].astype(str).replace({"NK cell": NOVEL})
    query.obs["truth"] = pd.Categorical(truth)
    query.obs["in_reference"] = query.obs["truth"].isin(symphony_model.cell_types)
    return query


def tick_labels(labels):
    return [label.get_text() for label in labels]


def top_to_bottom(ax):
    """The y tick labels ordered from the top of the axes down."""
    return [label.get_text() for label in sorted(ax.get_yticklabels(), key=lambda label: -label.get_position()[1])]


def test_confusion_matrix_matches_sklearn(query, symphony_model):
    y_true = query.obs["truth"].astype(str).to_numpy()
    y_pred = query.obs["cellular_label"].astype(str).to_numpy()
    rows = list(query.obs["truth"].cat.categories)
    expected_columns = rows + [t for t in [*symphony_model.cell_types, "Unknown"] if t not in rows]

    ax = cellular.pl.confusion_matrix(query, true_key="truth", show=False)
    matrix = np.asarray(ax.images[0].get_array())
    assert tick_labels(ax.get_yticklabels()) == rows
    assert tick_labels(ax.get_xticklabels()) == expected_columns
    assert matrix.shape == (len(rows), len(expected_columns))
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0)
    expected = sk_confusion_matrix(y_true, y_pred, labels=expected_columns, normalize="true")[: len(rows)]
    np.testing.assert_allclose(matrix, expected)
    assert matrix[rows.index(NOVEL), expected_columns.index(NOVEL)] == 0.0  # the model cannot predict a novel type
    assert len(ax.texts) == matrix.size and ax.texts[0].get_text() == f"{matrix[0, 0]:.2f}"
    assert "Unknown" in expected_columns and expected_columns[-1] == "Unknown"

    counts = np.asarray(
        cellular.pl.confusion_matrix(query, true_key="truth", normalize=None, show=False).images[0].get_array()
    )
    np.testing.assert_array_equal(counts, sk_confusion_matrix(y_true, y_pred, labels=expected_columns)[: len(rows)])
    assert counts.sum() == query.n_obs
    pred = cellular.pl.confusion_matrix(query, true_key="truth", normalize="pred", annotate=False, show=False)
    by_pred = np.asarray(pred.images[0].get_array())
    assert not pred.texts
    column_sums = by_pred.sum(axis=0)
    np.testing.assert_allclose(column_sums[counts.sum(axis=0) > 0], 1.0)
    expected_pred = sk_confusion_matrix(y_true, y_pred, labels=expected_columns, normalize="pred")[: len(rows)]
    np.testing.assert_allclose(by_pred, expected_pred)
    everything = cellular.pl.confusion_matrix(query, true_key="truth", normalize="all", show=False)
    np.testing.assert_allclose(np.asarray(everything.images[0].get_array()).sum(), 1.0)

    with pytest.raises(ValueError, match="normalize"):
        cellular.pl.confusion_matrix(query, true_key="truth", normalize="rows")


def test_f1_per_type_matches_sklearn(query):
    y_true = query.obs["truth"].astype(str).to_numpy()
    y_pred = query.obs["cellular_label"].astype(str).to_numpy()
    types = list(query.obs["truth"].cat.categories)
    expected = dict(zip(types, f1_score(y_true, y_pred, labels=types, average=None, zero_division=0.0), strict=True))
    macro = f1_score(y_true, y_pred, labels=types, average="macro", zero_division=0.0)

    ax = cellular.pl.f1_per_type(query, true_key="truth", show=False)
    bars = sorted(ax.patches, key=lambda bar: -bar.get_y())  # top to bottom
    names = top_to_bottom(ax)
    assert len(bars) == len(types) and sorted(names) == sorted(types)
    widths = np.array([bar.get_width() for bar in bars])
    np.testing.assert_allclose(widths, [expected[name] for name in names])
    assert np.all(np.diff(widths) <= 0)  # sorted, best on top
    assert f"macro-F1 {macro:.3f}" in ax.get_title()
    support = query.obs["truth"].value_counts()
    assert sorted(text.get_text() for text in ax.texts) == sorted(f"n={support[name]}" for name in names)
    novel = bars[names.index(NOVEL)]
    assert novel.get_width() == 0.0 and novel.get_facecolor() != bars[0].get_facecolor()  # greyed: never predicted
    assert macro > 0.5  # the trained model annotates the known types well

    unsorted = cellular.pl.f1_per_type(query, true_key="truth", sort=False, show=False)
    assert top_to_bottom(unsorted) == types


def test_novelty_histogram_threshold_and_counts(query):
    scores = query.obs["cellular_novel_score"].to_numpy()
    threshold = query.uns["cellular"]["cellular_novel"]["summary"]["score_threshold"]
    flags = query.obs["cellular_novel"].to_numpy()
    assert np.all(scores[flags] >= threshold) and np.all(scores[~flags] < threshold)

    ax = cellular.pl.novelty_histogram(query, bins=30, show=False)
    heights, _ = np.histogram(scores, bins=30)
    assert len(ax.patches) == 30
    np.testing.assert_array_equal([bar.get_height() for bar in ax.patches], heights)
    vertical = [line for line in ax.get_lines() if len(set(line.get_xdata())) == 1]
    assert len(vertical) == 1 and vertical[0].get_xdata()[0] == threshold
    assert f"{flags.sum()} of {query.n_obs} cells flagged" in ax.get_title()

    grouped = cellular.pl.novelty_histogram(query, groupby="in_reference", show=False)
    assert len(grouped.patches) == 2  # one filled outline per group
    legend = tick_labels(grouped.get_legend().get_texts())
    for group in (False, True):
        members = query.obs["in_reference"].to_numpy() == group
        assert f"{group} (n={members.sum()}, {flags[members].sum()} flagged)" in legend
    assert any(text.startswith("threshold") for text in legend)

    with pytest.raises(KeyError, match="nope"):
        cellular.pl.novelty_histogram(query, groupby="nope")


def test_embedding_leaves_adata_unchanged(query):
    data = query.copy()
    obs_before, obsm_before, uns_before = data.obs.copy(), set(data.obsm), set(data.uns)
    axes = cellular.pl.embedding(data, show=False)
    colors = ["cellular_label", "cellular_label_confidence", "cellular_novel_score", "cellular_novel"]
    assert [ax.get_title() for ax in axes] == colors
    for ax in axes:
        sizes = [len(c.get_offsets()) for c in ax.collections if isinstance(c, PathCollection)]
        assert max(sizes) == data.n_obs
    flag_legend = tick_labels(axes[3].get_legend().get_texts())
    assert set(flag_legend) <= {"False", "True"} and flag_legend  # the boolean flag drawn as categories
    assert set(data.obsm) == obsm_before and set(data.uns) == uns_before
    pd.testing.assert_frame_equal(data.obs, obs_before)

    coordinates = np.asarray(data.obsm["X_cellular"][:, :2], dtype=np.float32)
    data.obsm["X_umap"] = coordinates
    (ax,) = cellular.pl.embedding(data, color="truth", show=False)
    points = max((c for c in ax.collections if isinstance(c, PathCollection)), key=lambda c: len(c.get_offsets()))
    np.testing.assert_allclose(np.sort(points.get_offsets()[:, 0]), np.sort(coordinates[:, 0]), rtol=1e-6)


def test_embedding_errors_name_the_key(query):
    bare = query.copy()
    del bare.obsm["X_cellular"]
    with pytest.raises(KeyError, match="cellular_embed"):
        cellular.pl.embedding(bare, show=False)
    with pytest.raises(KeyError, match="X_tsne"):
        cellular.pl.embedding(query, basis="tsne", show=False)
    with pytest.raises(KeyError, match="no_such_column"):
        cellular.pl.embedding(query, color="no_such_column", show=False)
    unannotated = query.copy()
    unannotated.obs = unannotated.obs[["cell_type"]]
    with pytest.raises(KeyError, match="cellular_annotate"):
        cellular.pl.embedding(unannotated, show=False)
    with pytest.raises(KeyError, match="cellular_label.*cellular_annotate"):
        cellular.pl.confusion_matrix(unannotated, true_key="cell_type")
    with pytest.raises(KeyError, match="no_such_column"):
        cellular.pl.f1_per_type(query, true_key="no_such_column")
    with pytest.raises(KeyError, match="cellular_novel_score.*novel_types"):
        cellular.pl.novelty_histogram(unannotated)
    no_uns = query.copy()
    del no_uns.uns["cellular"]["cellular_novel"]
    with pytest.raises(KeyError, match="score_threshold.*novel_types"):
        cellular.pl.novelty_histogram(no_uns)


@pytest.fixture
def figdir(tmp_path):
    """scanpy's figure folder pointed at a fresh (not yet created) folder, restored afterwards."""
    previous = sc.settings.figdir
    sc.settings.figdir = tmp_path / "figures"
    yield tmp_path / "figures"
    sc.settings.figdir = previous


def test_save_follows_scanpy_convention(query, symphony_model, figdir, tmp_path, monkeypatch):
    file_format = sc.settings.file_format_figs

    ax = cellular.pl.confusion_matrix(query, true_key="truth", save=True)
    assert (figdir / f"confusion_matrix.{file_format}").stat().st_size > 0
    assert ax is not None and not plt.fignum_exists(ax.figure.number)  # returned, and closed after saving
    cellular.pl.confusion_matrix(query, true_key="truth", save="_x.png")
    assert (figdir / "confusion_matrix_x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cellular.pl.f1_per_type(query, true_key="truth", save="_query")
    cellular.pl.novelty_histogram(query, save="_query.png")
    cellular.pl.training_history(symphony_model, save=True)
    axes = cellular.pl.embedding(query, color="cellular_label", basis="cellular", save="_x.png")
    assert len(axes) == 1
    assert sorted(path.name for path in figdir.iterdir()) == sorted(
        [
            f"confusion_matrix.{file_format}",
            "confusion_matrix_x.png",
            f"f1_per_type_query.{file_format}",
            "novelty_histogram_query.png",
            f"training_history.{file_format}",
            "embedding_x.png",
        ]
    )
    with pytest.raises(ValueError, match="figdir"):
        cellular.pl.novelty_histogram(query, save=str(tmp_path / "elsewhere.png"))
    shown = []
    monkeypatch.setattr(plt, "show", lambda: shown.append(True))
    assert cellular.pl.novelty_histogram(query, show=True) is None and shown == [True]  # shown: nothing returned
    assert len(list(figdir.iterdir())) == 6  # nothing saved without save=


def test_training_history(symphony_model, symphony_split):
    axes = cellular.pl.training_history(symphony_model, show=False)
    assert [ax.get_title() for ax in axes] == ["loss", "snn loss", "batch loss", "centroid loss", "temperature"]
    epochs = symphony_model.training_summary_["epochs_run"]
    assert len(axes[0].get_lines()) == 2 and len(axes[0].get_lines()[0].get_xdata()) == epochs
    np.testing.assert_allclose(
        axes[-1].get_lines()[0].get_ydata(), symphony_model.history["temperature"]["temperature"]
    )

    train, _ = symphony_split
    reference = train[:200].copy()
    CELLULAR.setup_anndata(reference, labels_key="cell_type")
    with pytest.raises(NotTrainedError, match="train"):
        cellular.pl.training_history(CELLULAR(reference, n_top_genes=200))
