"""Cell-type hierarchies of the shared datasets' vocabularies, as parent maps ``{child: parent}``."""

from __future__ import annotations

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
