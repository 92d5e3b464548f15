"""Bring new cells to an embedded atlas: their nearest atlas cells and the atlas's labels, at every level.

A query is embedded with the atlas's model (genes aligned by id, as ``embed`` does), searched in
each level's index, and every label column of the atlas is transferred by the vote of the k
nearest atlas cells at every level, with the winning share of the vote as its confidence. A cell
whose mean distance to its k nearest atlas cells exceeds what 99% of atlas cells have to theirs
(measured when the index was built) is flagged ``unlike_level_<l>``: nothing in the atlas is like it.

Results land as a scanpy user wants them: obs columns ``<label>_level_<l>`` and
``<label>_level_<l>_confidence``, ``unlike_level_<l>`` and ``unlike_level_<l>_score`` (the mean
distance over the atlas's median), and in obsm each level's representation (``X_hvae_level_<l>``)
and its neighbours (``hvae_neighbors_level_<l>``: store rows; ``hvae_distances_level_<l>``).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from .. import storage
from ..data.frames import portable_anndata
from .index import MANIFEST, AtlasIndex, IndexMismatch, default_index_path, read_ids


def resolve_index(path: str) -> str:
    """The index named by ``path``: an index directory, or an embeddings store with one beside it."""
    published = storage.resolve(path)  # on object storage, the version published there
    if storage.exists(storage.join(published, MANIFEST)):
        return path
    if storage.exists(storage.join(published, "zarr.json")):
        beside = default_index_path(path)
        if storage.exists(storage.join(storage.resolve(beside), MANIFEST)):
            return beside
        raise FileNotFoundError(
            f"{path} is an embeddings store with no index beside it ({beside}); build one with "
            f"`hvae-pipeline index --embeddings {path}`"
        )
    raise FileNotFoundError(f"{path} is neither an index built by `hvae-pipeline index` nor an embeddings store")


def open_atlas(index: str, levels=None) -> tuple[AtlasIndex, str, list[int]]:
    """(the opened index, its path, the levels asked for: every level by default): an index of
    another or an older store, and a level that does not exist, are refused."""
    index_path = resolve_index(str(index))
    atlas = AtlasIndex(index_path)
    wanted = list(range(atlas.n_levels)) if levels is None else [levels] if isinstance(levels, int) else list(levels)
    for level in wanted:
        atlas.level(level)
    return atlas, index_path, wanted


def check_embedded_by(atlas: AtlasIndex, identity: str, what: str) -> None:
    """Refuse a model (``what``, of id ``identity``) other than the one that embedded the atlas."""
    embedded_by = atlas.manifest["store"]["model_id"]
    if identity != embedded_by:
        raise IndexMismatch(
            f"the atlas {atlas.store} was embedded by model {embedded_by}; {what} is model {identity}: "
            "map a query with the atlas's own model"
        )


class AtlasLabels:
    """The atlas's label columns as codes per store row, read once: from the source the store
    records (checking that its cells are the store's, in order), or from a table (``atlas_obs``:
    Parquet, CSV or TSV with an ``obs_id`` column or the ids as its first column)."""

    def __init__(
        self, index: AtlasIndex, columns: list[str], atlas_obs: str | None = None, block_rows: int = 262_144
    ) -> None:
        from ..embed.store import open_store

        if not columns:
            raise ValueError("name at least one atlas label column to transfer (--labels)")
        self.columns = list(dict.fromkeys(columns))
        store = index.store
        group = open_store(store)
        ids = group["obs_id"]
        n_obs = int(ids.shape[0])
        self.codes = {c: np.full(n_obs, -1, np.int32) for c in self.columns}
        self.categories: dict[str, list] = {}
        if atlas_obs is not None:
            self._from_table(atlas_obs, ids, n_obs, block_rows)
        else:
            self._from_source(json.loads(group.attrs["source_args"]), ids, n_obs, store, block_rows)

    def _set(self, column: str, rows: slice, values) -> None:
        values = pd.Series(values, dtype=object)
        present = values.notna().to_numpy()
        text = values[present].astype(str)
        known = self.categories.setdefault(column, [])
        seen = set(known)
        known.extend(v for v in pd.unique(text) if v not in seen)
        codes = np.full(len(values), -1, np.int32)
        codes[present] = pd.Categorical(text, categories=known).codes
        self.codes[column][rows] = codes

    def _from_table(self, path: str, ids, n_obs: int, block_rows: int) -> None:
        if path.endswith(".parquet"):
            table = pd.read_parquet(path)
        elif path.endswith((".csv", ".tsv", ".txt")):
            table = pd.read_csv(path, sep="\t" if path.endswith((".tsv", ".txt")) else ",")
        else:
            raise ValueError(f"--atlas-obs {path}: give a .parquet, .csv or .tsv table")
        table = table.set_index("obs_id") if "obs_id" in table.columns else table.set_index(table.columns[0])
        table.index = table.index.astype(str)
        missing = [c for c in self.columns if c not in table.columns]
        if missing:
            raise KeyError(f"--atlas-obs {path} has no column {missing[0]!r} (columns: {list(table.columns)[:20]})")
        if table.index.has_duplicates:
            raise ValueError(f"--atlas-obs {path}: obs id {table.index[table.index.duplicated()][0]!r} appears twice")
        found = 0
        for lo in range(0, n_obs, block_rows):
            block = np.asarray(read_ids(ids, lo, lo + block_rows), dtype=object)
            where = table.index.get_indexer(block)
            hit = where >= 0
            found += int(hit.sum())
            for column in self.columns:
                values = pd.Series([None] * len(block), dtype=object)
                values[hit] = table[column].to_numpy(dtype=object)[where[hit]]
                self._set(column, slice(lo, lo + len(block)), values)
        if found == 0:
            raise KeyError(f"--atlas-obs {path}: none of its ids are atlas cells (e.g. {list(table.index[:3])})")

    def _from_source(self, source_args: dict, ids, n_obs: int, store: str, block_rows: int) -> None:
        from ..data.sources import open_source

        with open_source(**source_args) as source:
            if source.n_obs != n_obs:
                raise IndexMismatch(
                    f"the atlas source {source_args['source']} now has {source.n_obs:,} cells, the store "
                    f"{store} {n_obs:,}: give the labels with --atlas-obs TABLE"
                )
            for lo in range(0, n_obs, block_rows):
                obs = source.obs_rows(lo, min(n_obs, lo + block_rows))
                block = np.asarray(read_ids(ids, lo, lo + block_rows), dtype=object)
                if not np.array_equal(obs.index.astype(str).to_numpy(dtype=object), block):
                    raise IndexMismatch(
                        f"the atlas source {source_args['source']} no longer holds the store's cells in "
                        f"order (rows {lo}..{lo + len(block)}); give the labels with --atlas-obs TABLE"
                    )
                missing = [c for c in self.columns if c not in obs.columns]
                if missing:
                    raise KeyError(
                        f"the atlas source {source_args['source']} has no obs column {missing[0]!r} "
                        f"(columns: {list(obs.columns)[:20]})"
                    )
                for column in self.columns:
                    self._set(column, slice(lo, lo + len(block)), obs[column].to_numpy(dtype=object))


def vote(neighbour_codes: np.ndarray, n_categories: int) -> tuple[np.ndarray, np.ndarray]:
    """(winning code or -1, its share of the labelled neighbours) for each row of codes (-1: none)."""
    n, k = neighbour_codes.shape
    tally = np.zeros((n, max(n_categories, 1)), np.int32)
    rows = np.repeat(np.arange(n), k)
    codes = neighbour_codes.ravel()
    labelled = codes >= 0
    np.add.at(tally, (rows[labelled], codes[labelled]), 1)
    total = tally.sum(axis=1)
    winner = tally.argmax(axis=1)
    share = np.where(total > 0, tally[np.arange(n), winner] / np.maximum(total, 1), 0.0)
    return np.where(total > 0, winner, -1), share.astype(np.float32)


def check_k(index: AtlasIndex, k) -> None:
    """``k`` neighbours must be a whole number from 1 to the atlas's cells: more would pad every
    vote with missing neighbours."""
    n_obs = index.manifest["store"]["n_obs"]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n_obs:
        raise ValueError(f"k must be an integer from 1 to the atlas's {n_obs} cells ({index.store}), got {k!r}")


def map_levels(index: AtlasIndex, levels: dict[int, np.ndarray], labels: AtlasLabels | None, k: int = 15) -> dict:
    """Search and vote at every level given: ``{"obs": DataFrame columns, "obsm": arrays}``."""
    check_k(index, k)
    obs, obsm = {}, {}
    for level, vectors in levels.items():
        meta = index.level(level)
        index_k = index.manifest["settings"]["k"]
        distances, rows = index.search(level, vectors, max(k, index_k))
        distance = distances[:, :index_k].mean(axis=1)
        quantiles = meta["mean_knn_distance_quantiles"]
        obs[f"unlike_level_{level}"] = distance > quantiles["0.99"]
        obs[f"unlike_level_{level}_score"] = (distance / max(quantiles["0.5"], 1e-12)).astype(np.float32)
        distances, rows = distances[:, :k], rows[:, :k]
        obsm[f"X_hvae_level_{level}"] = np.asarray(vectors, np.float32)
        obsm[f"hvae_neighbors_level_{level}"] = rows
        obsm[f"hvae_distances_level_{level}"] = distances.astype(np.float32)
        for column in labels.columns if labels else []:
            codes = np.where(rows >= 0, labels.codes[column][np.maximum(rows, 0)], -1)
            categories = labels.categories.get(column, [])
            winner, share = vote(codes, len(categories))
            obs[f"{column}_level_{level}"] = (
                pd.Categorical.from_codes(winner, categories=categories)
                if categories
                else pd.Categorical([None] * len(winner))
            )
            obs[f"{column}_level_{level}_confidence"] = share
    return {"obs": obs, "obsm": obsm}


def attach(adata, mapped: dict, provenance: dict) -> None:
    for key, value in mapped["obs"].items():
        adata.obs[key] = value.to_numpy() if isinstance(value, pd.Series) else value
    for key, value in mapped["obsm"].items():
        adata.obsm[key] = value
    adata.uns["hvae_query"] = provenance


def query(
    checkpoint: str,
    index: str,
    source_args: dict,
    labels: list[str],
    out: str,
    *,
    k: int = 15,
    atlas_obs: str | None = None,
    levels: list[int] | None = None,
    batch_size: int = 4096,
    min_gene_overlap: float = 0.5,
    overwrite: bool = False,
    echo=print,
) -> dict:
    """Embed the query ``open_source(**source_args)`` with the atlas's model, map it to the atlas at
    every level and write ``out`` (.h5ad: the query's AnnData with the results; .parquet: a table
    of the obs columns). Nothing is written until every check has passed."""
    from ..data.alignment import GeneAlignment
    from ..embed.write import _id_note, _load, _open_as_recorded, model_id
    from ..train.step import encode_in_batches

    if not (out.endswith(".h5ad") or out.endswith(".parquet")):
        raise ValueError(f"--out {out}: write a .h5ad (the query AnnData with the results) or a .parquet table")
    if Path(out).exists() and not overwrite:
        raise FileExistsError(
            f"{out} exists; pass --overwrite to replace it (it is replaced only once the new one is written)"
        )
    storage.check_writable(str(Path(out).resolve().parent))  # an unwritable --out is refused before any work
    atlas, index_path, wanted = open_atlas(index, levels)
    check_k(atlas, k)
    store_attrs = _store_attrs(atlas.store)
    directory, origin, model, parts = _load(checkpoint, bool(store_attrs.get("ema", True)))
    identity = model_id(directory)
    check_embedded_by(atlas, identity, f"--checkpoint {checkpoint}")
    atlas_labels = AtlasLabels(atlas, labels, atlas_obs) if labels else None
    source_args, source = _open_as_recorded(source_args, parts.get("setup"), echo)
    try:
        alignment = GeneAlignment(
            source.feature_ids,
            parts["genes"]["feature_ids"],
            min_gene_overlap,
            source_name=source.uri,
            id_note=_id_note(source),
        )
        echo(f"genes: {alignment.summary()}")
        if source.n_obs == 0:
            raise ValueError(f"the query {source.uri} holds no cells")
        counts = alignment.apply(source.rows(0, source.n_obs))
        obs = source.read_obs()
    finally:
        source.close()
    encoded = encode_in_batches(model, counts, batch_size=batch_size)
    mapped = map_levels(atlas, {level: encoded[level] for level in wanted}, atlas_labels, k)
    provenance = {
        "index": _absolute(index_path),
        "store": atlas.store,
        "model_id": identity,
        "checkpoint": origin,
        "k": k,
        "nprobe": [atlas.level(level)["nprobe"] for level in wanted],
        "labels": list(labels),
        "query": source.uri,
    }
    _write(out, source_args, obs, mapped, provenance)
    summary = {
        "out": out,
        "cells": len(obs),
        "levels": wanted,
        "unlike": {level: int(np.sum(mapped["obs"][f"unlike_level_{level}"])) for level in wanted},
    }
    return summary


def _store_attrs(store: str) -> dict:
    from ..embed.store import open_store

    return dict(open_store(store).attrs)


def _absolute(path: str) -> str:
    return path if storage.is_url(path) else str(Path(path).resolve())


def _write(out: str, source_args: dict, obs: pd.DataFrame, mapped: dict, provenance: dict) -> None:
    """Write to a temporary file beside ``out``, then rename over it."""
    import anndata as ad

    target = Path(out).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=target.suffix, dir=target.parent)
    os.close(handle)
    try:
        if out.endswith(".parquet"):
            table = pd.DataFrame(mapped["obs"], index=obs.index.astype(str))
            table.index.name = "obs_id"
            table.to_parquet(temporary)
        else:
            source = str(source_args["source"])
            if source.endswith(".h5ad") and Path(source).exists() and not source_args.get("obs_filter"):
                adata = ad.read_h5ad(source)  # the query as the user has it, with the results beside
            else:
                adata = ad.AnnData(obs=obs.copy())
            adata.obs_names = adata.obs_names.astype(str)
            attach(adata, mapped, {k: (v if not isinstance(v, list) else np.asarray(v)) for k, v in provenance.items()})
            portable_anndata(adata).write_h5ad(temporary)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


__all__ = ["AtlasLabels", "attach", "check_embedded_by", "map_levels", "open_atlas", "query", "resolve_index", "vote"]
