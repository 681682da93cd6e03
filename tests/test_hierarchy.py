"""Hierarchical cell-type labels: registration, the hierarchical loss, consistent predictions and back-off."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import read_dataset

import cellular
from cellular import CELLULAR
from cellular.data import LabelHierarchy, ancestors, lineage_map
from cellular.metrics import consistency_penalty, hierarchical_f1
from cellular.nn import hierarchical_cross_entropy
from cellular.train import ClassifierTrainingPlan

PBMC = lineage_map("pbmc")
T_SUBTYPES = ["CD4 T cell", "CD8 T cell"]
SYMPHONY_TYPES = [
    "B cell",
    "CD14 Monocyte",
    "CD16 Monocyte",
    "CD4 T cell",
    "CD8 T cell",
    "Dendritic cell",
    "HSPC",
    "Megakaryocyte/Platelet",
    "NK cell",
]


def _consistent(frame, prefix, hierarchy):
    """Whether each level's label is the next level's parent (or the same label) for every cell."""
    columns = [f"{prefix}_{level}" for level in hierarchy.level_names]
    values = frame[columns].astype(str).to_numpy()
    for coarse, fine in zip(values.T[:-1], values.T[1:], strict=True):
        ok = [c == f or hierarchy.parents.get(f) == c for c, f in zip(coarse, fine, strict=True)]
        if not all(ok):
            return False
    return True


@pytest.fixture(scope="module")
def ambiguous(symphony_split):
    """A model whose CD4/CD8 labels were assigned at random in training: the child level is ambiguous."""
    train, test = symphony_split
    train = train.copy()
    labels = train.obs["cell_type"].astype(str).to_numpy()
    t_cells = np.isin(labels, T_SUBTYPES)
    labels[t_cells] = np.random.default_rng(0).choice(T_SUBTYPES, int(t_cells.sum()))
    train.obs["scrambled"] = labels
    CELLULAR.setup_anndata(train, labels_key="scrambled", batch_key="batch", label_hierarchy=PBMC)
    model = CELLULAR(train)
    model.train(max_epochs=60, progress_bar=False)
    return model, train, test.copy()


def test_hierarchical_cross_entropy_matches_a_naive_reference():
    hierarchy = LabelHierarchy(PBMC, SYMPHONY_TYPES)
    ancestry = torch.as_tensor(hierarchy.ancestry)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(40, len(SYMPHONY_TYPES), generator=generator, dtype=torch.float64)
    labels = torch.randint(0, len(SYMPHONY_TYPES), (40,), generator=generator)
    weight = torch.rand(len(SYMPHONY_TYPES), generator=generator, dtype=torch.float64) + 0.1
    probabilities = torch.softmax(logits, dim=1)
    losses, weights = [], []
    for cell in range(40):
        chain = ancestors(SYMPHONY_TYPES[labels[cell]], PBMC)
        node_terms = []
        for node in chain:
            below = [i for i, t in enumerate(SYMPHONY_TYPES) if node in ancestors(t, PBMC)]
            node_terms.append(-torch.log(probabilities[cell, below].sum()))
        losses.append(torch.stack(node_terms).mean())
        weights.append(weight[labels[cell]])
    naive = (torch.stack(losses) * torch.stack(weights)).sum() / torch.stack(weights).sum()
    torch.testing.assert_close(hierarchical_cross_entropy(logits, labels, ancestry.double(), weight), naive)
    identity = torch.eye(len(SYMPHONY_TYPES), dtype=torch.float64)
    torch.testing.assert_close(
        hierarchical_cross_entropy(logits, labels, identity, weight), F.cross_entropy(logits, labels, weight=weight)
    )


def test_classifier_plan_trains_on_the_hierarchical_loss():
    hierarchy = LabelHierarchy(PBMC, SYMPHONY_TYPES)
    classifier = cellular.nn.CellTypeClassifier(8, len(SYMPHONY_TYPES)).eval()
    ancestry = torch.as_tensor(hierarchy.ancestry)
    plan = ClassifierTrainingPlan(classifier, lr=1e-3, weight_decay=0.0, ancestry=ancestry)
    flat = ClassifierTrainingPlan(classifier, lr=1e-3, weight_decay=0.0)
    batch = {"X": torch.randn(16, 8), "labels": torch.arange(16) % len(SYMPHONY_TYPES)}
    logits = classifier(batch["X"])
    torch.testing.assert_close(plan._loss(batch), hierarchical_cross_entropy(logits, batch["labels"], ancestry))
    assert not torch.isclose(plan._loss(batch), flat._loss(batch))


def test_consistency_penalty_is_zero_for_consistent_probabilities_and_positive_otherwise():
    hierarchy = LabelHierarchy(PBMC, SYMPHONY_TYPES)
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(len(SYMPHONY_TYPES)), size=50)
    nodes = hierarchy.node_probabilities(probabilities)
    np.testing.assert_allclose(consistency_penalty(nodes, hierarchy.nodes, PBMC), 0.0, atol=1e-12)
    independent = nodes.copy()
    cd8, t_cell = hierarchy.nodes.index("CD8 T cell"), hierarchy.nodes.index("T cell")
    independent[:, cd8] = independent[:, t_cell] + 0.2  # a sigmoid per label can say CD8 T cell > T cell
    # Only the CD8 -> T cell pair is violated, by 0.2 in every cell.
    np.testing.assert_allclose(consistency_penalty(independent, hierarchy.nodes, PBMC), 0.2)


def test_a_type_that_is_also_a_parent_keeps_the_cells_it_is_likeliest_for():
    """A reference labelled at mixed depth: ``T cell`` is a type and the parent of two others."""
    types = ["T cell", "CD4 T cell", "CD8 T cell", "B cell"]
    hierarchy = LabelHierarchy(PBMC, types)
    probabilities = np.array(
        [
            [0.60, 0.20, 0.10, 0.10],  # the coarse type itself
            [0.20, 0.50, 0.20, 0.10],  # a subtype
            [0.30, 0.30, 0.30, 0.10],  # a tie stays at the type
            [0.10, 0.10, 0.10, 0.70],
            [0.00, 0.40, 0.40, 0.20],  # a type without mass descends
        ]
    )
    prediction = hierarchy.predict(probabilities, threshold=0.5)
    finest = [types[code] for code in prediction.finest]
    assert finest == ["T cell", "CD4 T cell", "T cell", "B cell", "CD4 T cell"]
    for path in prediction.path:
        names = [hierarchy.nodes[code] for code in path]
        assert all(a == b or PBMC.get(b) == a for a, b in zip(names[:-1], names[1:], strict=True)), names


def test_predictions_follow_one_path_and_back_off_to_the_parent(ambiguous):
    model, train, query = ambiguous
    hierarchy = model.label_hierarchy
    assert hierarchy.level_names == ["level_0", "level_1", "level_2"]
    cellular.tl.cellular_annotate(query, model, novel_as_unknown=False)
    assert _consistent(query.obs, "cellular_label", hierarchy)
    assert (query.obs["cellular_label"].astype(str) == query.obs["cellular_label_level_2"].astype(str)).all()
    truth = query.obs["cell_type"].astype(str).to_numpy()
    backed_off = query.obs["cellular_label_hierarchical"].astype(str).to_numpy()
    t_cells = np.isin(truth, T_SUBTYPES)
    others = ~t_cells & np.isin(truth, model.cell_types)
    print(
        f"T cells labelled 'T cell': {(backed_off[t_cells] == 'T cell').mean():.3f}; "
        f"other cells labelled their type: {(backed_off[others] == truth[others]).mean():.3f}"
    )
    assert (backed_off[t_cells] == "T cell").mean() >= 0.6
    assert (backed_off[others] == truth[others]).mean() >= 0.9
    flat = hierarchical_f1(truth, query.obs["cellular_label"].astype(str), PBMC)
    hierarchical = hierarchical_f1(truth, backed_off, PBMC)
    print(f"hierarchical precision: flat {flat['precision']:.3f}, with back-off {hierarchical['precision']:.3f}")
    assert hierarchical["precision"] > flat["precision"] + 0.02
    record = query.uns["cellular"]["cellular_label"]
    assert record["hierarchy"]["levels"] == hierarchy.level_names
    assert record["params"]["hierarchy_threshold"] == 0.7


def test_min_confidence_reads_the_confidence_of_the_path_type(ambiguous):
    """With a hierarchy the confidence written is the path's type's probability, which can be below the largest
    (another lab's cells: Kang onto the Symphony model); min_confidence applies to that confidence, and the counts
    count the path's types."""
    model, _, _ = ambiguous
    query = read_dataset("pbmc_kang2018_ifnb_subset")
    cellular.tl.cellular_annotate(query, model, novel_as_unknown=False)
    probabilities = query.obsm["cellular_label_probabilities"]
    confidence = query.obs["cellular_label_confidence"].to_numpy()
    off_path = confidence < probabilities.max(axis=1) - 1e-6
    assert off_path.sum() >= 5
    threshold = float(np.median((confidence[off_path] + probabilities.max(axis=1)[off_path]) / 2))
    strict = query.copy()
    cellular.tl.cellular_annotate(strict, model, novel_as_unknown=False, min_confidence=threshold)
    labelled = strict.obs["cellular_label"].astype(str).to_numpy() != "Unknown"
    np.testing.assert_array_equal(labelled, strict.obs["cellular_label_confidence"].to_numpy() >= threshold)
    counts = strict.uns["cellular"]["cellular_label"]["counts"]
    path_types = query.obs["cellular_label_level_2"].astype(str)  # without min_confidence: no cell unknown
    expected = [int((path_types == cell_type).sum()) for cell_type in model.cell_types]
    assert counts.loc[model.cell_types, "n_likeliest"].tolist() == expected


def test_map_backs_off_like_annotation(ambiguous):
    model, train, query = ambiguous
    index = cellular.ReferenceIndex.build(model, train, "scrambled", backend="exact")
    cellular.tl.cellular_map(query, model, index)
    assert _consistent(query.obs, "cellular_scrambled", model.label_hierarchy)
    truth = query.obs["cell_type"].astype(str).to_numpy()
    backed_off = query.obs["cellular_scrambled_hierarchical"].astype(str).to_numpy()
    t_cells = np.isin(truth, T_SUBTYPES)
    print(f"map: T cells labelled 'T cell' {(backed_off[t_cells] == 'T cell').mean():.3f}")
    assert (backed_off[t_cells] == "T cell").mean() >= 0.5
    flat = query.obs["cellular_scrambled"].astype(str).to_numpy()
    assert (flat[t_cells] == "T cell").sum() == 0  # the flat vote cannot say "T cell": the back-off does


def test_hierarchy_survives_save_and_load(ambiguous, tmp_path):
    model, _, query = ambiguous
    model.save(tmp_path / "model")
    loaded = CELLULAR.load(tmp_path / "model")
    assert loaded.label_hierarchy.parents == model.label_hierarchy.parents
    first, second = query.copy(), query.copy()
    cellular.tl.cellular_annotate(first, model, novel_as_unknown=False)
    cellular.tl.cellular_annotate(second, loaded, novel_as_unknown=False)
    assert (first.obs["cellular_label_hierarchical"] == second.obs["cellular_label_hierarchical"]).all()


def test_levels_from_columns(symphony_split):
    train, _ = symphony_split
    adata = train.copy()
    CELLULAR.setup_anndata(adata, labels_key=["cell_type_broad", "cell_type"], batch_key="batch")
    model = CELLULAR(adata, n_top_genes=200)
    hierarchy = model.label_hierarchy
    assert hierarchy.level_names == ["cell_type_broad", "cell_type"]
    assert hierarchy.parents["CD8 T cell"] == "T" and hierarchy.parents["CD14 Monocyte"] == "Mono"
    assert model.setup_args["labels_key"] == "cell_type"


def test_bad_hierarchies_are_refused(symphony_split):
    train, _ = symphony_split
    adata = train.copy()
    with pytest.raises(ValueError, match="cycle"):
        CELLULAR.setup_anndata(
            adata, labels_key="cell_type", label_hierarchy={**PBMC, "lymphoid": "T cell"}, batch_key="batch"
        )
    with pytest.raises(ValueError, match="not in the label hierarchy"):
        CELLULAR.setup_anndata(
            adata, labels_key="cell_type", label_hierarchy={"CD4 T cell": "T cell"}, batch_key="batch"
        )
    adata.obs["broad"] = adata.obs["cell_type_broad"].astype(str)
    adata.obs.loc[adata.obs_names[adata.obs["cell_type"] == "CD8 T cell"][:3], "broad"] = "NK"
    with pytest.raises(ValueError, match="sit under several labels"):
        CELLULAR.setup_anndata(adata, labels_key=["broad", "cell_type"], batch_key="batch")
    with pytest.raises(ValueError, match="distinct level names"):
        CELLULAR.setup_anndata(
            adata, labels_key="cell_type", label_hierarchy=PBMC, label_levels=["lineage", "type"], batch_key="batch"
        )
