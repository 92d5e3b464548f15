"""Out-of-core sources of raw counts: h5ad, AnnData-Zarr, TileDB-SOMA and the CELLxGENE Census.

Every source exposes the same small interface, used by ``shard`` and by streaming HVG selection:

- ``var``: DataFrame indexed by ``feature_id`` (with ``feature_name`` where known), source order;
- ``read_obs()``: the obs frame of the selected cells (index: obs ids; column ``source_row``:
  the row in an AnnData file, or the ``soma_joinid``); ``obs_rows(start, stop)`` the same for the
  selected cells ``[start, stop)`` (the synthetic atlas and shards read only those; others slice
  ``read_obs()`` held once), so ``shard`` and ``embed`` never hold a whole atlas's obs;
- ``iter_blocks(block_size)``: ``(offset, counts)`` pairs, ``counts`` a CSR block of the selected
  cells ``[offset, offset + n)`` over all source genes, read a block at a time.

Only one block of X is ever in memory. ``open_source`` picks the class from a path, URL or the
word ``census``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..storage import is_remote, is_url

DEFAULT_CENSUS_OBS_FILTER = "is_primary_data == True"


class Source:
    """Base class; see the module docstring for the contract."""

    uri: str
    var: pd.DataFrame

    @property
    def feature_ids(self) -> np.ndarray:
        return self.var.index.to_numpy(dtype=object)

    @property
    def n_obs(self) -> int:
        return len(self._selected)

    def read_obs(self) -> pd.DataFrame:
        raise NotImplementedError

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Counts of the selected cells ``[start, stop)`` (random access, for parallel readers)."""
        raise NotImplementedError

    def obs_rows(self, start: int, stop: int) -> pd.DataFrame:
        """obs of the selected cells ``[start, stop)``; here a slice of ``read_obs()`` read once."""
        if getattr(self, "_obs_whole", None) is None:
            self._obs_whole = self.read_obs()
        return self._obs_whole.iloc[start:stop]

    def content_stamp(self) -> dict | None:
        """What changes when the source's files are rewritten in place (size and modification time),
        or None where nothing cheap tells (a SOMA array, the Census, a generator)."""
        return None

    def obs_names(self, start: int, stop: int) -> np.ndarray:
        """The ids (obs names, as str objects) of the selected cells ``[start, stop)``."""
        return self.obs_rows(start, stop).index.astype(str).to_numpy(dtype=object)

    def iter_blocks(self, block_size: int = 16_384) -> Iterator[tuple[int, sp.csr_matrix]]:
        for start in range(0, self.n_obs, block_size):
            yield start, self.rows(start, min(start + block_size, self.n_obs))

    def provenance(self) -> dict:
        raise NotImplementedError

    def check_counts(self, counts: sp.csr_matrix, obs_ids) -> np.ndarray:
        """``alignment.check_counts`` on a block of this source; the error names the other layers
        of the source that do hold integer counts."""
        from .alignment import check_counts

        try:
            return check_counts(counts, self.uri, obs_ids, self.feature_ids)
        except ValueError as error:
            layers = [name for name in self.count_layers() if name != getattr(self, "layer", None)]
            if not layers:
                raise
            raise ValueError(
                f"{error}. Integer counts are in {', '.join(repr(n) for n in layers)} of this source: "
                f"pass --layer {layers[0]}"
            ) from None

    def count_layers(self) -> list[str]:
        """Other layers of the source whose first rows hold non-negative integers (for hints)."""
        return []

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_selection(self, obs_filter: str | None) -> None:
        if len(self._selected) == 0:
            what = f"the obs filter {obs_filter!r} matches no cells" if obs_filter else "it has no cells"
            raise ValueError(f"{self.uri}: {what}")


def _filter_frame(obs: pd.DataFrame, obs_filter: str | None, uri: str) -> np.ndarray:
    """Positions of the rows that pass a pandas ``query`` expression (all rows without one)."""
    if not obs_filter:
        return np.arange(len(obs))
    try:
        mask = obs.eval(obs_filter)
    except Exception as error:  # pandas raises many kinds; name the expression and columns
        raise ValueError(
            f"{uri}: cannot evaluate obs filter {obs_filter!r} ({error}); obs columns: {list(obs.columns)}"
        ) from None
    return np.flatnonzero(np.asarray(mask, dtype=bool))


