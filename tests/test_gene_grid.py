"""The gene-grid fingerprint encoder (Spoticell) on real data: quality, stored layout, gene matching, save/load."""

import numpy as np
import pytest
import torch
from helpers import model_knn_macro_f1, pca_knn_macro_f1
from sklearn.metrics import f1_score

import cellular
from cellular import CELLULAR
from cellular.data import gene_grid_layout, grid_neighbour_correlation, grid_side
from cellular.nn import GeneGridEncoder

N_GENES = 500


@pytest.fixture(scope="module")
def grid_model(symphony_split):
    train, _ = symphony_split
    train = train.copy()
    CELLULAR.setup_anndata(train, labels_key="cell_type", batch_key="batch")
    model = CELLULAR(train, encoder="gene_grid", n_top_genes=N_GENES)
    model.train(max_epochs=60, progress_bar=False)
    return model


def test_gene_grid_model_beats_pca_on_a_held_out_technology(grid_model, symphony_split):
    train, test = symphony_split
    assert grid_model.get_latent_representation().shape == (train.n_obs, 64)  # Spoticell's fingerprint size
    f1 = model_knn_macro_f1(grid_model, train, test)
    baseline = pca_knn_macro_f1(grid_model, train, test)
    print(f"gene-grid kNN macro-F1 {f1:.3f} vs PCA {baseline:.3f}")
    assert f1 >= baseline


def test_fingerprints_feed_annotation_and_the_index(grid_model, symphony_split):
    train, test = symphony_split
    query = test.copy()
    cellular.tl.cellular_annotate(query, grid_model, novel_as_unknown=False)
    truth = query.obs["cell_type"].astype(str).to_numpy()
    known = np.isin(truth, grid_model.cell_types)
    annotated = f1_score(truth[known], query.obs["cellular_label"].astype(str).to_numpy()[known], average="macro")
    index = cellular.ReferenceIndex.build(grid_model, train, "cell_type", backend="exact")
    cellular.tl.cellular_map(query, grid_model, index)
    mapped = f1_score(truth[known], query.obs["cellular_cell_type"].astype(str).to_numpy()[known], average="macro")
    baseline = pca_knn_macro_f1(grid_model, train, test)
    cellular.tl.novel_types(query, grid_model, alpha=0.05)
    false_novel = float(query.obs["cellular_novel"].to_numpy()[known].mean())
    print(f"annotate {annotated:.3f}, map {mapped:.3f}, PCA {baseline:.3f}; known flagged novel {false_novel:.3f}")
    assert annotated >= baseline - 0.05
    assert mapped >= baseline - 0.05
    assert false_novel < 0.2


def test_save_load_keeps_layout_and_fingerprints(grid_model, symphony_split, tmp_path):
    _, test = symphony_split
    grid_model.save(tmp_path / "grid")
    loaded = CELLULAR.load(tmp_path / "grid")
    assert loaded.module.encoder_name == "gene_grid"
    assert torch.equal(loaded.module.encoder.grid_positions, grid_model.module.encoder.grid_positions)
    assert loaded.fingerprint == grid_model.fingerprint
    np.testing.assert_array_equal(loaded.get_latent_representation(test), grid_model.get_latent_representation(test))


def test_genes_are_matched_by_name_not_position(grid_model, symphony_split):
    _, test = symphony_split
    shuffled = test[:, np.random.default_rng(0).permutation(test.n_vars)].copy()
    np.testing.assert_array_equal(
        grid_model.get_latent_representation(shuffled), grid_model.get_latent_representation(test)
    )


def test_coexpression_layout_puts_correlated_genes_side_by_side(grid_model, symphony_split):
    train, _ = symphony_split
    genes = grid_model.genes
    expression, _ = cellular.data.read_expression(
        train, genes, layer=None, log_normalized=False, target_sum=grid_model.target_sum
    )
    values = expression.rows(np.arange(train.n_obs))
    stored = grid_model.module.encoder.grid_positions.numpy()
    np.testing.assert_array_equal(stored, gene_grid_layout(genes, "coexpression", values))
    alphabetical = gene_grid_layout(genes, "alphabetical")
    assert [genes[i] for i in np.argsort(alphabetical)] == sorted(genes)
    random_layout = np.random.default_rng(0).permutation(grid_side(len(genes)) ** 2)[: len(genes)]
    local = grid_neighbour_correlation(stored, values)
    others = [grid_neighbour_correlation(layout, values) for layout in (alphabetical, random_layout)]
    print(f"grid-neighbour correlation: coexpression {local:.3f}, alphabetical/random {others}")
    assert local > max(others) + 0.05


def test_absent_genes_are_read_as_not_measured():
    torch.manual_seed(0)
    encoder = GeneGridEncoder(30, n_latent=8).eval()
    x = torch.rand(4, 30)
    mask = torch.ones(30, dtype=torch.bool)
    mask[::3] = False
    changed = x.clone()
    changed[:, ~mask] = 100.0
    torch.testing.assert_close(encoder(changed, mask), encoder(x, mask))
    assert not torch.allclose(encoder(changed), encoder(x))


@pytest.mark.parametrize(
    ("positions", "n_genes"), [([0, 0, 1], 3), ([0, 1, 4], 3), ([0, 1], 3)], ids=["duplicate", "off-grid", "short"]
)
def test_invalid_layouts_are_refused(positions, n_genes):
    with pytest.raises(ValueError, match="gene-grid layout must place each"):
        GeneGridEncoder(n_genes, grid_positions=torch.tensor(positions))


def test_encoder_choice_is_checked(symphony_split):
    train, _ = symphony_split
    train = train.copy()
    CELLULAR.setup_anndata(train, labels_key="cell_type", batch_key="batch")
    with pytest.raises(ValueError, match="encoder must be one of"):
        CELLULAR(train, encoder="cnn")
    with pytest.raises(ValueError, match="gene_layout must be one of"):
        CELLULAR(train, encoder="gene_grid", gene_layout="random")
