"""Reading an embeddings store (``embed`` output) back: AnnData or xarray, lazily with dask."""

from __future__ import annotations

import numpy as np
import pandas as pd


def read_embeddings(path: str, as_: str = "anndata", lazy: bool = True):
    """The embeddings at ``path`` as an AnnData (obsm ``X_hvae_level_<l>``) or an xarray Dataset
    (``level_<l>_mean`` over dims ``cell`` x ``latent_<l>``, coordinate ``obs_id``); dask-backed
    (lazy) by default. Refuses an incomplete output."""
    import dask.array as da
    import zarr

    group = zarr.open_group(path, mode="r")
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
        adata.uns["hvae_embeddings"] = {k: (v if isinstance(v, (str, int, float, bool)) else str(v)) for k, v in attrs.items()}
        return adata
    raise ValueError(f"as_ must be 'anndata' or 'xarray', got {as_!r}")


def attach_embeddings(adata, path: str) -> None:
    """Copy every level's means into ``adata.obsm`` for the cells of ``adata`` (matched by obs name)."""
    embeddings = read_embeddings(path, lazy=False)
    position = embeddings.obs_names.get_indexer(adata.obs_names)
    if (position < 0).any():
        missing = adata.obs_names[position < 0][:3].tolist()
        raise KeyError(f"{int((position < 0).sum())} cells of adata are not in {path} (e.g. {missing})")
    for key, values in embeddings.obsm.items():
        adata.obsm[key] = np.asarray(values)[position]


__all__ = ["attach_embeddings", "read_embeddings"]
