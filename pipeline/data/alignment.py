"""Gene-space alignment by ``feature_id`` and count validation of streamed CSR blocks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp


def read_gene_list(path: str | Path) -> list[str]:
    """One feature_id per line ('#' comments and blank lines ignored), or a CSV/TSV with a
    ``feature_id`` column."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"gene list {path} does not exist")
    if path.suffix in (".csv", ".tsv"):
        frame = pd.read_csv(path, sep="," if path.suffix == ".csv" else "\t")
        if "feature_id" not in frame.columns:
            raise ValueError(f"gene list {path}: no 'feature_id' column (columns: {list(frame.columns)})")
        genes = frame["feature_id"].astype(str).tolist()
    else:
        genes = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
        genes = [g for g in genes if g]
    if not genes:
        raise ValueError(f"gene list {path} is empty")
    return genes


# Where AnnData files keep gene ids, in the order they are looked for (then the index):
# CELLxGENE's feature_id; sc.read_10x_mtx's gene_ids; other public files' gene_id, ensembl_id.
GENE_ID_COLUMNS = ("feature_id", "gene_ids", "gene_id", "ensembl_id")


def gene_ids_of(var: pd.DataFrame, gene_column: str | None = None, where: str = "var") -> tuple[np.ndarray, str]:
    """(gene ids, where they were read from) of an AnnData ``var`` frame: ``gene_column`` if
    given, else the first of ``GENE_ID_COLUMNS`` present, else the index."""
    if gene_column is not None:
        if gene_column not in var.columns:
            raise KeyError(f"{where} has no column {gene_column!r} (columns: {list(var.columns)})")
        return var[gene_column].astype(str).to_numpy(dtype=object), f"var[{gene_column!r}]"
    for column in GENE_ID_COLUMNS:
        if column in var.columns:
            return var[column].astype(str).to_numpy(dtype=object), f"var[{column!r}]"
    return var.index.astype(str).to_numpy(dtype=object), "var.index"


def gene_id_note(used: str) -> str:
    """For an error about gene overlap: where the ids came from and where else to look."""
    return (
        f"gene ids were read from {used} (looked for {', '.join(GENE_ID_COLUMNS)}, then the index; "
        "name another column with --gene-column / gene_column=)"
    )


class GeneAlignment:
    """Maps a source's genes onto a target gene list: reorder, drop extras, zero-fill missing.

    Raises when fewer than ``min_overlap`` of the target genes are in the source: a model
    trained on one gene set fed mostly zeros would embed garbage silently.
    """

    def __init__(
        self,
        source_ids: Sequence[str],
        target_ids: Sequence[str],
        min_overlap: float = 0.5,
        source_name: str = "source",
        id_note: str | None = None,
    ) -> None:
        source_ids = pd.Index(np.asarray(source_ids, dtype=object).astype(str))
        target_ids = pd.Index(np.asarray(target_ids, dtype=object).astype(str))
        for name, ids in ((source_name, source_ids), ("the gene list", target_ids)):
            if ids.has_duplicates:
                duplicates = ids[ids.duplicated()].unique()[:5].tolist()
                raise ValueError(f"{name}: duplicate feature_ids {duplicates}")
        self.target_ids = target_ids
        self.n_source, self.n_target = len(source_ids), len(target_ids)
        target_of_source = target_ids.get_indexer(source_ids)  # -1: source gene not in the target list
        self.column_map = target_of_source.astype(np.int64)
        present = source_ids.get_indexer(target_ids) >= 0
        self.n_found = int(present.sum())
        self.missing = target_ids[~present].tolist()
        self.identity = self.n_source == self.n_target and bool(np.all(self.column_map == np.arange(self.n_source)))
        fraction = self.n_found / max(1, self.n_target)
        if fraction < min_overlap:
            raise ValueError(
                f"{source_name}: only {self.n_found} of the {self.n_target} genes in the gene list ({fraction:.1%}) "
                f"are in the source, below the minimum overlap {min_overlap:.0%} (missing e.g. {self.missing[:5]}); "
                "is this the right gene list or organism?" + (f" {id_note}" if id_note else "")
            )

    def summary(self) -> str:
        return (
            f"{self.n_found}/{self.n_target} genes found; {len(self.missing)} missing zero-filled; "
            f"{self.n_source - int((self.column_map >= 0).sum())} source genes dropped"
        )

    def apply(self, counts: sp.csr_matrix) -> sp.csr_matrix:
        """(cells, n_source) CSR -> (cells, n_target) CSR with sorted indices."""
        if self.identity:
            return counts
        columns = self.column_map[counts.indices]
        keep = columns >= 0
        rows = np.repeat(np.arange(counts.shape[0]), np.diff(counts.indptr))
        indptr = np.zeros(counts.shape[0] + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows[keep], minlength=counts.shape[0]), out=indptr[1:])
        aligned = sp.csr_matrix(
            (counts.data[keep], columns[keep].astype(np.int32), indptr), shape=(counts.shape[0], self.n_target)
        )
        aligned.sort_indices()
        return aligned


def looks_like_counts(values: np.ndarray) -> bool:
    """Whether a sample of a matrix's values holds raw counts (non-negative integers): how a
    layer that holds them is found for an error's hint."""
    return bool(values.size) and bool(np.all(values >= 0)) and bool(np.all(values == np.round(values)))


def check_counts(counts: sp.csr_matrix, where: str, obs_ids: Sequence[str], feature_ids: Sequence[str]) -> np.ndarray:
    """The block's counts as uint32 after checking them; raise on NaN/inf, negative or
    non-integer counts (or counts >= 2**32), naming the cell and gene."""
    data = counts.data
    if data.dtype.kind in "ui":
        if data.size and data.dtype.kind == "i" and data.min() < 0:
            _raise_bad(counts, data < 0, "is negative", where, obs_ids, feature_ids)
        return data.astype(np.uint32, copy=False)
    with np.errstate(invalid="ignore", over="ignore"):
        as_int = data.astype(np.uint32)  # one conversion doubles as the check: any bad value changes
        bad = as_int != data
    if bad.any():
        for mask, what in (
            (~np.isfinite(data), "is not finite"),
            (data < 0, "is negative"),
            (data != np.floor(data), "is not an integer"),
            (bad, "does not fit in uint32"),
        ):
            if mask.any():
                _raise_bad(counts, mask, what, where, obs_ids, feature_ids)
    return as_int


def _raise_bad(counts, mask, what, where, obs_ids, feature_ids) -> None:
    entry = int(np.flatnonzero(mask)[0])
    row = int(np.searchsorted(counts.indptr, entry, side="right") - 1)
    gene = int(counts.indices[entry])
    raise ValueError(
        f"{where}: count {counts.data[entry]!r} for cell {obs_ids[row]!r}, gene {feature_ids[gene]!r} {what}; "
        "the model needs raw integer UMI counts (pass --layer to pick the raw-count layer)"
    )