class AnnDataSource(Source):
    """An h5ad file (read through h5py, never loaded) or an AnnData-Zarr store, local or fsspec URL.

    ``layer``: None for ``X``, ``"raw"`` for ``raw/X`` (with ``raw/var``), or a name in ``layers``.
    """

    def __init__(
        self, uri: str, layer: str | None = None, obs_filter: str | None = None, gene_column: str | None = None
    ) -> None:
        from anndata.io import read_elem

        from .alignment import gene_ids_of

        self.uri, self.layer, self.obs_filter = str(uri), layer, obs_filter
        self._root, self._handle = _open_anndata_root(self.uri)
        if layer in (None, "X"):
            element, var_key = "X", "var"
        elif layer == "raw":
            element, var_key = "raw/X", "raw/var"
        else:
            element, var_key = f"layers/{layer}", "var"
        if element not in self._root:
            layers = list(self._root["layers"].keys()) if "layers" in self._root else []
            raise ValueError(f"{self.uri}: no {element!r} in the file (layers: {layers}, raw: {'raw' in self._root})")
        self._matrix_group = self._root[element]
        self._encoding = dict(self._matrix_group.attrs).get("encoding-type", "array")
        if self._encoding == "csc_matrix":
            raise ValueError(f"{self.uri}: {element} is stored as CSC; streaming needs rows, convert it to CSR first")
        var = read_elem(self._root[var_key])
        ids, self.gene_ids_from = gene_ids_of(var, gene_column, where=f"{self.uri} {var_key}")
        names = next(
            (var[c] for c in ("feature_name", "gene_symbol", "gene_symbols", "gene_name") if c in var.columns), None
        )
        if names is None and self.gene_ids_from != "var.index":
            names = var.index  # ids from a column: the index usually holds the symbols
        self.var = pd.DataFrame(index=pd.Index(ids, name="feature_id", dtype=object))
        if names is not None:
            self.var["feature_name"] = np.asarray(names, dtype=object)
        self._obs = read_elem(self._root["obs"])
        self._selected = _filter_frame(self._obs, obs_filter, self.uri)
        self._check_selection(obs_filter)
        n_rows = self._matrix_shape()[0]
        if n_rows != len(self._obs):
            raise ValueError(f"{self.uri}: {element} has {n_rows} rows but obs has {len(self._obs)}")

    def _matrix_shape(self) -> tuple[int, int]:
        if self._encoding == "csr_matrix":
            return tuple(int(v) for v in self._matrix_group.attrs["shape"])
        return tuple(int(v) for v in self._matrix_group.shape)

    def count_layers(self) -> list[str]:
        from anndata.io import sparse_dataset

        from .alignment import looks_like_counts

        candidates = [("raw", "raw/X")] if "raw/X" in self._root else []
        if "layers" in self._root:
            candidates += [(name, f"layers/{name}") for name in self._root["layers"].keys()]
        found = []
        for name, element in candidates:
            try:
                group = self._root[element]
                sparse = dict(group.attrs).get("encoding-type") == "csr_matrix"
                sample = (sparse_dataset(group) if sparse else group)[: min(200, len(self._obs))]
                values = sample.data if sp.issparse(sample) else np.asarray(sample).ravel()
            except Exception:  # noqa: BLE001 - an unreadable or CSC layer is not a candidate
                continue
            if looks_like_counts(values):
                found.append(name)
        return found

    def read_obs(self) -> pd.DataFrame:
        obs = self._obs.iloc[self._selected].copy()
        obs.index = obs.index.astype(str)
        obs["source_row"] = self._selected.astype(np.int64)
        return obs

    def _matrix(self):
        from anndata.io import sparse_dataset

        return sparse_dataset(self._matrix_group) if self._encoding == "csr_matrix" else self._matrix_group

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        selected = self._selected[start:stop]
        if len(selected) == 0:
            return sp.csr_matrix((0, len(self.var)), dtype=np.float32)
        block = self._matrix()[int(selected[0]) : int(selected[-1]) + 1]
        block = sp.csr_matrix(block) if sp.issparse(block) else sp.csr_matrix(np.asarray(block))
        return block if len(selected) == block.shape[0] else block[selected - selected[0]]

    def iter_blocks(self, block_size: int = 16_384) -> Iterator[tuple[int, sp.csr_matrix]]:
        matrix = self._matrix()
        n_rows = self._matrix_shape()[0]
        offset = 0
        for start in range(0, n_rows, block_size):
            stop = min(start + block_size, n_rows)
            lo, hi = np.searchsorted(self._selected, [start, stop])
            if hi == lo:
                continue
            block = matrix[start:stop]
            block = sp.csr_matrix(block) if sp.issparse(block) else sp.csr_matrix(np.asarray(block))
            if hi - lo != stop - start:
                block = block[self._selected[lo:hi] - start]
            yield offset, block
            offset += hi - lo

    def provenance(self) -> dict:
        return {"kind": "anndata", "uri": self.uri, "layer": self.layer, "obs_filter": self.obs_filter}

    def content_stamp(self) -> dict | None:
        """Size and modification time of the h5ad file, or of the store's counts and obs (AnnData-Zarr)."""
        from .shard_format import filesystem

        fs, path = filesystem(self.uri)
        stamp = {}
        for part in ("",) if fs.isfile(path) else ("X", "obs", "layers", "raw"):
            target = f"{path}/{part}" if part else path
            if not fs.exists(target):
                continue
            files = [target] if fs.isfile(target) else fs.find(target)
            infos = [fs.info(f) for f in files]
            stamp[part or "file"] = [
                sum(int(i.get("size") or 0) for i in infos),
                max((_mtime(i) for i in infos), default=0.0),
            ]
        return stamp or None

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _open_anndata_root(uri: str):
    """(root group, handle to close) for an h5ad or AnnData-Zarr path/URL."""
    from .shard_format import filesystem

    fs, path = filesystem(uri)
    if not fs.exists(path):
        raise FileNotFoundError(f"source {uri} does not exist")
    if uri.endswith(".h5ad") or uri.endswith(".h5"):
        import h5py

        try:
            handle = h5py.File(fs.open(path, "rb"), "r") if is_remote(uri) else h5py.File(path, "r")
        except OSError as error:
            size = fs.size(path)
            raise ValueError(
                f"{uri} ({size:,} bytes) cannot be opened as HDF5 ({error}): it is truncated or "
                "damaged (an interrupted download or copy?) or not an h5ad file"
            ) from None
        return handle, handle
    import zarr

    try:
        return zarr.open_group(uri, mode="r"), None
    except Exception as error:
        raise ValueError(f"{uri}: not an h5ad file or an AnnData-Zarr store ({error})") from None


