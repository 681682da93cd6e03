from ._encoder import CellSentenceEncoder
from ._pairs import SentencePairs, label_pairs, pca_similarity_pairs
from ._sentences import NO_GENES, sentences_from_top_genes, top_genes
from ._weights import WEIGHTS_PACKAGE, WEIGHTS_SHA256, WEIGHTS_VERSION, pretrained_model_path

__all__ = [
    "NO_GENES",
    "WEIGHTS_PACKAGE",
    "WEIGHTS_SHA256",
    "WEIGHTS_VERSION",
    "CellSentenceEncoder",
    "SentencePairs",
    "label_pairs",
    "pca_similarity_pairs",
    "pretrained_model_path",
    "sentences_from_top_genes",
    "top_genes",
]
