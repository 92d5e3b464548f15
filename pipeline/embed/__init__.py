"""The embedding stage: ``embed`` (one embedding per level for every cell, to Zarr, resumable),
reading a store back (``read_embeddings``, ``attach_embeddings``) and ``embed_release``, the
scheduled job per atlas release.

>>> from pipeline.embed import read_embeddings
>>> adata = read_embeddings("embeddings.zarr")      # obsm["X_hvae_level_<l>"], dask-backed
"""

from .store import attach_embeddings, read_embeddings
from .write import EmbedSettings, embed, model_id

__all__ = ["EmbedSettings", "attach_embeddings", "embed", "model_id", "read_embeddings"]
