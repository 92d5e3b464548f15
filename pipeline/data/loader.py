"""``ShardedDataset``: stream pre-shuffled shards as sparse batches, split across ranks and workers.

One epoch is a *plan* every process computes alike from ``(manifest, seed, epoch)``:

- the shards are cut into **blocks** of ``block_rows`` contiguous rows (the unit of reading);
- the blocks are put in a random order and grouped into **windows** of ``window_blocks`` blocks
  (the shuffle buffer: one window is in memory at a time, plus one being prefetched);
- inside a window, rows are permuted in runs of ``segment_rows`` (1 = a full row shuffle);
- the concatenated windows form the epoch's *stream* of every cell exactly once.

Rank ``r`` of ``W`` takes the r-th contiguous slice of the stream (sizes differ by at most one
cell) and cuts it into the same number of batches as every other rank (all of ``batch_size``
except the last one or two). DataLoader workers split a rank's batches into contiguous runs;
torch interleaves them round-robin, which ``state_dict`` accounts for on resume.

Shards were globally shuffled when written, so batches are well mixed even though reads are
large and contiguous; the in-window permutation makes every epoch's batches different.
Counts stay sparse (a ``CSRBatch``) until the consumer calls ``.to_dense()`` on its device.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from .background import run_ahead
from ..storage import is_url, join, resolve
from .shard_format import CSRArrayReader, feature_hash, read_manifest


@dataclass
class CSRBatch:
    """A (cells, genes) count matrix in CSR form: ``indptr`` (cells + 1,) int64, ``indices``
    (nnz,) int16/int32 gene ids, ``data`` (nnz,) integer counts (uint16/uint32)."""

    indptr: torch.Tensor
    indices: torch.Tensor
    data: torch.Tensor
    n_vars: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.indptr.shape[0] - 1, self.n_vars)

    @classmethod
    def from_scipy(cls, matrix) -> CSRBatch:
        matrix = sp.csr_matrix(matrix)
        return cls(
            torch.from_numpy(matrix.indptr.astype(np.int64)),
            torch.from_numpy(matrix.indices.astype(np.int32)),
            torch.from_numpy(matrix.data.astype(np.float32, copy=False)),
            int(matrix.shape[1]),
        )

    def pin_memory(self) -> CSRBatch:
        return CSRBatch(self.indptr.pin_memory(), self.indices.pin_memory(), self.data.pin_memory(), self.n_vars)

    def to(self, device, non_blocking: bool = False) -> CSRBatch:
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return CSRBatch(move(self.indptr), move(self.indices), move(self.data), self.n_vars)

    def to_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense (cells, genes) counts on the batch's device: one scatter, no host round trip."""
        n_cells = self.shape[0]
        lengths = self.indptr[1:] - self.indptr[:-1]
        # output_size: the number of entries is known on the host, so the scatter needs no sync.
        rows = torch.repeat_interleave(
            torch.arange(n_cells, device=self.indptr.device), lengths, output_size=self.data.shape[0]
        )
        flat = rows * self.n_vars + self.indices.to(torch.int64)
        dense = torch.zeros(n_cells * self.n_vars, dtype=dtype, device=self.data.device)
        dense[flat] = self.data.to(dtype)
        return dense.view(n_cells, self.n_vars)


