from ._datamodule import CellularDataModule, EmbeddingDataModule
from ._sampler import MinibatchSampler, distributed_world

__all__ = ["CellularDataModule", "EmbeddingDataModule", "MinibatchSampler", "distributed_world"]
