"""Train CELLULAR with DDP on 2 CPU processes (gloo), save on rank 0, as a user's script would.

Run by tests/test_train.py: ``python train_ddp.py TRAIN.h5ad MODEL_DIR``. Lightning's DDP launcher starts the
second process by running this script again.
"""

import sys

import anndata as ad

from cellular import CELLULAR

if __name__ == "__main__":
    train_path, model_dir = sys.argv[1], sys.argv[2]
    adata = ad.read_h5ad(train_path)
    CELLULAR.setup_anndata(adata, labels_key="cell_type", batch_key="batch")
    model = CELLULAR(adata, n_top_genes=1000, n_latent=32)
    model.train(max_epochs=25, accelerator="cpu", devices=2, strategy="ddp", progress_bar=False)
    if model.trainer.is_global_zero:
        model.save(model_dir, overwrite=True)