def densify(counts, device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A (cells, genes) counts batch as a dense ``dtype`` tensor on ``device``.

    Accepts a :class:`CSRBatch` or a scipy sparse matrix (for an accelerator moved sparse,
    non-blocking from pinned memory: a tenth of the bytes at 90% zeros, then scattered on the
    device with no host read; for the CPU densified by scipy), or a dense tensor.
    """
    device = torch.device(device)
    if isinstance(counts, sp.spmatrix | sp.sparray):
        if device.type == "cpu":  # scipy's own densify: ~10x the scatter's speed on a CPU
            return torch.from_numpy(sp.csr_matrix(counts).toarray()).to(dtype)
        counts = CSRBatch.from_scipy(counts)
    if isinstance(counts, CSRBatch):
        return counts.to(device, non_blocking=True).to_dense(dtype)
    return counts.to(device, dtype=dtype, non_blocking=True)


def check_batch_counts(counts) -> None:
    """Raise a ValueError naming the first bad entry (row, gene) unless a batch holds raw counts:
    finite, non-negative integers. On the CPU, in numpy, before the batch is copied to a device
    (a dense tensor already on an accelerator is left to the model's own check)."""
    if isinstance(counts, sp.spmatrix | sp.sparray):
        counts = sp.csr_matrix(counts)
        values, indptr, indices = counts.data, counts.indptr, counts.indices
    elif isinstance(counts, CSRBatch):
        if counts.data.device.type != "cpu":
            return
        values, indptr, indices = counts.data.numpy(), counts.indptr.numpy(), counts.indices.numpy()
    elif isinstance(counts, torch.Tensor) and counts.device.type == "cpu" and counts.layout == torch.strided:
        dense = counts.numpy().reshape(counts.shape[0], -1)
        values = dense.reshape(-1)
        indptr = np.arange(0, values.size + 1, max(dense.shape[1], 1))
        indices = np.tile(np.arange(dense.shape[1]), dense.shape[0])
    else:
        return
    if values.dtype.kind in "iu":
        bad = values < 0
    else:
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(values) | (values < 0) | (values != np.round(values))
    if not bad.any():
        return
    entry = int(np.flatnonzero(bad)[0])
    row, gene, value = int(np.searchsorted(indptr, entry, side="right") - 1), int(indices[entry]), float(values[entry])
    kind = (
        "NaN" if np.isnan(value) else "infinite" if np.isinf(value) else "negative" if value < 0 else "not an integer"
    )
    raise ValueError(
        f"counts[{row}, {gene}] = {value!r} is {kind}: the model needs raw non-negative integer counts (not "
        f"normalised or log-transformed values); {int(bad.sum())} bad entries in this batch"
    )


class ShardedDataset:
    """A shard directory written by ``hvae-pipeline shard`` (local path or fsspec URL)."""

    def __init__(self, path: str, subset: list[int] | None = None) -> None:
        """``subset``: shard numbers to use (e.g. held-out validation shards); default all.
        ``obs_index`` values then count rows within the subset, in subset order."""
        self.path = resolve(str(path))  # on object storage, the version published there
        self.manifest = read_manifest(self.path)
        shards = self.manifest["shards"]
        if not shards:
            raise ValueError(f"{self.path}/manifest.json lists no shards")
        n_listed = int(sum(int(s["n_obs"]) for s in shards))
        if n_listed != int(self.manifest["n_obs"]):
            raise ValueError(
                f"{self.path}/manifest.json: shards hold {n_listed} cells, n_obs says {self.manifest['n_obs']}"
            )
        if subset is not None:
            bad = [k for k in subset if not 0 <= k < len(shards)]
            if bad or not subset:
                raise ValueError(
                    f"{self.path}: shard subset {list(subset)} is empty or out of range (0..{len(shards) - 1})"
                )
            shards = [shards[k] for k in subset]
        self.shard_paths = [join(self.path, s["path"]) for s in shards]
        self.shard_sizes = np.array([int(s["n_obs"]) for s in shards], dtype=np.int64)
        if (self.shard_sizes <= 0).any():
            bad = shards[int(np.flatnonzero(self.shard_sizes <= 0)[0])]["path"]
            raise ValueError(f"{self.path}: shard {bad} is empty in manifest.json")
        self.shard_offsets = np.concatenate([[0], np.cumsum(self.shard_sizes)])
        self.n_obs, self.n_vars = int(self.shard_sizes.sum()), int(self.manifest["n_vars"])
        self.feature_ids = list(self.manifest["feature_ids"])
        if len(self.feature_ids) != self.n_vars:
            raise ValueError(f"{self.path}/manifest.json: {len(self.feature_ids)} feature_ids for n_vars {self.n_vars}")
        recorded = self.manifest.get("feature_ids_hash")
        if recorded is not None and feature_hash(self.feature_ids) != recorded:
            raise ValueError(
                f"{self.path}/manifest.json: the feature_ids do not match their feature_ids_hash "
                f"({feature_hash(self.feature_ids)} != {recorded}): the gene list was edited or damaged "
                "after sharding; reshard rather than train or embed genes in the wrong columns"
            )
        self._shards: OrderedDict[int, _ShardReader] = OrderedDict()
        if not is_url(self.path):  # on object stores a missing shard is reported when first opened
            for shard_path in self.shard_paths:
                if not os.path.exists(shard_path):
                    raise FileNotFoundError(f"{shard_path} is listed in {self.path}/manifest.json but is missing")

    def __len__(self) -> int:
        return self.n_obs

    def shard(self, index: int) -> _ShardReader:
        """Open shard readers, a bounded number at a time (their indptr arrays are cached)."""
        if index in self._shards:
            self._shards.move_to_end(index)
            return self._shards[index]
        reader = _ShardReader(self.shard_paths[index], int(self.shard_sizes[index]), self.n_vars)
        self._shards[index] = reader
        if len(self._shards) > 64:
            self._shards.popitem(last=False)
        return reader

    def categories(self, column: str) -> list[str]:
        meta = self.manifest["obs_columns"].get(column)
        if meta is None:
            raise KeyError(f"{self.path}: no obs column {column!r} (columns: {list(self.manifest['obs_columns'])})")
        if meta["dtype"] != "category":
            raise ValueError(f"{self.path}: obs column {column!r} is {meta['dtype']}, not categorical")
        return list(meta["categories"])

    def check_batch_key(self, column: str) -> None:
        """A batch key must label every cell: a missing value has no batch embedding."""
        self.categories(column)
        missing = self.manifest["obs_columns"][column].get("missing", 0)
        if missing:
            raise ValueError(
                f"{self.path}: obs column {column!r} is missing for {missing:,} cells; a batch key must "
                "label every cell (fill it, e.g. with 'unknown', and re-shard)"
            )

    def obs_column(self, column: str) -> np.ndarray:
        """One obs column for every cell, in global (shard) order."""
        if column not in self.manifest["obs_columns"]:
            raise KeyError(f"{self.path}: no obs column {column!r} (columns: {list(self.manifest['obs_columns'])})")
        return np.concatenate([np.asarray(self.shard(k).obs_column(column)) for k in range(len(self.shard_paths))])

    def verify(self) -> None:
        """Open every shard and check it against the manifest (rows, genes, obs length)."""
        for k in range(len(self.shard_paths)):
            self.shard(k).verify()

    def loader(
        self,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        epoch: int = 0,
        num_workers: int = 0,
        prefetch: int = 2,
        batch_key: str | None = None,
        block_rows: int = 2048,
        window_blocks: int = 8,
        segment_rows: int = 16,
        pin_memory: bool | None = None,
    ) -> ShardLoader:
        """Batches for one rank; see ``ShardLoader``."""
        return ShardLoader(
            self,
            batch_size,
            rank,
            world_size,
            seed,
            epoch,
            num_workers,
            prefetch,
            batch_key,
            block_rows,
            window_blocks,
            segment_rows,
            pin_memory,
        )


class _ShardReader:
    def __init__(self, path: str, n_obs: int, n_vars: int) -> None:
        import zarr

        self.path, self.n_obs, self.n_vars = path, n_obs, n_vars
        try:
            group = zarr.open_group(path, mode="r")
            shape = tuple(group["X"].attrs["shape"])
        except Exception as error:
            raise ValueError(f"{path}: empty or unreadable shard, no CSR X ({error})") from None
        if shape != (n_obs, n_vars):
            raise ValueError(f"{path}: X is {shape[0]} x {shape[1]} but manifest.json says {n_obs} x {n_vars}")
        self.group = group
        self.data = CSRArrayReader(join(path, "X", "data"))
        self.indices = CSRArrayReader(join(path, "X", "indices"))
        self.indptr = CSRArrayReader(join(path, "X", "indptr")).read(0, n_obs + 1).astype(np.int64)
        if self.indptr[-1] != self.data.length:
            raise ValueError(f"{path}: X/indptr ends at {self.indptr[-1]} but X/data has {self.data.length} entries")
        self._obs: dict[str, np.ndarray] = {}

    def obs_column(self, column: str) -> np.ndarray:
        if column not in self._obs:
            from anndata.io import read_elem

            values = read_elem(self.group["obs"][column])
            if len(values) != self.n_obs:
                raise ValueError(f"{self.path}: obs column {column!r} has {len(values)} rows, X has {self.n_obs}")
            self._obs[column] = values
        return self._obs[column]

    def codes(self, column: str) -> np.ndarray:
        values = self.obs_column(column)
        if not hasattr(values, "codes"):
            raise ValueError(f"{self.path}: obs column {column!r} is not categorical; it cannot be a batch key")
        return np.asarray(values.codes, dtype=np.int64)

    def verify(self) -> None:
        if len(self.indptr) != self.n_obs + 1 or np.any(np.diff(self.indptr) < 0):
            raise ValueError(f"{self.path}: X/indptr is not a valid CSR pointer for {self.n_obs} rows")

    def element_range(self, start: int, stop: int) -> tuple[int, int]:
        return int(self.indptr[start]), int(self.indptr[stop])

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows [start, stop): (indptr rebased to 0, indices, data)."""
        lo, hi = self.element_range(start, stop)
        return self.indptr[start : stop + 1] - lo, self.indices.read(lo, hi), self.data.read(lo, hi)


class EpochPlan:
    """Blocks, windows and per-window row order of one epoch (identical on every rank)."""

    def __init__(
        self, shard_sizes: np.ndarray, block_rows: int, window_blocks: int, segment_rows: int, seed: int, epoch: int
    ) -> None:
        blocks = [
            (k, start, min(start + block_rows, int(size)))
            for k, size in enumerate(shard_sizes)
            for start in range(0, int(size), block_rows)
        ]
        order = np.random.default_rng([seed, epoch, 7]).permutation(len(blocks))
        self.blocks = [blocks[i] for i in order]
        self.windows = [self.blocks[i : i + window_blocks] for i in range(0, len(self.blocks), window_blocks)]
        sizes = [sum(stop - start for _, start, stop in window) for window in self.windows]
        self.window_offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.segment_rows, self.seed, self.epoch = segment_rows, seed, epoch

    def row_order(self, window: int) -> np.ndarray:
        """Window-local row order: runs of ``segment_rows`` rows in a random order."""
        n = int(self.window_offsets[window + 1] - self.window_offsets[window])
        n_segments = -(-n // self.segment_rows)
        segments = np.random.default_rng([self.seed, self.epoch, 11, window]).permutation(n_segments)
        starts = segments * self.segment_rows
        lengths = np.minimum(starts + self.segment_rows, n) - starts
        return np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths) + np.arange(n)


def rank_batch_sizes(n_obs: int, batch_size: int, world_size: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Stream offset of each rank's slice and each rank's batch sizes (same count on every rank)."""
    if n_obs < world_size:
        raise ValueError(f"{n_obs} cells cannot be split over {world_size} ranks")
    cells = np.array([n_obs // world_size + (r < n_obs % world_size) for r in range(world_size)], dtype=np.int64)
    n_batches = -(-int(cells.max()) // batch_size)
    sizes = []
    for n in cells:
        rank_sizes = np.full(n_batches, batch_size, dtype=np.int64)
        rank_sizes[-1] = n - (n_batches - 1) * batch_size
        if rank_sizes[-1] == 0:  # one cell short of the others: split the last full batch in two
            rank_sizes[-2:] = [batch_size - batch_size // 2, batch_size // 2]
        sizes.append(rank_sizes)
    return np.concatenate([[0], np.cumsum(cells)]), sizes


class ShardLoader:
    """Iterable of batch dicts for one rank: ``counts`` (CSRBatch), ``obs_index`` (int64, global
    row ids in shard order) and ``batch_index`` (int64 codes of ``batch_key``, or absent).

    ``len()`` is the number of batches, equal on every rank. ``state_dict()`` after k batches and
    ``load_state_dict`` on a fresh loader resume with batch k+1. ``set_epoch(e)`` draws epoch e's
    plan; iterating a finished loader again without it repeats the same epoch.
    """

    def __init__(
        self,
        dataset: ShardedDataset,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        epoch: int,
        num_workers: int,
        prefetch: int,
        batch_key: str | None,
        block_rows: int,
        window_blocks: int,
        segment_rows: int,
        pin_memory: bool | None,
    ) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}")
        if min(block_rows, window_blocks, segment_rows) < 1 or num_workers < 0:
            raise ValueError("block_rows, window_blocks and segment_rows must be >= 1, num_workers >= 0")
        if batch_key is not None:
            dataset.check_batch_key(batch_key)  # a clear error now rather than in a worker
        self.dataset, self.batch_size, self.rank, self.world_size = dataset, batch_size, rank, world_size
        self.seed, self.epoch, self.num_workers, self.prefetch = seed, epoch, num_workers, max(1, prefetch)
        self.batch_key, self.block_rows, self.window_blocks, self.segment_rows = (
            batch_key,
            block_rows,
            window_blocks,
            segment_rows,
        )
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        offsets, sizes = rank_batch_sizes(dataset.n_obs, batch_size, world_size)
        self._rank_start, self._sizes = int(offsets[rank]), sizes[rank]
        self._yielded = 0

    def __len__(self) -> int:
        return len(self._sizes)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._yielded = epoch, 0

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "batches_yielded": self._yielded,
            "rank": self.rank,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "batch_size", "world_size", "num_workers"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume: loader state has {key}={state[key]}, this loader {getattr(self, key)}"
                )
        self.epoch, self._yielded = state["epoch"], int(state["batches_yielded"])

    def worker_batches(self, worker: int, num_workers: int) -> tuple[int, int]:
        """Contiguous run [first, stop) of this rank's batches that worker ``worker`` produces."""
        counts = [len(self._sizes) // num_workers + (w < len(self._sizes) % num_workers) for w in range(num_workers)]
        first = sum(counts[:worker])
        return first, first + counts[worker]

    def __iter__(self):
        if self._yielded >= len(self):  # a finished pass: iterating again repeats the epoch
            self._yielded = 0
        skip = self._yielded
        if self.num_workers == 0:
            pin = (lambda batch: {k: v.pin_memory() for k, v in batch.items()}) if self.pin_memory else None
            source = run_ahead(_WorkerStream(self, 0, 1, skip), self.prefetch, pin, name="shard-prefetch")
        else:
            source = iter(
                torch.utils.data.DataLoader(
                    _WorkerIterable(self, skip),
                    batch_size=None,
                    num_workers=self.num_workers,
                    prefetch_factor=self.prefetch,
                    pin_memory=self.pin_memory,
                    persistent_workers=False,
                )
            )
        try:
            for batch in source:
                self._yielded += 1
                yield batch
        finally:  # a consumer that stops early ends the prefetch thread (or worker processes) now
            close = getattr(source, "close", None) or getattr(source, "_shutdown_workers", None)
            if close is not None:
                close()


class _WorkerIterable(torch.utils.data.IterableDataset):
    def __init__(self, loader: ShardLoader, skip: int) -> None:
        self.loader, self.skip = loader, skip

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        self.loader.dataset._shards.clear()  # fresh readers (and file handles) in each worker
        # torch polls workers round-robin from worker 0; after `skip` batches the next batch
        # belongs to logical worker skip % n, so the physical workers are rotated to match.
        logical = (worker + self.skip) % n_workers
        return iter(_WorkerStream(self.loader, logical, n_workers, self.skip))


class _WorkerStream:
    """Assembles one worker's batches window by window."""

    def __init__(self, loader: ShardLoader, worker: int, n_workers: int, skip_total: int) -> None:
        self.loader, self.dataset = loader, loader.dataset
        first, stop = loader.worker_batches(worker, n_workers)
        # Round-robin interleaving: of the first `skip_total` batches, this many were ours.
        first += len(range(worker, skip_total, n_workers))
        ends = np.concatenate([[0], np.cumsum(loader._sizes)])
        self.batch_ranges = [
            (loader._rank_start + int(ends[b]), loader._rank_start + int(ends[b + 1])) for b in range(first, stop)
        ]

    def __iter__(self):
        if not self.batch_ranges:
            return
        loader = self.loader
        plan = EpochPlan(
            self.dataset.shard_sizes,
            loader.block_rows,
            loader.window_blocks,
            loader.segment_rows,
            loader.seed,
            loader.epoch,
        )
        first = int(np.searchsorted(plan.window_offsets, self.batch_ranges[0][0], side="right") - 1)
        last = int(np.searchsorted(plan.window_offsets, self.batch_ranges[-1][1], side="left") - 1)
        window_ids = iter(range(first, last + 1))
        window, upcoming = None, None
        for start, stop in self.batch_ranges:
            pieces = []
            while start < stop:
                if window is None or start >= window.stream_stop:
                    # The next window's reads are queued before this one is used (read-ahead).
                    window = (
                        upcoming.wait()
                        if upcoming is not None
                        else _Window(self.dataset, plan, next(window_ids), loader.batch_key).wait()
                    )
                    following = next(window_ids, None)
                    upcoming = None if following is None else _Window(self.dataset, plan, following, loader.batch_key)
                    if window.stream_stop <= start:
                        continue
                take = min(stop, window.stream_stop) - start
                pieces.append(window.gather(start - window.stream_start, take))
                start += take
            yield _combine(pieces, self.dataset.n_vars)


class _Window:
    """One window of blocks in memory: concatenated CSR, global ids, batch codes and row order."""

    def __init__(self, dataset: ShardedDataset, plan: EpochPlan, index: int, batch_key: str | None) -> None:
        self.stream_start, self.stream_stop = int(plan.window_offsets[index]), int(plan.window_offsets[index + 1])
        blocks = plan.windows[index]
        readers = [dataset.shard(shard) for shard, _, _ in blocks]
        ranges = [reader.element_range(start, stop) for reader, (_, start, stop) in zip(readers, blocks)]
        element_offsets = np.concatenate([[0], np.cumsum([hi - lo for lo, hi in ranges])]).astype(np.int64)
        nnz = int(element_offsets[-1])
        # Decode every block straight into one window buffer; all chunks are queued before waiting.
        self.indices = np.empty(nnz, dtype=readers[0].indices.dtype)
        self.data = np.empty(nnz, dtype=readers[0].data.dtype)
        futures = []
        for reader, (lo, hi), at in zip(readers, ranges, element_offsets):
            futures += reader.indices.submit(lo, hi, self.indices[at : at + hi - lo])
            futures += reader.data.submit(lo, hi, self.data[at : at + hi - lo])
        indptrs, ids, codes = [], [], []
        for reader, (shard, start, stop), at in zip(readers, blocks, element_offsets):
            indptrs.append(reader.indptr[start:stop] - reader.indptr[start] + at)
            ids.append(np.arange(start, stop, dtype=np.int64) + dataset.shard_offsets[shard])
            if batch_key is not None:
                codes.append(reader.codes(batch_key)[start:stop])
        self.indptr = np.concatenate([*indptrs, [nnz]]).astype(np.int64)
        self.obs_index = np.concatenate(ids)
        self.codes = np.concatenate(codes) if codes else None
        self._futures = futures
        self.order = plan.row_order(index)

    def wait(self) -> _Window:
        """Block until every read of this window has landed; returns the window."""
        for future in self._futures:
            future.result()
        self._futures = []
        return self

    def gather(self, offset: int, n: int) -> dict:
        rows = self.order[offset : offset + n]
        # Runs of consecutive rows are copied as one slice each.
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        run_starts = rows[np.concatenate([[0], breaks])]
        run_stops = rows[np.concatenate([breaks - 1, [len(rows) - 1]])] + 1
        lo, hi = self.indptr[run_starts], self.indptr[run_stops]
        lengths = self.indptr[rows + 1] - self.indptr[rows]
        return {
            "lengths": lengths,
            "indices": np.concatenate([self.indices[a:b] for a, b in zip(lo, hi)]),
            "data": np.concatenate([self.data[a:b] for a, b in zip(lo, hi)]),
            "obs_index": self.obs_index[rows],
            "codes": None if self.codes is None else self.codes[rows],
        }


def _combine(pieces: list[dict], n_vars: int) -> dict:
    one = (
        pieces[0]
        if len(pieces) == 1
        else {key: (None if pieces[0][key] is None else np.concatenate([p[key] for p in pieces])) for key in pieces[0]}
    )
    indptr = np.zeros(len(one["lengths"]) + 1, dtype=np.int64)
    np.cumsum(one["lengths"], out=indptr[1:])
    batch = {
        "counts": CSRBatch(
            torch.from_numpy(indptr), torch.from_numpy(one["indices"]), torch.from_numpy(one["data"]), n_vars
        ),
        "obs_index": torch.from_numpy(one["obs_index"]),
    }
    if one["codes"] is not None:
        batch["batch_index"] = torch.from_numpy(one["codes"])
    return batch
