"""A nearest-neighbour index of every level of an embeddings store, built out of core.

Each level gets a faiss IVF-Flat index (chosen by measurement, benchmarks/RESULTS.md: against HNSW in faiss
and usearch it built 3-4x faster, answered as fast at recall@10 >= 0.99 and took half the memory).
One coarse quantiser is trained per level on a sample of the store; the cells are added a block
at a time into *shards* of at most ``shard_cells`` cells that share it, each written to disk as it
fills, so building holds one shard in memory and a query maps the shards from disk. Searching
every shard with the same ``nprobe`` scans exactly the lists one index of all cells would.

While the cells stream past, the exact neighbours of a random sample of atlas cells are kept
(brute force, block by block). From them the build chooses each level's ``nprobe`` (the smallest
that reaches ``target_recall`` recall@10 on the sample, recorded with the recall it reached) and
records the atlas's own distances to its k nearest cells: a query cell farther from the atlas than
almost every atlas cell is from its neighbours is flagged as unlike anything in the atlas.

The index is a directory (default: beside the store, ``<store>.index``) with ``index.json``, the
manifest, written last: it names the store (model id, export kind, cells, completion time and a
checksum of its obs ids), and a query refuses an index whose store has changed since.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .. import storage
from ..lease import Lease

FORMAT = "hvae-pipeline index"
FORMAT_VERSION = 1
MANIFEST = "index.json"


class IndexMismatch(ValueError):
    """An index that does not belong to the store or the model it is used with."""


@dataclass(frozen=True)
class IndexSettings:
    shard_cells: int = 2_000_000  # cells per index shard: what building holds in memory per level
    block_rows: int = 131_072  # rows read from the store at a time
    target_recall: float = 0.97  # recall@10 that each level's nprobe must reach on the sample
    sample_cells: int = 2_000  # atlas cells whose exact neighbours choose nprobe and the distances
    k: int = 15  # neighbours behind the recorded distances (the query's default k)
    threads: int | None = None  # faiss threads (default: faiss's own choice)
    overwrite: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("shard_cells", "block_rows", "sample_cells", "k"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"IndexSettings.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not 0 < self.target_recall <= 1:
            raise ValueError(f"IndexSettings.target_recall must be in (0, 1], got {self.target_recall!r}")


def default_index_path(store: str) -> str:
    return str(store).rstrip("/") + ".index"


def store_identity(store: str, block_rows: int = 1_000_000) -> dict:
    """What names a store's content: model, export kind, cells, completion time, obs-id checksum."""
    from ..embed.store import open_store

    group = open_store(store)
    attrs = dict(group.attrs)
    if not attrs.get("complete"):
        raise ValueError(
            f"{store} is not a complete embeddings store (written by `hvae-pipeline embed`, finished); "
            "finish the embedding first"
        )
    ids = group["obs_id"]
    digest = hashlib.sha256()
    for lo in range(0, ids.shape[0], block_rows):
        digest.update("\0".join(read_ids(ids, lo, lo + block_rows)).encode() + b"\0")
    return {
        "store": _absolute(store),
        "model_id": attrs.get("model_id"),
        "export": attrs.get("export", "code"),
        "n_obs": int(ids.shape[0]),
        "completed": attrs.get("completed"),
        "level_dims": list(attrs["level_dims"]),
        "obs_ids_sha256": digest.hexdigest()[:24],
    }


def read_ids(array, start: int, stop: int) -> list[str]:
    """The store's obs ids ``[start, stop)`` as Python strings (the array holds numpy StringDType)."""
    return [str(v) for v in np.asarray(array[start:stop]).astype(object)]


def _absolute(path: str) -> str:
    return str(path) if storage.is_url(path) else str(Path(path).resolve())


def read_manifest(index: str) -> dict:
    """The manifest of a complete index (named errors for a path that is none); on object
    storage, of the version published there."""
    path = storage.join(storage.resolve(index), MANIFEST)
    if not storage.exists(path):
        raise FileNotFoundError(
            f"{index} is not an index built by `hvae-pipeline index` (no {MANIFEST}; an "
            "interrupted build leaves none: build it again)"
        )
    try:
        manifest = json.loads(storage.read_text(path))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not an hvae-pipeline index manifest")
    return manifest