class SomaSource(Source):
    """A TileDB-SOMA Experiment (or a Census experiment), read by ``soma_joinid`` blocks.

    Open it with a URI (``SomaSource(uri=...)``) or hand it an open experiment (``experiment=``),
    as the Census opener does. ``obs_filter`` / ``var_filter`` are SOMA value filters.
    """

    def __init__(
        self,
        uri: str | None = None,
        *,
        experiment=None,
        measurement: str = "RNA",
        layer: str | None = None,
        obs_filter: str | None = None,
        var_filter: str | None = None,
        provenance: dict | None = None,
        owner=None,
    ) -> None:
        import tiledbsoma

        self.uri = uri or getattr(experiment, "uri", "soma")
        self._owner = owner  # the Census handle, closed with us
        if experiment is None:
            try:
                experiment = tiledbsoma.Experiment.open(uri)
            except Exception as error:
                raise ValueError(f"{uri}: not a TileDB-SOMA Experiment ({error})") from None
        self._experiment = experiment
        self.measurement, self.obs_filter, self.var_filter = measurement, obs_filter, var_filter
        if measurement not in experiment.ms:
            raise ValueError(f"{self.uri}: no measurement {measurement!r} (has {list(experiment.ms.keys())})")
        ms = experiment.ms[measurement]
        layers = list(ms.X.keys())
        self.layer = layer or ("raw" if "raw" in layers else (layers[0] if layers else None))
        if self.layer not in layers:
            raise ValueError(
                f"{self.uri}: measurement {measurement!r} has no X layer {self.layer!r} (layers: {layers})"
            )
        self._X = ms.X[self.layer]
        var = _read_soma_frame(ms.var, var_filter, self.uri, "var")
        # feature_id (Census), gene_ids, or var_id (tiledbsoma.io's name for an AnnData var index)
        id_column = next((c for c in ("feature_id", "gene_ids", "var_id") if c in var.columns), None)
        ids = var[id_column].astype(str) if id_column else var["soma_joinid"].astype(str)
        self.var = pd.DataFrame(index=pd.Index(ids.to_numpy(), name="feature_id", dtype=object))
        if "feature_name" in var.columns:
            self.var["feature_name"] = var["feature_name"].astype(str).to_numpy()
        self._var_joinids = var["soma_joinid"].to_numpy(np.int64)
        # Column of each var joinid in our gene order; -1 for genes the var filter dropped.
        self._column_of = np.full(int(self._X.shape[1]), -1, dtype=np.int64)
        self._column_of[self._var_joinids] = np.arange(len(self._var_joinids))
        self._obs = _read_soma_frame(experiment.obs, obs_filter, self.uri, "obs").sort_values("soma_joinid")
        self._selected = self._obs["soma_joinid"].to_numpy(np.int64)
        self._check_selection(obs_filter)
        self._provenance = provenance or {}

    def read_obs(self) -> pd.DataFrame:
        obs = self._obs.copy()
        index = obs["obs_id"].astype(str) if "obs_id" in obs.columns else obs["soma_joinid"].astype(str)
        obs.index = pd.Index(index.to_numpy(), dtype=object)
        obs = obs.drop(columns=[c for c in ("obs_id",) if c in obs.columns])
        return obs.rename(columns={"soma_joinid": "source_row"})

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        joinids = self._selected[start:stop]
        if len(joinids) == 0:
            return sp.csr_matrix((0, len(self._var_joinids)), dtype=np.float32)
        # A dense run of joinids reads as one slice (inclusive in SOMA; unselected rows drop out
        # below); a sparse selection (a tissue out of the whole Census) as point coordinates.
        span = int(joinids[-1]) - int(joinids[0]) + 1
        coords = slice(int(joinids[0]), int(joinids[-1])) if span <= 2 * len(joinids) else joinids
        table = self._X.read((coords,)).tables().concat()
        rows = np.searchsorted(joinids, table["soma_dim_0"].to_numpy())
        columns = self._column_of[table["soma_dim_1"].to_numpy()]
        keep = (rows < len(joinids)) & (columns >= 0)
        keep[keep] &= joinids[rows[keep]] == table["soma_dim_0"].to_numpy()[keep]
        data = table["soma_data"].to_numpy()[keep]
        block = sp.csr_matrix((data, (rows[keep], columns[keep])), shape=(len(joinids), len(self._var_joinids)))
        block.sum_duplicates()
        return block

    def provenance(self) -> dict:
        return {
            "kind": "tiledbsoma",
            "uri": self.uri,
            "measurement": self.measurement,
            "layer": self.layer,
            "obs_filter": self.obs_filter,
            "var_filter": self.var_filter,
            **self._provenance,
        }

    def close(self) -> None:
        for handle in (self._experiment, self._owner):
            try:
                handle.close()
            except Exception:
                pass


