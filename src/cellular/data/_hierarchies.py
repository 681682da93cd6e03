"""Cell-type hierarchies of the shared datasets' vocabularies, as parent maps ``{child: parent}``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# PBMC: type -> cell class -> lineage. Megakaryocytes/platelets and dendritic cells are of myeloid origin; HSPCs
# are the progenitors of both lineages.
_PBMC = {
    "CD4 T cell": "T cell",
    "CD8 T cell": "T cell",
    "T cell": "lymphoid",
    "NK cell": "lymphoid",
    "B cell": "lymphoid",
    "CD14 Monocyte": "monocyte",
    "CD16 Monocyte": "monocyte",
    "monocyte": "myeloid",
    "Dendritic cell": "myeloid",
    "Megakaryocyte/Platelet": "myeloid",
    "HSPC": "progenitor",
}

# Pancreas, human (Baron et al.: lower case) and mouse endocrinogenesis (Bastidas-Ponce et al.: capitalised):
# hormone-producing types -> endocrine; endocrine progenitors -> endocrine progenitor -> endocrine; exocrine and
# non-epithelial compartments.
_PANCREAS = {
    **{name: "endocrine" for name in ("alpha", "beta", "delta", "gamma", "epsilon")},
    **{name: "endocrine" for name in ("Alpha", "Beta", "Delta", "Epsilon")},
    **{name: "endocrine progenitor" for name in ("Ngn3 high EP", "Ngn3 low EP", "Pre-endocrine")},
    "endocrine progenitor": "endocrine",
    "acinar": "exocrine",
    "ductal": "exocrine",
    "Ductal": "exocrine",
    "activated stellate": "stellate",
    "quiescent stellate": "stellate",
    "stellate": "mesenchymal",
    "endothelial": "mesenchymal",
    "macrophage": "immune",
    "mast": "immune",
    "t_cell": "immune",
    "schwann": "mesenchymal",
}

LINEAGE_MAPS = {"pbmc": _PBMC, "pancreas": _PANCREAS}


def lineage_map(name: str) -> dict[str, str]:
    """The parent map ``{child: parent}`` of a tissue's cell types (a copy).

    Parameters
    ----------
    name
        ``"pbmc"`` (the vocabulary of ``pbmc_symphony_3tech``, ``pbmc3k_seurat`` and the Kang data: type -> cell
        class -> lymphoid / myeloid / progenitor) or ``"pancreas"`` (Baron's human and the mouse endocrinogenesis
        vocabularies: type -> endocrine / exocrine / mesenchymal / immune, endocrine progenitors in between).
    """
    if name not in LINEAGE_MAPS:
        raise KeyError(f"No lineage map named {name!r}; available: {sorted(LINEAGE_MAPS)}.")
    return dict(LINEAGE_MAPS[name])


def ancestors(label: str, parents: dict[str, str]) -> list[str]:
    """``label`` followed by its parent, grandparent, ... up to a root of ``parents``."""
    chain = [label]
    while chain[-1] in parents:
        parent = parents[chain[-1]]
        if parent in chain:
            raise ValueError(
                f"The parent map has a cycle through {parent!r} ({' -> '.join([*chain, parent])}); a hierarchy must "
                "lead every label to a root."
            )
        chain.append(parent)
    return chain


@dataclass
class HierarchicalPrediction:
    """What :meth:`LabelHierarchy.predict` returns (codes index :attr:`LabelHierarchy.nodes` unless said)."""

    path: np.ndarray
    """``(n_cells, n_levels)`` node of each level on the top-down path."""
    deepest: np.ndarray
    """Deepest node of the path with probability at least the threshold; ``-1`` where not even a root is."""
    confidence: np.ndarray
    """Probability of ``deepest`` (of the likeliest root where ``deepest`` is ``-1``)."""
    finest: np.ndarray
    """Type code (index of :attr:`LabelHierarchy.types`) at the end of the path."""


class LabelHierarchy:
    """A label hierarchy over a model's cell types: the nodes, their levels and consistent predictions.

    The nodes are the types and all their ancestors in ``parents``. A cell type's probability is its own; a node's is
    the sum over the types at or below it, so a child is never more probable than its parent. Levels count from the
    roots (level 0); a type whose chain is shorter than the deepest one keeps its own label at the levels below it.

    Parameters
    ----------
    parents
        Parent map ``{child: parent}``; every type must appear in it, as a child or as a parent.
    types
        The classes probabilities are given over, in column order.
    level_names
        A name per level, root first; ``level_0``, ``level_1``, ... when ``None``.
    """

    def __init__(self, parents: dict[str, str], types: list[str], level_names: list[str] | None = None):
        parents = {str(child): str(parent) for child, parent in parents.items()}
        known = set(parents) | set(parents.values())
        missing = [t for t in types if t not in known]
        if missing:
            raise ValueError(
                f"Cell type(s) {missing[:10]} are not in the label hierarchy. Add each to the parent map "
                "({child: parent}), or pass labels_key as a list of columns (coarse to fine) to derive it."
            )
        chains = {t: ancestors(t, parents)[::-1] for t in types}
        self.parents = parents
        self.types = list(types)
        self.nodes = list(dict.fromkeys(node for t in types for node in chains[t]))
        self.n_levels = max(len(chain) for chain in chains.values())
        if level_names is None:
            level_names = [f"level_{depth}" for depth in range(self.n_levels)]
        if len(level_names) != self.n_levels or len(set(level_names)) != len(level_names):
            raise ValueError(
                f"The label hierarchy has {self.n_levels} levels but {len(level_names)} distinct level names were "
                f"given ({list(level_names)}); pass one name per level, root first."
            )
        self.level_names = [str(name) for name in level_names]
        node_index = {node: i for i, node in enumerate(self.nodes)}
        self.ancestry = np.zeros((len(types), len(self.nodes)), dtype=np.float32)
        for row, t in enumerate(types):
            self.ancestry[row, [node_index[node] for node in chains[t]]] = 1.0
        self.children = np.zeros((len(self.nodes), len(self.nodes)), dtype=bool)
        for node in self.nodes:
            if node in parents and parents[node] in node_index:
                self.children[node_index[parents[node]], node_index[node]] = True
        self.roots = np.array([node not in parents for node in self.nodes])
        self.type_nodes = np.array([node_index[t] for t in types], dtype=np.int64)
        self.is_type = np.isin(np.arange(len(self.nodes)), self.type_nodes)

    def node_probabilities(self, probabilities: np.ndarray) -> np.ndarray:
        """``(n_cells, n_nodes)`` probabilities of every node from ``(n_cells, n_types)`` type probabilities."""
        return np.asarray(probabilities, dtype=np.float64) @ self.ancestry

    def top_down(self, probabilities: np.ndarray) -> np.ndarray:
        """``(n_cells, n_levels)`` node codes of the top-down path: the likeliest root, then the likeliest child.

        A node that is itself a type (a reference labelled at mixed depth: ``T cell`` beside ``CD4 T cell``) keeps its
        cells where the type alone is at least as probable as each of its children. Consistent by construction: each
        level's label is the parent (in the map) of the next level's, or the same label where the path stops.
        """
        probabilities = np.asarray(probabilities, dtype=np.float64)
        node_probabilities = self.node_probabilities(probabilities)
        n_cells = node_probabilities.shape[0]
        own = np.zeros_like(node_probabilities)
        own[:, self.type_nodes] = probabilities
        cells = np.arange(n_cells)
        current = np.where(self.roots[None, :], node_probabilities, -np.inf).argmax(axis=1)
        path = np.empty((n_cells, self.n_levels), dtype=np.int64)
        path[:, 0] = current
        for depth in range(1, self.n_levels):
            candidates = self.children[current]
            scores = np.where(candidates, node_probabilities, -np.inf)
            best = scores.argmax(axis=1)
            stay = self.is_type[current] & (own[cells, current] >= scores[cells, best])
            descend = candidates.any(axis=1) & ~stay
            current = np.where(descend, best, current)
            path[:, depth] = current
        return path

    def predict(self, probabilities: np.ndarray, threshold: float) -> HierarchicalPrediction:
        """Consistent labels at every level and the deepest confident one, from type probabilities."""
        nodes = self.node_probabilities(probabilities)
        path = self.top_down(probabilities)
        deepest = self.deepest_confident(nodes, path, threshold)
        confidence = np.where(deepest >= 0, nodes[np.arange(nodes.shape[0]), np.maximum(deepest, 0)], nodes.max(1))
        type_of_node = {node: i for i, node in enumerate(self.types)}
        finest = np.array([type_of_node.get(node, -1) for node in self.nodes])[path[:, -1]]
        return HierarchicalPrediction(path, deepest, confidence, finest)

    def deepest_confident(self, node_probabilities: np.ndarray, path: np.ndarray, threshold: float) -> np.ndarray:
        """Node code of the deepest node of ``path`` with probability at least ``threshold``; ``-1`` where none is.

        Probabilities never grow along the path, so the confident nodes are a prefix of it: a cell whose type is
        uncertain backs off to its class, then to its lineage.
        """
        along = np.take_along_axis(node_probabilities, path, axis=1)
        n_confident = (along >= threshold).sum(axis=1)
        deepest = np.take_along_axis(path, np.maximum(n_confident - 1, 0)[:, None], axis=1)[:, 0]
        return np.where(n_confident > 0, deepest, -1)


def hierarchy_from_columns(obs, keys: list[str], unlabeled_category: str) -> dict[str, str]:
    """Parent map of labels given at several levels, one ``obs`` column per level (coarse to fine).

    Each label of a finer column must sit under a single label of the next coarser one; equal labels at two levels
    (a type that is its own class) add no link. Cells with ``unlabeled_category`` at either level are left out.
    """
    parents: dict[str, str] = {}
    for coarse, fine in zip(keys[:-1], keys[1:], strict=True):
        pairs = obs[[fine, coarse]].astype(str).drop_duplicates()
        pairs = pairs[(pairs[fine] != unlabeled_category) & (pairs[coarse] != unlabeled_category)]
        pairs = pairs[pairs[fine] != pairs[coarse]]
        counts = pairs[fine].value_counts()
        two = counts[counts > 1].index.tolist()
        if two:
            example = pairs[pairs[fine] == two[0]][coarse].tolist()
            raise ValueError(
                f"Label(s) {two[:5]} of adata.obs[{fine!r}] sit under several labels of adata.obs[{coarse!r}] (e.g. "
                f"{two[0]!r} under {example[:3]}); a hierarchy gives each label one parent. Fix the labels, or rename "
                "the child per parent."
            )
        for child, parent in pairs.itertuples(index=False):
            if parents.get(child, parent) != parent:
                raise ValueError(
                    f"Label {child!r} has parent {parents[child]!r} at one level and {parent!r} at another; a "
                    "hierarchy gives each label one parent."
                )
            parents[child] = parent
    return parents
