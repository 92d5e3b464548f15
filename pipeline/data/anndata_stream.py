"""Write an AnnData file (h5ad or AnnData-Zarr) block by block, in constant memory.

X is stored as CSR (data / indices / indptr) and appended through anndata's own
``sparse_dataset(...).append``; obs columns are appended array by array. The result opens
with ``anndata.read_h5ad`` / ``anndata.read_zarr`` like any other file.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .frames import portable_frame


class AnnDataStreamWriter:
    """Append (CSR block, obs block) pairs to a new h5ad or AnnData-Zarr store.

    >>> with AnnDataStreamWriter("out.zarr", var, uns={"provenance": {...}}) as writer:
    ...     for counts, obs in blocks:
    ...         writer.append(counts, obs)

    Every obs block must have the same columns; categorical columns must carry the same
    categories in every block (declare all categories up front).
    """

    def __init__(self, path: str | Path, var: pd.DataFrame, uns: dict | None = None) -> None:
        self.path = Path(path)
        self.format = _format_of(self.path)
        self.var = var
        self.uns = {k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in (uns or {}).items()}
        self.n_obs = 0
        self._columns: list[str] | None = None
        self._categories: dict[str, list] = {}
        if self.format == "h5ad":
            import h5py

            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._root = h5py.File(self.path, "w")
        else:
            import zarr

            self._root = zarr.open_group(str(self.path), mode="w", zarr_format=3)
        self._root.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})

    def append(self, counts: sp.csr_matrix, obs: pd.DataFrame) -> None:
        with warnings.catch_warnings():
            # zarr 3.1 announces a future default (autosharding) on every array anndata creates.
            warnings.filterwarnings("ignore", message=".*autosharding.*", category=UserWarning)
            self._append(sp.csr_matrix(counts), obs)

    def _append(self, counts: sp.csr_matrix, obs: pd.DataFrame) -> None:
        if counts.shape[1] != len(self.var):
            raise ValueError(f"{self.path}: block has {counts.shape[1]} genes, var has {len(self.var)}")
        if counts.shape[0] != len(obs):
            raise ValueError(f"{self.path}: block has {counts.shape[0]} rows but {len(obs)} obs rows")
        if self._columns is None:
            self._first_block(counts, obs)
        else:
            self._check_obs(obs)
            ad.io.sparse_dataset(self._root["X"]).append(counts)
            self._append_array("obs/_index", np.asarray(obs.index, dtype=object))
            for name in self._columns:
                column = obs[name]
                if isinstance(column.dtype, pd.CategoricalDtype):
                    self._append_array(f"obs/{name}/codes", column.cat.codes.to_numpy())
                else:
                    self._append_array(f"obs/{name}", column.to_numpy())
        self.n_obs += counts.shape[0]

    def _first_block(self, counts: sp.csr_matrix, obs: pd.DataFrame) -> None:
        self._columns = list(obs.columns)
        self._categories = {
            name: list(obs[name].cat.categories)
            for name in self._columns
            if isinstance(obs[name].dtype, pd.CategoricalDtype)
        }
        resizable = {"maxshape": (None,), "chunks": True} if self.format == "h5ad" else {}
        obs = portable_frame(obs.copy())
        obs.index = obs.index.astype(str).astype(object)
        ad.io.write_elem(self._root, "X", counts)
        ad.io.write_elem(self._root, "obs", obs, dataset_kwargs=resizable)
        ad.io.write_elem(self._root, "var", portable_frame(self.var))
        ad.io.write_elem(self._root, "uns", self.uns)

    def _check_obs(self, obs: pd.DataFrame) -> None:
        if list(obs.columns) != self._columns:
            raise ValueError(
                f"{self.path}: obs columns {list(obs.columns)} differ from the first block's {self._columns}"
            )
        for name, categories in self._categories.items():
            if list(obs[name].cat.categories) != categories:
                raise ValueError(f"{self.path}: obs column {name!r} has other categories than the first block")

    def _append_array(self, key: str, values: np.ndarray) -> None:
        array = self._root[key]
        if self.format == "h5ad":
            old = array.shape[0]
            array.resize((old + len(values),))
            array[old:] = values
        else:
            array.append(values if values.dtype == object else values.astype(array.dtype))

    def close(self) -> None:
        if self.format == "h5ad":
            self._root.close()

    def __enter__(self) -> "AnnDataStreamWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _format_of(path: Path) -> str:
    if path.suffix == ".h5ad":
        return "h5ad"
    if path.suffix == ".zarr":
        return "zarr"
    raise ValueError(f"{path}: the output must end in .h5ad or .zarr")