def _read_soma_frame(frame, value_filter: str | None, uri: str, what: str) -> pd.DataFrame:
    try:
        table = frame.read(value_filter=value_filter).concat()
    except Exception as error:
        raise ValueError(f"{uri}: cannot apply {what} filter {value_filter!r} ({error})") from None
    result = table.to_pandas()
    for column in result.columns:  # Arrow dictionaries arrive as categoricals; keep plain values
        if isinstance(result[column].dtype, pd.CategoricalDtype):
            result[column] = result[column].astype(str)
    return result


def census_obs_filter(obs_filter: str | None, all_cells: bool = False) -> str | None:
    """The filter a Census read uses: the user's AND-ed with ``is_primary_data == True``, so a
    cell present in several datasets is read once; ``all_cells`` reads every copy."""
    user = (obs_filter or "").strip() or None
    if all_cells:
        return user
    return DEFAULT_CENSUS_OBS_FILTER if user is None else f"({DEFAULT_CENSUS_OBS_FILTER}) and ({user})"


CENSUS_DIRECTORY = "https://census.cellxgene.cziscience.com/cellxgene-census/v1/release.json"


class CensusUnreachable(ValueError):
    """The public Census cannot be reached (network, DNS, proxy)."""


def public_census(census_version: str, call):
    """``call()``, which reads the public Census release directory, with its errors in words: a
    release the directory does not have, or a Census that cannot be reached."""
    try:
        return call()
    except ValueError as error:  # the release directory has no such version
        raise ValueError(f"Census release {census_version!r} does not exist ({error})") from None
    except Exception as error:  # noqa: BLE001 - no network, DNS, proxy, S3 refused
        raise census_unreachable(census_version, error) from None


def census_unreachable(census_version: str, error: BaseException) -> CensusUnreachable:
    """One line for a public Census that cannot be reached: the URL, the reason, the way out."""
    reason = str(error).split("(Caused by")[0].strip().rstrip(":") or type(error).__name__
    return CensusUnreachable(
        f"cannot reach the Census to open release {census_version!r} ({CENSUS_DIRECTORY}; "
        f"{type(error).__name__}: {reason[:200]}); without network, use a local or mirrored copy "
        "with --census-uri PATH"
    )


