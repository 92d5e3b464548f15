"""Reading an embeddings store (``embed`` output) back: AnnData or xarray, lazily with dask."""

from __future__ import annotations

import numpy as np
import pandas as pd


def open_store(path: str):
    """The Zarr group of the embeddings store at ``path``, read-only (on object storage, the
    version published there: ``storage.resolve``)."""
    import zarr

    from ..storage import resolve

    return zarr.open_group(resolve(path), mode="r")


def read_embeddings(path: str, as_: str = "anndata", lazy: bool = True):
    """The embeddings at ``path`` as an AnnData (obsm ``X_hvae_level_<l>``) or an xarray Dataset
    (``level_<l>_mean`` over dims ``cell`` x ``latent_<l>``, coordinate ``obs_id``); dask-backed
    (lazy) by default. Refuses an incomplete output."""
    import dask.array as da

    group = open_store(path)
    attrs = dict(group.attrs)
    if not attrs.get("complete"):
        raise ValueError(f"{path} is incomplete (embedding was interrupted); rerun `hvae-pipeline embed` to finish it")
    obs_ids = np.asarray(group["obs_id"][:]).astype(object)  # numpy StringDType -> Python str
    arrays = {}
    for level in range(len(attrs["level_dims"])):
        for kind in ("mean", "logvar"):
            key = f"level_{level}/{kind}"
            if key in group:
                array = da.from_zarr(group[key]) if lazy else np.asarray(group[key][:])
                arrays[(level, kind)] = array
    if as_ == "xarray":
        import xarray as xr

        data = {f"level_{l}_{k}": (("cell", f"latent_{l}"), a) for (l, k), a in arrays.items()}
        return xr.Dataset(data, coords={"obs_id": ("cell", obs_ids)}, attrs={k: str(v) for k, v in attrs.items()})
    if as_ == "anndata":
        import anndata as ad

        obsm = {(f"X_hvae_level_{l}" if k == "mean" else f"X_hvae_level_{l}_logvar"): a for (l, k), a in arrays.items()}
        adata = ad.AnnData(obs=pd.DataFrame(index=pd.Index(obs_ids, name="obs_id")), obsm=obsm)
        adata.uns["hvae_embeddings"] = {
            k: (v if isinstance(v, (str, int, float, bool)) else str(v)) for k, v in attrs.items()
        }
        return adata
    raise ValueError(f"as_ must be 'anndata' or 'xarray', got {as_!r}")


class EmbeddingsView:
    """An embeddings store read lazily and without its obs ids in memory (an atlas has tens of
    millions): ``n_obs``, ``uns["hvae_embeddings"]``, ``obsm`` (dask arrays, as in the AnnData of
    :func:`read_embeddings`), ``obs_ids_at(rows)`` and ``positions_of(ids)`` (read in blocks)."""

    def __init__(self, path: str, block_rows: int = 1_000_000) -> None:
        import dask.array as da

        self.path, self.block_rows = path, block_rows
        self.group = open_store(path)
        attrs = dict(self.group.attrs)
        if not attrs.get("complete"):
            raise ValueError(
                f"{path} is incomplete (embedding was interrupted); rerun `hvae-pipeline embed` to finish it"
            )
        self.uns = {
            "hvae_embeddings": {k: (v if isinstance(v, (str, int, float, bool)) else str(v)) for k, v in attrs.items()}
        }
        self.n_obs = int(self.group["obs_id"].shape[0])
        self.obsm = {
            f"X_hvae_level_{level}": da.from_zarr(self.group[f"level_{level}/mean"])
            for level in range(len(attrs["level_dims"]))
        }

    def obs_ids_at(self, rows: np.ndarray) -> np.ndarray:
        """The obs ids at ``rows`` (sorted row numbers), as Python strings."""
        return np.asarray(self.group["obs_id"].get_orthogonal_selection(np.asarray(rows, dtype=np.int64))).astype(
            object
        )

    def positions_of(self, ids) -> np.ndarray:
        """Row of each id in this store (-1 where absent), reading the ids a block at a time."""
        wanted = pd.Index(np.asarray(ids, dtype=object))
        positions = np.full(len(wanted), -1, np.int64)
        array = self.group["obs_id"]
        for lo in range(0, self.n_obs, self.block_rows):
            block = np.asarray(array[lo : lo + self.block_rows]).astype(object)
            where = wanted.get_indexer(block)
            hit = where >= 0
            positions[where[hit]] = lo + np.flatnonzero(hit)
        return positions


def attach_embeddings(adata, path: str) -> None:
    """Copy every level's means into ``adata.obsm`` for the cells of ``adata`` (matched by obs name)."""
    embeddings = read_embeddings(path, lazy=False)
    position = embeddings.obs_names.get_indexer(adata.obs_names)
    if (position < 0).any():
        missing = adata.obs_names[position < 0][:3].tolist()
        raise KeyError(f"{int((position < 0).sum())} cells of adata are not in {path} (e.g. {missing})")
    for key, values in embeddings.obsm.items():
        adata.obsm[key] = np.asarray(values)[position]


__all__ = ["attach_embeddings", "open_store", "read_embeddings"]
