"""Data frames written in a form every supported anndata reads.

pandas 3 (and pandas 2 with ``future.infer_string``) gives text columns a string dtype, which
anndata 0.11-0.12 refuses to write unless ``anndata.settings.allow_write_nullable_strings`` is on,
and which anndata < 0.11 cannot read back. Written as object columns of ``str`` (anndata's
``string-array``) they read everywhere, under either pandas.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def _is_new_string(dtype) -> bool:
    return dtype != object and pd.api.types.is_string_dtype(dtype) and not isinstance(dtype, pd.CategoricalDtype)


def _objects(values) -> pd.Index:
    return pd.Index(np.asarray(values, dtype=object), dtype=object)


def portable_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with its string-dtype columns, categories and index as objects (a copy when any)."""
    changed = {}
    for name in frame.columns:
        column = frame[name]
        if isinstance(column.dtype, pd.CategoricalDtype):
            if _is_new_string(column.cat.categories.dtype):
                changed[name] = column.cat.rename_categories(_objects(column.cat.categories))
        elif _is_new_string(column.dtype):
            changed[name] = pd.Series(np.asarray(column, dtype=object), index=frame.index, dtype=object)
    if not changed and not _is_new_string(frame.index.dtype):
        return frame
    out = frame.copy()
    for name, column in changed.items():
        out[name] = column
    if _is_new_string(out.index.dtype):
        out.index = _objects(out.index).rename(frame.index.name)
    return out


def portable_anndata(adata):
    """``adata``'s obs and var made portable in place (before ``write_h5ad`` / ``write_zarr``)."""
    adata.obs = portable_frame(adata.obs)
    adata.var = portable_frame(adata.var)
    return adata