def open_census_copy(census_uri: str):
    """The Census collection at ``census_uri`` (a local or mirrored copy), with a path that is
    missing, not TileDB-SOMA or not a Census said in words."""
    import cellxgene_census

    try:
        census = cellxgene_census.open_soma(uri=census_uri)
    except Exception as error:  # tiledbsoma's DoesNotExistError and kin: say what the path is instead
        what = (
            "does not exist"
            if not is_url(census_uri) and not Path(census_uri).exists()
            else "is not a Census (a TileDB-SOMA collection with census_data and census_info)"
        )
        raise ValueError(
            f"--census-uri {census_uri} {what}: give the folder or URL of a Census copy (the one "
            f"holding census_data/); {type(error).__name__}: {str(error)[:200]}"
        ) from None
    _check_census(census, census_uri)
    return census


def _check_census(census, name: str) -> None:
    if "census_data" not in census:
        census.close()
        raise ValueError(
            f"{name} is a SOMA collection but not a Census: it has no census_data (it holds {list(census.keys())[:5]})"
        )


def open_census(
    census_version: str | None = None,
    census_uri: str | None = None,
    organism: str = "homo_sapiens",
    obs_filter: str | None = DEFAULT_CENSUS_OBS_FILTER,
    var_filter: str | None = None,
    layer: str = "raw",
) -> SomaSource:
    """A Census experiment: the public release ``census_version`` or a local/mirrored ``census_uri``."""
    import cellxgene_census

    if (census_version is None) == (census_uri is None):
        raise ValueError("give exactly one of census_version (a public release, e.g. 'stable') or census_uri (a copy)")
    if census_uri:
        census = open_census_copy(census_uri)
    else:
        census = public_census(census_version, lambda: cellxgene_census.open_soma(census_version=census_version))
        _check_census(census, census_version)
    key = organism.strip().lower().replace(" ", "_")
    data = census["census_data"]
    if key not in data:
        census.close()
        raise ValueError(f"the Census has no organism {organism!r} (has {list(data.keys())})")
    summary = {}
    try:
        frame = census["census_info"]["summary"].read().concat().to_pandas()
        summary = dict(zip(frame["label"], frame["value"]))
    except Exception:
        pass
    provenance = {
        "kind": "census",
        "census_version": census_version,
        "census_uri": census_uri,
        "organism": key,
        "census_schema_version": summary.get("census_schema_version"),
        "census_build_date": summary.get("census_build_date"),
    }
    return SomaSource(
        uri=census_uri or f"census:{census_version}",
        experiment=data[key],
        measurement="RNA",
        layer=layer,
        obs_filter=obs_filter,
        var_filter=var_filter,
        provenance=provenance,
        owner=census,
    )