def check_index(manifest: dict, store: str | None = None) -> dict:
    """The store's identity, refusing an index that was built from another or an older store."""
    store = store or manifest["store"]["store"]
    now = store_identity(store)
    built = manifest["store"]
    for key, what in (
        ("model_id", "model"),
        ("export", "export kind"),
        ("n_obs", "number of cells"),
        ("completed", "completion time"),
        ("obs_ids_sha256", "obs ids"),
    ):
        if now.get(key) != built.get(key):
            raise IndexMismatch(
                f"the index was built from another store or an earlier version of {store}: its "
                f"{what} was {built.get(key)!r}, the store's is now {now.get(key)!r}. Rebuild it "
                f"(`hvae-pipeline index --embeddings {store} --overwrite`)"
            )
    return now


def build_index(store: str, out: str | None = None, settings: IndexSettings | None = None, echo=print) -> dict:
    """Build (or find already built) the index of every level of ``store``; returns the manifest."""
    settings = settings or IndexSettings()
    out = out or default_index_path(store)
    with Lease(out, "index build", echo=echo):  # one writer per index
        return _build_index(store, out, settings, echo)


def _build_index(store: str, out: str, settings: IndexSettings, echo) -> dict:
    import faiss
    from ..embed.store import open_store

    started = time.perf_counter()
    identity = store_identity(store)
    wanted = {k: v for k, v in asdict(settings).items() if k not in ("overwrite", "threads")}
    current = storage.resolve(out)  # on object storage, the version published there
    if [n for n in storage.listdir(current) if n not in (storage.POINTER, storage.VERSIONS)]:
        if not storage.exists(storage.join(current, MANIFEST)):
            raise FileExistsError(
                f"{out} exists and is not an index built by hvae-pipeline (no {MANIFEST}); choose "
                "another --out (nothing was changed)"
            )
        old = read_manifest(out)
        if old["store"] == identity and old.get("settings") == wanted:
            echo(f"{out} is already the index of this store; nothing to do")
            return old
        if not settings.overwrite:
            raise FileExistsError(
                f"{out} holds an index of another store or with other settings (built "
                f"{old.get('built')} from {old['store'].get('store')}); pass --overwrite to replace it"
            )
    if settings.threads:
        faiss.omp_set_num_threads(settings.threads)
    group = open_store(store)
    n_obs = identity["n_obs"]
    if n_obs < 2:
        raise ValueError(f"{store} holds {n_obs} cell(s): an index needs at least 2")
    rng = np.random.default_rng(settings.seed)
    sample = np.sort(rng.choice(n_obs, min(settings.sample_cells, n_obs), replace=False))
    local = Path(tempfile.mkdtemp(prefix=".index-partial-", dir=None if storage.is_remote(out) else _parent(out)))
    try:
        levels = []
        for level, dim in enumerate(identity["level_dims"]):
            levels.append(_build_level(group[f"level_{level}/mean"], level, dim, sample, local, settings, rng, echo))
        seconds = time.perf_counter() - started
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "store": identity,
            "settings": wanted,
            "library": f"faiss-cpu {faiss.__version__}",
            "kind": "IVF-Flat, L2",
            "built": datetime.now(timezone.utc).isoformat(),
            "seconds": round(seconds, 1),
            "cells_per_s": round(n_obs * len(levels) / max(seconds, 1e-9)),
            "levels": levels,
        }
        (local / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _publish(local, out)
    finally:
        shutil.rmtree(local, ignore_errors=True)
    return manifest


def _parent(out: str) -> str:
    parent = Path(out).resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    return str(parent)


def _publish(local: Path, out: str) -> None:
    """The finished index in place of whatever index was at ``out``: locally a rename; on object
    storage uploaded as a new version (the manifest last) and published in one write, so readers
    see the old index or the new one, never a copy cut short."""
    if storage.is_remote(out):
        version = storage.staging_path(out)
        storage.remove_tree(version)  # an unpublished upload a killed run left
        storage.upload(local, version, last=MANIFEST)
        storage.publish(version, out, legacy=lambda name: name == MANIFEST or name.startswith("level_"))
        return
    storage.recover_replace(out)
    storage.replace_tree(local, out)  # built beside it: a rename; the old index goes only now


def _build_level(
    array, level: int, dim: int, sample: np.ndarray, local: Path, settings: IndexSettings, rng, echo
) -> dict:
    import faiss

    n_obs = array.shape[0]
    started = time.perf_counter()
    nlist = int(max(1, min(4 * np.sqrt(n_obs), n_obs // 39)))
    train = _training_rows(array, min(n_obs, max(64 * nlist, 10_000)), rng)
    quantizer = faiss.IndexFlatL2(dim)
    empty = faiss.IndexIVFFlat(quantizer, dim, nlist)
    empty.train(train)
    queries = np.ascontiguousarray(array.get_orthogonal_selection((sample, slice(None))), dtype=np.float32)
    k_exact = min(settings.k + 1, n_obs)
    best_d = np.full((len(sample), k_exact), np.inf, np.float32)
    best_i = np.full((len(sample), k_exact), -1, np.int64)
    shards, shard, shard_start = [], None, 0
    (local / f"level_{level}").mkdir(parents=True, exist_ok=True)
    for lo in range(0, n_obs, settings.block_rows):
        block = np.ascontiguousarray(array[lo : lo + settings.block_rows], dtype=np.float32)
        if not np.isfinite(block).all():
            row = lo + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
            raise ValueError(f"level {level} of the store has a non-finite value at row {row}")
        d, i = faiss.knn(queries, block, min(k_exact, len(block)))
        best_d, best_i = _merge(best_d, best_i, d, i + lo, k_exact)
        pos = 0
        while pos < len(block):  # a block may cross a shard boundary
            if shard is None:
                shard, shard_start = faiss.clone_index(empty), lo + pos
            take = min(settings.shard_cells - shard.ntotal, len(block) - pos)
            shard.add(block[pos : pos + take])
            pos += take
            if shard.ntotal == settings.shard_cells:
                shards.append(_write_shard(shard, shard_start, local, level, len(shards)))
                shard = None
    if shard is not None and shard.ntotal:
        shards.append(_write_shard(shard, shard_start, local, level, len(shards)))
    nprobe, recall, table = _choose_nprobe(local, shards, queries, best_i, sample, nlist, settings)
    neighbours = np.sqrt(np.maximum(best_d[:, 1:], 0))  # the sample's own cell (distance 0) left out
    mean_distance = neighbours[:, : settings.k].mean(axis=1)
    quantiles = {str(q): float(np.quantile(mean_distance, q)) for q in (0.5, 0.9, 0.95, 0.99, 0.999)}
    seconds = time.perf_counter() - started
    echo(
        f"level {level}: {n_obs:,} cells x {dim} in {len(shards)} shard(s), {nlist} lists, nprobe {nprobe} "
        f"(recall@10 {recall:.3f} on {len(sample):,} atlas cells), {n_obs / max(seconds, 1e-9):,.0f} cells/s"
    )
    return {
        "level": level,
        "dim": dim,
        "nlist": nlist,
        "nprobe": nprobe,
        "recall_at_10": round(recall, 4),
        "recall_by_nprobe": table,
        "shards": shards,
        "mean_knn_distance_quantiles": quantiles,
        "seconds": round(seconds, 1),
    }


def _training_rows(array, n: int, rng) -> np.ndarray:
    """About ``n`` rows for the quantiser, read as a few hundred runs of consecutive rows spread
    over the store (random rows would read every chunk)."""
    n_obs = array.shape[0]
    if n >= n_obs:
        return np.ascontiguousarray(array[:], dtype=np.float32)
    runs = min(256, n)
    length = -(-n // runs)
    starts = np.sort(rng.choice(max(1, n_obs - length), runs, replace=False))
    return np.ascontiguousarray(np.concatenate([array[s : s + length] for s in starts]), dtype=np.float32)


def _merge(best_d, best_i, d, i, k):
    d_all = np.concatenate([best_d, d], axis=1)
    i_all = np.concatenate([best_i, i], axis=1)
    order = np.argsort(d_all, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d_all, order, axis=1), np.take_along_axis(i_all, order, axis=1)


def _write_shard(shard, start: int, local: Path, level: int, number: int) -> dict:
    import faiss

    name = f"level_{level}/shard_{number:04d}.faiss"
    faiss.write_index(shard, str(local / name))
    return {"file": name, "start": int(start), "stop": int(start + shard.ntotal)}


def _choose_nprobe(local: Path, shards, queries, exact, sample, nlist: int, settings: IndexSettings):
    """The smallest nprobe whose recall@10 on the sample (each cell's own row left out) reaches
    the target; (nprobe, its recall, {nprobe: recall} tried)."""
    loaded = [(s, _open_shard(local / s["file"])) for s in shards]
    table, nprobe, recall = {}, 1, 0.0
    truth = [set(row[1:11][row[1:11] >= 0].tolist()) - {cell} for row, cell in zip(exact, sample)]
    while True:
        _, found = search_shards(loaded, queries, 12, nprobe)
        hits = [len(t & (set(f.tolist()) - {cell})) / max(1, len(t)) for t, f, cell in zip(truth, found, sample)]
        recall = float(np.mean(hits))
        table[str(nprobe)] = round(recall, 4)
        if recall >= settings.target_recall or nprobe >= nlist:
            return nprobe, recall, table
        nprobe = min(nlist, nprobe * 2)


def _open_shard(path: Path):
    import faiss

    return faiss.read_index(str(path), faiss.IO_FLAG_MMAP)


def search_shards(loaded, queries: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
    """(squared distances, store rows) of the k nearest cells over every shard, nearest first."""
    best_d = np.full((len(queries), k), np.inf, np.float32)
    best_i = np.full((len(queries), k), -1, np.int64)
    for shard, index in loaded:
        index.nprobe = nprobe
        d, i = index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, index.ntotal))
        i = np.where(i >= 0, i + shard["start"], -1)
        d = np.where(i >= 0, d, np.inf).astype(np.float32)
        best_d, best_i = _merge(best_d, best_i, d, i, k)
    return best_d, best_i


class AtlasIndex:
    """An index opened for queries: ``search(level, vectors, k)`` -> (distances, store rows)."""

    def __init__(self, index: str, check: bool = True) -> None:
        self.path = index
        self.manifest = read_manifest(index)
        self.local = storage.cached_copy(storage.resolve(index)) if storage.is_remote(index) else Path(index)
        self.store = self.manifest["store"]["store"]
        if check:
            check_index(self.manifest)
        self._open: dict[int, list] = {}

    @property
    def n_levels(self) -> int:
        return len(self.manifest["levels"])

    def level(self, level: int) -> dict:
        if not isinstance(level, (int, np.integer)) or not 0 <= level < self.n_levels:
            raise ValueError(f"level {level!r} does not exist: the index has levels 0..{self.n_levels - 1}")
        return self.manifest["levels"][level]

    def search(self, level: int, vectors: np.ndarray, k: int = 15, nprobe: int | None = None):
        """(Euclidean distances, store rows), (cells, k) each, nearest first."""
        meta = self.level(level)
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != meta["dim"]:
            raise ValueError(f"level {level} vectors must have {meta['dim']} columns, got shape {vectors.shape}")
        if level not in self._open:
            self._open[level] = [(s, _open_shard(self.local / s["file"])) for s in meta["shards"]]
        d, i = search_shards(self._open[level], vectors, k, nprobe or meta["nprobe"])
        return np.sqrt(np.maximum(d, 0)), i


__all__ = [
    "AtlasIndex",
    "IndexMismatch",
    "IndexSettings",
    "build_index",
    "check_index",
    "default_index_path",
    "read_manifest",
    "store_identity",
]
