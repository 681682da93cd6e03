# %% [markdown]
# # Train CELLULAR on a multi-technology reference and embed a held-out technology
#
# Data: `pbmc_symphony_3tech.h5ad` from the shared data folder (1,200 PBMCs from three 10x technologies, raw
# counts, 9 cell types). We train on two technologies, embed all cells, annotate the held-out technology, flag
# novel cells and compute cell-type vectors.
# Run as a script (`python tutorials/train_embed_symphony.py`) or open it as a notebook with jupytext.

# %%
import os

import anndata as ad
import matplotlib

matplotlib.use("Agg")
import scanpy as sc

import cellular

MAX_EPOCHS = int(os.environ.get("TUTORIAL_MAX_EPOCHS", "0")) or None  # None: the model's default
adata = cellular.data.read_shared_dataset("pbmc_symphony_3tech")
reference = adata[adata.obs["batch"] != "3pv2"].copy()
query = adata[adata.obs["batch"] == "3pv2"].copy()
print(reference.obs["batch"].value_counts().to_dict(), "->", query.n_obs, "query cells")

# %% [markdown]
# A cell type needs at least two labelled cells; rare ones are marked as unlabelled ("Unknown").

# %%
counts = reference.obs["cell_type"].value_counts()
rare = counts[counts < 2].index
reference.obs["cell_type"] = (
    reference.obs["cell_type"].astype(str).where(~reference.obs["cell_type"].isin(rare), "Unknown").astype("category")
)
cellular.CELLULAR.setup_anndata(reference, labels_key="cell_type", batch_key="batch")
model = cellular.CELLULAR(reference)
model.train(max_epochs=MAX_EPOCHS)
print(model)
cellular.pl.training_history(model, save="training_history.png")

# %% [markdown]
# Embed reference and query (genes matched by name; the query needs no labels) and draw a joint UMAP.

# %%
cellular.tl.cellular_embed(reference, model)
cellular.tl.cellular_embed(query, model)
joint = ad.concat({"reference": reference, "query": query}, label="dataset")
sc.pp.neighbors(joint, use_rep="X_cellular", metric="cosine")
sc.tl.umap(joint)
sc.pl.umap(joint, color=["cell_type", "batch"], show=False, save="_cellular_symphony.png")
print(joint)

# %% [markdown]
# Annotate the query with the calibrated classifier, flag cells of types absent from the reference, and store a
# vector per predicted type. Three calls, all results in the query AnnData.

# %%
cellular.tl.cellular_annotate(query, model)
cellular.tl.novel_types(query, model, alpha=0.05)
cellular.tl.cell_type_representations(query, model, labels_key="cellular_label")
known = query.obs["cell_type"].isin(model.cell_types)
accuracy = (query.obs["cellular_label"].astype(str) == query.obs["cell_type"].astype(str))[known].mean()
print(f"accuracy on known types {accuracy:.3f}; calibration temperature {model.calibration_temperature_:.2f}")
print(query.uns["cellular"]["cellular_novel"]["summary"]["n_novel"], "cells flagged as novel at alpha = 0.05")
print(query.uns["cellular"]["cellular_representations"]["distances"].round(2))