class ConcatSource(Source):
    """Several sources read as one atlas, one after another (``shard a.h5ad b.h5ad ...``).

    Genes: with ``genes`` (a target list) each source is aligned to it as ``embed`` aligns a
    source to a model (reordered, extra genes dropped, missing ones zero-filled, each source
    refused below ``min_overlap`` of the list); without, the genes every source measures, in the
    first source's order (no source gets zeros for a gene it never measured), each source refused
    when fewer than ``min_overlap`` of its own genes are in every source. obs: the union of the
    columns (a column a source lacks is missing there; numbers stay numbers), with ``source_file``
    naming each cell's source and ``source_row`` its row there; ``prefix_ids`` makes ids unique
    across sources as ``<source_file>:<id>``."""

    COLUMN = "source_file"

    def __init__(self, sources: list[Source], genes=None, min_overlap: float = 0.5, prefix_ids: bool = False) -> None:
        from .alignment import GeneAlignment

        if len(sources) < 2:
            raise ValueError("ConcatSource needs at least two sources")
        self.members, self.prefix_ids = list(sources), prefix_ids
        self.labels = _source_labels([member.uri for member in self.members])
        self.uri = " + ".join(member.uri for member in self.members)
        if genes is not None:
            target = pd.Index(np.asarray(genes, dtype=object).astype(str))
        else:
            target = pd.Index(self.members[0].feature_ids.astype(str))
            for member in self.members[1:]:
                target = target[target.isin(member.feature_ids.astype(str))]
            for member in self.members:
                share = len(target) / max(1, len(member.feature_ids))
                if share < min_overlap:
                    raise ValueError(
                        f"{member.uri}: only {len(target)} of its {len(member.feature_ids)} genes ({share:.1%}) are "
                        f"measured by every source, below the minimum overlap {min_overlap:.0%}; are the gene ids of "
                        "one kind (Ensembl ids, symbols) and of one organism? (or give --genes: each source is then "
                        "aligned to that list, missing genes zero-filled)"
                    )
        self.alignments = [
            GeneAlignment(member.feature_ids, target, min_overlap, source_name=member.uri) for member in self.members
        ]
        self.var = pd.DataFrame(index=pd.Index(target, name="feature_id", dtype=object))
        for member in self.members:
            if "feature_name" in member.var.columns:
                self.var["feature_name"] = member.var["feature_name"].reindex(target).to_numpy()
                break
        self.offsets = np.concatenate([[0], np.cumsum([member.n_obs for member in self.members])]).astype(np.int64)
        self._columns = self._unified_columns()

    def _unified_columns(self) -> dict[str, object]:
        """Each obs column's dtype over the sources: numbers where every source that has the column
        holds numbers (float where one lacks it, to hold the missing rows); text otherwise."""
        frames = [member.obs_rows(0, min(1, member.n_obs)) for member in self.members]
        for member, frame in zip(self.members, frames):
            if self.COLUMN in frame.columns:
                raise ValueError(
                    f"{member.uri}: obs already has a column {self.COLUMN!r}, which shard adds to name each "
                    "cell's source when several are given; rename it first"
                )
        columns: dict[str, object] = {}
        for name in dict.fromkeys(c for frame in frames for c in frame.columns):
            kinds = [frame[name].dtype for frame in frames if name in frame.columns]
            numeric = all(isinstance(k, np.dtype) and k.kind in "biuf" for k in kinds)
            if not numeric:
                columns[name] = object
            elif len(kinds) < len(frames):
                columns[name] = np.float64
            else:
                columns[name] = np.result_type(*kinds)
        columns["source_row"] = np.int64
        return columns

    @property
    def n_obs(self) -> int:
        return int(self.offsets[-1])

    def _spans(self, start: int, stop: int) -> Iterator[tuple[int, int, int]]:
        """(source m, first row, end row) within each source that rows ``[start, stop)`` cross."""
        for m, member in enumerate(self.members):
            lo, hi = max(start, int(self.offsets[m])), min(stop, int(self.offsets[m + 1]))
            if lo < hi:
                yield m, lo - int(self.offsets[m]), hi - int(self.offsets[m])

    def _obs(self, m: int, lo: int, hi: int) -> pd.DataFrame:
        obs = self.members[m].obs_rows(lo, hi)
        frame = pd.DataFrame(index=obs.index.astype(str))
        for name, dtype in self._columns.items():
            if name in obs.columns:
                values = obs[name].to_numpy()
                frame[name] = values.astype(object) if dtype is object else values.astype(dtype)
            else:
                frame[name] = np.full(len(obs), None if dtype is object else np.nan, dtype=dtype)
        frame[self.COLUMN] = np.full(len(obs), self.labels[m], dtype=object)
        if self.prefix_ids:
            frame.index = (self.labels[m] + ":" + frame.index).astype(object)
        return frame

    def read_obs(self) -> pd.DataFrame:
        return self.obs_rows(0, self.n_obs)

    def obs_rows(self, start: int, stop: int) -> pd.DataFrame:
        parts = [self._obs(m, lo, hi) for m, lo, hi in self._spans(start, stop)]
        if not parts:
            return self._obs(0, 0, 0)
        return pd.concat(parts) if len(parts) > 1 else parts[0]

    def _aligned(self, m: int, block: sp.csr_matrix, lo: int) -> sp.csr_matrix:
        """A block of source m checked there (an error names that file, cell and gene), then aligned."""
        member = self.members[m]
        values = member.check_counts(block, member.obs_names(lo, lo + block.shape[0]))
        return self.alignments[m].apply(sp.csr_matrix((values, block.indices, block.indptr), shape=block.shape))

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        parts = [self._aligned(m, self.members[m].rows(lo, hi), lo) for m, lo, hi in self._spans(start, stop)]
        if not parts:
            return sp.csr_matrix((0, len(self.var)), dtype=np.uint32)
        return parts[0] if len(parts) == 1 else sp.vstack(parts, format="csr")

    def iter_blocks(self, block_size: int = 16_384) -> Iterator[tuple[int, sp.csr_matrix]]:
        for m, member in enumerate(self.members):  # each source by its own (often faster) iteration
            for offset, block in member.iter_blocks(block_size):
                yield int(self.offsets[m]) + offset, self._aligned(m, block, offset)

    def content_stamp(self) -> dict | None:
        stamps = {label: member.content_stamp() for label, member in zip(self.labels, self.members)}
        return stamps if any(stamps.values()) else None

    def provenance(self) -> dict:
        return {
            "kind": "concat",
            "prefix_ids": self.prefix_ids,
            "sources": [
                {
                    **member.provenance(),
                    "label": label,
                    "n_obs": member.n_obs,
                    "n_genes": len(member.feature_ids),
                    "genes_missing_zero_filled": len(alignment.missing),
                }
                for label, member, alignment in zip(self.labels, self.members, self.alignments)
            ],
        }

    def duplicate_hint(self) -> str:
        return "ids repeat across the sources: pass --prefix-ids to name each cell <source_file>:<id>"

    def close(self) -> None:
        for member in self.members:
            member.close()


