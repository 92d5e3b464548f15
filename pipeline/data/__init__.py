"""The data layer: out-of-core sources, the ``shard`` writer and the sharded loader.

>>> from pipeline.data import ShardedDataset, densify
>>> dataset = ShardedDataset("shards/")
>>> for batch in dataset.loader(batch_size=4096, rank=rank, world_size=world_size, seed=0, epoch=epoch):
...     counts = densify(batch["counts"], device)      # (cells, genes) float32 on the device
"""

from .alignment import GeneAlignment, check_counts, read_gene_list
from .loader import CSRBatch, EpochPlan, ShardedDataset, ShardLoader, densify, rank_batch_sizes
from .shard_format import feature_hash, read_manifest
from .shard_writer import ShardSettings, write_shards
from .sources import AnnDataSource, ConcatSource, SomaSource, Source, open_census, open_source, open_sources

__all__ = [
    "AnnDataSource",
    "CSRBatch",
    "ConcatSource",
    "EpochPlan",
    "GeneAlignment",
    "ShardLoader",
    "ShardSettings",
    "ShardedDataset",
    "SomaSource",
    "Source",
    "check_counts",
    "densify",
    "feature_hash",
    "open_census",
    "open_source",
    "open_sources",
    "rank_batch_sizes",
    "read_gene_list",
    "read_manifest",
    "write_shards",
]