def _source_labels(uris: list[str]) -> list[str]:
    """Each source's name in the ``source_file`` column: its file name without the suffix, made
    unique by the folder above where two share a name."""

    def name(uri: str, depth: int) -> str:
        parts = [p for p in str(uri).rstrip("/").replace("\\", "/").split("/") if p]
        stem = parts[-1] if parts else str(uri)
        for suffix in (".h5ad", ".h5", ".zarr"):
            stem = stem.removesuffix(suffix)
        return "/".join([*parts[-1 - depth : -1], stem]) if depth else stem

    for depth in range(4):
        labels = [name(uri, depth) for uri in uris]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{label}#{i}" for i, label in enumerate(labels)]


def open_sources(
    sources: list[str], *, genes=None, min_overlap: float = 0.5, prefix_ids: bool = False, **source_args
) -> Source:
    """One source (``open_source``; ``genes`` and ``min_overlap`` are then the shard writer's to
    apply), or several read as one atlas (``ConcatSource``)."""
    if len(sources) == 1:
        if prefix_ids:
            raise ValueError("--prefix-ids goes with several sources")
        return open_source(sources[0], **source_args)
    opened: list[Source] = []
    try:
        for source in sources:
            opened.append(open_source(source, **source_args))
        return ConcatSource(opened, genes=genes, min_overlap=min_overlap, prefix_ids=prefix_ids)
    except BaseException:
        for source in opened:
            source.close()
        raise


COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zip")


def open_source(
    source: str,
    *,
    layer: str | None = None,
    obs_filter: str | None = None,
    var_filter: str | None = None,
    measurement: str = "RNA",
    census_version: str | None = None,
    census_uri: str | None = None,
    organism: str = "homo_sapiens",
    gene_column: str | None = None,
    all_cells: bool = False,
) -> Source:
    """A source from a path/URL (h5ad, AnnData-Zarr, SOMA Experiment) or the word ``census``.
    ``gene_column``: the var column holding gene ids in an AnnData source (default: the first of
    feature_id, gene_ids, gene_id, ensembl_id, else the index). For the Census a filter is AND-ed
    with ``is_primary_data == True`` (each cell once) unless ``all_cells``."""
    if source == "census":
        return open_census(
            census_version,
            census_uri,
            organism,
            obs_filter=census_obs_filter(obs_filter, all_cells),
            var_filter=var_filter,
            layer=layer or "raw",
        )
    if census_version or census_uri:
        raise ValueError("--census-version / --census-uri go with the source 'census'")
    text = str(source)
    compressed = next((suffix for suffix in COMPRESSED_SUFFIXES if text.endswith(suffix)), None)
    if compressed:
        raise ValueError(
            f"{text} is a compressed file ({compressed}): decompress it first (e.g. gunzip -k {text}); "
            "h5ad and Zarr compress their arrays inside and are read as they are"
        )
    if _is_shard_directory(text):
        return ShardSource(text)
    if text.endswith((".h5ad", ".h5")):
        return AnnDataSource(text, layer=layer, obs_filter=obs_filter, gene_column=gene_column)
    if _is_soma(text):
        return SomaSource(text, measurement=measurement, layer=layer, obs_filter=obs_filter, var_filter=var_filter)
    return AnnDataSource(text, layer=layer, obs_filter=obs_filter, gene_column=gene_column)


def _is_shard_directory(uri: str) -> bool:
    from ..storage import resolve
    from .shard_format import MANIFEST_NAME, filesystem

    fs, path = filesystem(resolve(uri))  # on object storage, the version published there
    return fs.exists(f"{path}/{MANIFEST_NAME}")


def _mtime(info: dict) -> float:
    """Modification time from an fsspec ``info`` (local: ``mtime``; object stores: ``LastModified``)."""
    value = info.get("mtime", info.get("LastModified", info.get("last_modified", 0.0)))
    return float(value.timestamp()) if hasattr(value, "timestamp") else float(value or 0.0)


def _is_soma(uri: str) -> bool:
    """TileDB groups carry ``__tiledb_group.tdb``; AnnData-Zarr stores carry zarr metadata."""
    if not is_url(uri):
        return (Path(uri) / "__tiledb_group.tdb").exists()
    from .shard_format import filesystem

    fs, path = filesystem(uri)
    return fs.exists(f"{path}/__tiledb_group.tdb")


class SyntheticSource(Source):
    """The synthetic atlas as a source: counts generated block by block, never all in memory."""

    def __init__(self, atlas) -> None:
        self.atlas, self.uri = atlas, f"synthetic(seed={atlas.spec.seed})"
        self.var = atlas.var()[["feature_name"]].rename_axis("feature_id")

    @property
    def n_obs(self) -> int:
        return self.atlas.spec.n_cells

    def read_obs(self) -> pd.DataFrame:
        return self.obs_rows(0, self.atlas.spec.n_cells)

    def obs_rows(self, start: int, stop: int) -> pd.DataFrame:
        obs = self.atlas.obs_rows(start, stop)
        obs["source_row"] = np.arange(start, start + len(obs), dtype=np.int64)
        return obs

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        return self.atlas.rows(start, stop)[0]

    def provenance(self) -> dict:
        return {"kind": "synthetic", **self.atlas.provenance()}


class ShardSource(Source):
    """A shard directory as a source (embedding shards, re-sharding), in global shard order."""

    def __init__(self, uri: str) -> None:
        from .loader import ShardedDataset

        self.uri, self.dataset = str(uri), ShardedDataset(str(uri))
        names = self.dataset.manifest.get("feature_names")
        self.var = pd.DataFrame(index=pd.Index(self.dataset.feature_ids, name="feature_id", dtype=object))
        if names:
            self.var["feature_name"] = names

    @property
    def n_obs(self) -> int:
        return self.dataset.n_obs

    def read_obs(self) -> pd.DataFrame:
        return pd.concat([self._shard_obs(k) for k in range(len(self.dataset.shard_paths))])

    def _spans(self, start: int, stop: int) -> Iterator[tuple[int, int, int]]:
        """(shard k, first row, end row) within each shard that rows ``[start, stop)`` cross."""
        offsets = self.dataset.shard_offsets
        first = int(np.searchsorted(offsets, start, side="right") - 1)
        for k in range(max(first, 0), len(self.dataset.shard_paths)):
            lo, hi = max(start, int(offsets[k])), min(stop, int(offsets[k + 1]))
            if lo >= hi:
                break
            yield k, lo - int(offsets[k]), hi - int(offsets[k])

    def obs_rows(self, start: int, stop: int) -> pd.DataFrame:
        parts = [self._shard_obs(k).iloc[lo:hi] for k, lo, hi in self._spans(start, stop)]
        if not parts:
            return self._shard_obs(0).iloc[0:0]
        return pd.concat(parts) if len(parts) > 1 else parts[0]

    def obs_names(self, start: int, stop: int) -> np.ndarray:
        """The ids alone, read from each shard's obs index array (not the whole obs frame)."""
        parts = []
        for k, lo, hi in self._spans(start, stop):
            obs = self.dataset.shard(k).group["obs"]
            names = np.asarray(obs[obs.attrs["_index"]][lo:hi])
            parts.append(np.char.decode(names) if names.dtype.kind == "S" else names.astype(object))
        return np.concatenate(parts).astype(object) if parts else np.zeros(0, dtype=object)

    def _shard_obs(self, k: int) -> pd.DataFrame:
        """obs of shard k (the last one read is kept: reads go shard by shard)."""
        from anndata.io import read_elem

        if getattr(self, "_obs_cache", (None,))[0] != k:
            self._obs_cache = (k, read_elem(self.dataset.shard(k).group["obs"]))
        return self._obs_cache[1]

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        parts = []
        for k, lo, hi in self._spans(start, stop):
            indptr, indices, data = self.dataset.shard(k).read(lo, hi)
            parts.append(
                sp.csr_matrix(
                    (data.astype(np.float32), indices.astype(np.int32), indptr), shape=(hi - lo, self.dataset.n_vars)
                )
            )
        if not parts:
            return sp.csr_matrix((0, self.dataset.n_vars), dtype=np.float32)
        return parts[0] if len(parts) == 1 else sp.vstack(parts, format="csr")

    def content_stamp(self) -> dict | None:
        """Size and modification time of manifest.json, written again whenever the shards are
        (``shard --overwrite``)."""
        from .shard_format import filesystem

        fs, path = filesystem(self.dataset.path)  # the published version on object storage
        info = fs.info(f"{path.rstrip('/')}/manifest.json")
        return {"manifest.json": [int(info.get("size") or 0), _mtime(info)]}

    def provenance(self) -> dict:
        return {
            "kind": "shards",
            "uri": self.uri,
            "feature_ids_hash": self.dataset.manifest.get("feature_ids_hash"),
            "source": self.dataset.manifest.get("provenance", {}).get("source"),
        }
