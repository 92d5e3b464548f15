"""``shard``: a source -> globally pre-shuffled AnnData-Zarr shards + manifest.json, out of core.

An external shuffle in two passes, so memory is bounded by one source block plus one shard,
whatever the number of cells:

1. a random permutation assigns every selected cell a destination (shard, position);
2. pass 1 streams the source's counts and obs block by block (validated, aligned to the gene
   list) and appends each row to its shard's spill files (raw binary, sequential appends): the
   counts, and the obs row (name as bytes, label columns as codes into category lists grown as
   values appear, numbers as they are); each name's 64-bit hash goes to a bucket file;
3. repeated obs names are looked for bucket by bucket (about a million cells each);
4. pass 2 loads one shard's spill files at a time, puts its rows in destination order and
   writes the shard (X as CSR with compact dtypes, obs with one sorted category list per label
   column, var, provenance), then deletes the spill.

The only per-cell state in memory is the permutation (4 bytes a cell); 10M cells shard with
1.15x the peak memory of 1M (benchmarks/atlas_scale.py). The manifest records a count checksum
of what was read (``count_checksum``: sum of counts and a hash-weighted sum keyed by source row
and gene). The
manifest is written last and atomically: a directory without one is an unfinished run, which
the next run clears and redoes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .alignment import GeneAlignment
from .. import faults
from ..lease import Lease
from ..progress import Progress
from .background import run_ahead
from .frames import portable_frame
from ..storage import (
    POINTER,
    PROBE,
    VERSIONS,
    check_writable,
    exists,
    is_remote,
    is_url,
    join,
    listdir,
    publish,
    recover_replace,
    remove_tree,
    replace_tree,
    resolve,
    staging_path,
)
from .shard_format import (
    COMPRESSIONS,
    FORMAT_VERSION,
    MANIFEST_NAME,
    add_checksums,
    count_checksum,
    count_dtype,
    feature_hash,
    filesystem,
    index_dtype,
    write_csr_arrays,
    write_manifest,
)
from .sources import ConcatSource, Source


@dataclass
class ShardSettings:
    shard_size: int = 65_536
    seed: int = 0
    genes: Sequence[str] | None = None  # target gene list (feature_ids), in model order
    n_top_genes: int | None = None  # or: select this many HVGs in a streaming pass
    hvg_batch_key: str | None = None  # per-batch HVG selection (scanpy's batch_key rule)
    min_gene_overlap: float = 0.5
    compression: str = "lz4"  # lz4 | zstd | none (see shard_format.write_csr_arrays)
    obs_columns: Sequence[str] | None = None  # None: every obs column
    block_size: int = 8_192  # source rows per read
    workers: int = 0  # 0: this process; N: pass 1 and pass 2 on N Ray tasks at a time
    staging: str | None = None  # where the spill goes (default: beside a local output, else a temp dir)
    overwrite: bool = False
    wait: bool = False  # another writer holds the output's lease: wait (else refused)
    progress: bool = True
    extra_provenance: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.shard_size < 1 or self.block_size < 1:
            raise ValueError("shard_size and block_size must be >= 1")
        if not isinstance(self.workers, int) or self.workers < 0:
            raise ValueError(f"workers must be an integer >= 0, got {self.workers!r}")
        if self.genes is not None and self.n_top_genes is not None:
            raise ValueError("give a gene list or --n-top-genes, not both")
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, got {self.compression!r}")
        if self.n_top_genes is not None and self.n_top_genes < 1:
            raise ValueError("n_top_genes must be >= 1")
        if not 0 < self.min_gene_overlap <= 1:
            raise ValueError(
                f"--min-gene-overlap must be in (0, 1], got {self.min_gene_overlap!r} (a share of the gene "
                "list, e.g. 0.5)"
            )


def write_shards(source: Source, out: str, settings: ShardSettings | None = None, echo=print, reopen=None) -> dict:
    """Shard ``source`` into the directory ``out`` (local path or fsspec URL); returns the manifest.

    With ``settings.workers`` > 0 both passes run as Ray tasks (``RAY_ADDRESS`` or a local
    cluster): ``reopen`` (a picklable callable returning the source, e.g. a ``functools.partial``
    of ``open_source``) opens the source in each task; the output must be a local or shared path.
    The shards are the same whatever the number of workers (a cell's destination is drawn from the
    seed alone; each shard's rows are put in destination order)."""
    settings = settings or ShardSettings()
    if settings.workers and reopen is None:
        raise ValueError(
            "shard --workers needs a source that workers can open (a path, a SOMA Experiment or the Census)"
        )
    if settings.workers and is_remote(out) and settings.staging is None:
        raise ValueError(
            f"shard --workers spills to files every worker appends to, which {out} cannot hold: give "
            "--staging DIR on a filesystem every worker sees (the shards still go to --out), a local or "
            "shared --out, or --workers 0"
        )
    if settings.staging is not None and is_url(settings.staging):
        raise ValueError(f"--staging {settings.staging} must be a local or shared filesystem path, not a URL")
    with Lease(str(out), "sharding", wait=settings.wait, echo=echo):  # one writer per shard directory
        return _write_shards(source, str(out), settings, echo, reopen)


def _write_shards(source: Source, out: str, settings: ShardSettings, echo, reopen) -> dict:
    started = time.perf_counter()
    out = str(out)
    if is_remote(out):
        return _write_version(source, out, settings, started, echo, reopen)
    recover_replace(out)
    existed = _existed_before_check(out)
    fs, out_path = filesystem(out)
    final = out
    if fs.exists(join(out_path, MANIFEST_NAME)):
        if not settings.overwrite:
            raise FileExistsError(f"{out} already holds shards (manifest.json); pass --overwrite to replace them")
        # The new set is built beside the old one, which is replaced only once the new one is complete.
        out = out.rstrip("/") + ".overwrite-partial"
        existed = _existed_before_check(out)
        fs, out_path = filesystem(out)
    elif fs.exists(out_path):
        foreign = [n for n in listdir(out) if not _ours(n)]
        if foreign:
            raise FileExistsError(
                f"{out} exists and is not a shard directory (it holds {foreign[:5]}); choose another "
                "--out (nothing was changed)"
            )
    if fs.exists(out_path):
        _clear(fs, out_path)  # an unfinished run of ours (no manifest): its files only
    fs.makedirs(out_path, exist_ok=True)
    try:
        manifest = _build(source, out, settings, started, echo, reopen)
    except BaseException:
        # Bad input found on the way (or an interrupt): nothing of ours is left behind, nothing else touched.
        if existed:
            _clear(fs, out_path)
        elif fs.exists(out_path):
            fs.rm(out_path, recursive=True)
        raise
    if out != final:
        replace_tree(out, final)
    return manifest


def _write_version(source: Source, final: str, settings: ShardSettings, started: float, echo, reopen) -> dict:
    """On object storage: build the set as a new version of ``final`` and publish it when complete
    (``storage.publish``): readers see the old set, or none, until then; a killed run's unpublished
    version is cleared by the rerun."""
    check_writable(final)
    if exists(join(resolve(final), MANIFEST_NAME)) and not settings.overwrite:
        raise FileExistsError(f"{final} already holds shards (manifest.json); pass --overwrite to replace them")
    foreign = [n for n in listdir(final) if not _ours(n) and n not in (POINTER, VERSIONS)]
    if foreign:
        raise FileExistsError(
            f"{final} exists and is not a shard directory (it holds {foreign[:5]}); choose another "
            "--out (nothing was changed)"
        )
    out = staging_path(final)
    remove_tree(out)  # an unpublished version a killed run left: ours, rebuilt from the start
    try:
        manifest = _build(source, out, settings, started, echo, reopen)
    except BaseException:
        remove_tree(out)  # bad input found on the way (or an interrupt): nothing of ours left behind
        raise
    publish(out, final, legacy=_ours)
    return manifest


def _build(source: Source, out: str, settings: ShardSettings, started: float, echo, reopen=None) -> dict:
    """Both passes into the (empty) directory ``out``; the manifest is written last."""
    fs, out_path = filesystem(out)
    local = not is_remote(out)
    n_obs = source.n_obs
    if reopen is not None:
        reopen = _WorkerSource(reopen, uuid.uuid4().hex)  # each worker opens the source once per run
    columns = _obs_columns(source, settings.obs_columns)
    target = _target_genes(source, settings, echo, reopen)
    alignment = GeneAlignment(source.feature_ids, target, settings.min_gene_overlap, source_name=source.uri)
    if not alignment.identity:
        echo(f"gene alignment: {alignment.summary()}")
    if isinstance(source, ConcatSource):  # several sources as one atlas: each one's alignment
        for label, member in zip(source.labels, source.alignments):
            echo(f"gene alignment of {label}: {member.summary()}")
    var = _target_var(source, alignment)

    # Destination of every cell: shards of near-equal size, rows in random order (4 bytes a cell).
    n_shards = max(1, -(-n_obs // settings.shard_size))
    shard_sizes = np.diff(np.linspace(0, n_obs, n_shards + 1).round().astype(np.int64))
    shard_offsets = np.concatenate([[0], np.cumsum(shard_sizes)])
    if settings.staging is not None:  # named by the output: a killed run's spill is cleared by the rerun
        name = hashlib.sha1(str(out).encode()).hexdigest()[:16]
        staging = os.path.join(os.path.abspath(settings.staging), f"hvae-shard-{name}")
        shutil.rmtree(staging, ignore_errors=True)
    elif local:
        staging = os.path.join(out_path, ".staging")
    else:
        staging = tempfile.mkdtemp(prefix="hvae-shard-")
    os.makedirs(staging, exist_ok=True)
    plan = _Plan(n_obs, settings.seed, shard_offsets, columns, alignment, settings.block_size, staging)
    try:
        # Pass 1: stream counts and obs, validate, align, spill each row to its shard's files.
        if settings.workers:
            parts = _ray_pass_one(reopen, plan, settings, n_obs)
        else:
            with Progress(n_obs, "shard pass 1/2 (read)", enabled=settings.progress) as bar:
                parts = [_pass_one(source, plan, 0, 0, n_obs, bar.update)]
        directories = [_part_directory(staging, p) for p in range(len(parts))]
        _DuplicateIds.check_all(source, directories, n_obs)
        layout = _ObsLayout(columns, [part["obs"] for part in parts])
        max_count = max(part["max_count"] for part in parts)
        checksum = {"sum": 0.0, "weighted": 0}  # of the counts as read, keyed by source row: manifest count_checksum
        for part in parts:
            checksum = add_checksums(checksum, part["checksum"])

        data_dtype, indices_dtype = count_dtype(max_count), index_dtype(alignment.n_target)
        provenance = {
            "source": source.provenance(),
            "shard_seed": settings.seed,
            "created": datetime.now(timezone.utc).isoformat(),
            "hvae_pipeline": _package_version(),
            "genes": (
                "given list"
                if settings.genes is not None
                else f"top {settings.n_top_genes} HVGs"
                if settings.n_top_genes
                else "the genes every source measures"
                if isinstance(source, ConcatSource)
                else "all source genes"
            ),
            "n_genes_missing_zero_filled": len(alignment.missing),
            **settings.extra_provenance,
        }
        assemble = _Assembler(
            out,
            directories,
            alignment.n_target,
            data_dtype,
            indices_dtype,
            layout,
            var,
            provenance,
            settings.compression,
            [int(n) for n in shard_sizes],
        )
        if settings.workers:
            nnz = _ray_pass_two(assemble, n_shards, settings)
        else:
            nnz = _pass_two(assemble, n_shards, settings.progress, int(n_obs))
        shards = [{"path": f"shard-{k:05d}.zarr", "n_obs": int(shard_sizes[k]), "nnz": nnz[k]} for k in range(n_shards)]

        manifest = {
            "format_version": FORMAT_VERSION,
            "n_obs": int(n_obs),
            "n_vars": int(alignment.n_target),
            "feature_ids": alignment.target_ids.tolist(),
            "feature_ids_hash": feature_hash(alignment.target_ids),
            "feature_names": var["feature_name"].tolist() if "feature_name" in var.columns else None,
            "count_dtype": data_dtype.name,
            "index_dtype": indices_dtype.name,
            "max_count": max_count,
            "compression": settings.compression,
            "count_checksum": checksum,
            "shards": shards,
            "obs_columns": layout.meta(),
            "provenance": provenance,
            "build_seconds": round(time.perf_counter() - started, 2),
        }
        if settings.workers:
            manifest["workers"] = settings.workers
        faults.point("shard.manifest")
        write_manifest(out, manifest)
        return manifest
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@dataclass
class _Plan:
    """What every pass-1 part needs to spill its rows (picklable, for Ray tasks)."""

    n_obs: int
    seed: int
    shard_offsets: np.ndarray
    columns: list[str]
    alignment: GeneAlignment
    block_size: int
    staging: str

    def destination(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 1])
        return rng.permutation(np.arange(self.n_obs, dtype=np.int32 if self.n_obs < 2**31 else np.int64))


def _part_directory(staging: str, part: int) -> str:
    return os.path.join(staging, f"part-{part:05d}")


def _partitions(n_obs: int, workers: int, block_size: int) -> list[tuple[int, int]]:
    """Contiguous source row ranges, a few per worker (a slow one does not hold the pass), whole blocks each."""
    n_parts = max(1, min(4 * workers, -(-n_obs // block_size)))
    bounds = np.linspace(0, n_obs, n_parts + 1).round().astype(np.int64)
    return [(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]


def _row_blocks(source: Source, lo: int, hi: int, block_size: int):
    """(offset, CSR block) over source rows [lo, hi); the whole source by its own (often faster) iteration."""
    if lo == 0 and hi == source.n_obs:
        return source.iter_blocks(block_size)
    return ((start, source.rows(start, min(hi, start + block_size))) for start in range(lo, hi, block_size))


def _pass_one(source: Source, plan: _Plan, part: int, lo: int, hi: int, update=None) -> dict:
    """Spill source rows [lo, hi) to the part's directory (cleared first: a retried task starts
    over); returns the part's count checksum, largest count and obs spill state."""
    directory = _part_directory(plan.staging, part)
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    destination = plan.destination()[lo:hi]
    max_count = 0.0
    checksum = {"sum": 0.0, "weighted": 0}
    obs_spill = _ObsSpill(directory, plan.columns)
    duplicates = _DuplicateIds(directory, plan.n_obs)

    def blocks():
        for offset, block in _row_blocks(source, lo, hi, plan.block_size):
            yield offset, block, source.obs_rows(offset, offset + block.shape[0])[plan.columns]

    for offset, block, obs in run_ahead(blocks(), 2, name="shard-read-ahead"):
        n = block.shape[0]
        if len(obs) != n:
            raise RuntimeError(f"{source.uri}: obs rows [{offset}, {offset + n}) hold {len(obs)} cells, the counts {n}")
        values = source.check_counts(block, obs.index.to_numpy(dtype=object))
        block = sp.csr_matrix((values, block.indices, block.indptr), shape=block.shape)
        block = plan.alignment.apply(block)
        checksum = add_checksums(
            checksum,
            count_checksum(
                obs["source_row"].to_numpy(np.int64), block.indptr, block.indices, block.data, plan.alignment.n_target
            ),
        )
        if block.nnz:
            max_count = max(max_count, float(block.data.max()))
        duplicates.add(obs.index, offset)
        rows = destination[offset - lo : offset - lo + n]
        groups = _shard_groups(rows, plan.shard_offsets)
        _spill(directory, block, rows, plan.shard_offsets, groups)
        obs_spill.append(obs, groups)
        faults.point("shard.spill")
        if update is not None:
            update(n)
    return {"checksum": checksum, "max_count": max_count, "obs": obs_spill.state(), "cells": hi - lo}


class _WorkerSource:
    """The source as a Ray worker process holds it for one run: opened by the first task of the
    run that the process executes and kept for the next ones (opening an h5ad reads its whole obs,
    seconds at millions of cells: once per task, it was paid 4 times a worker, pass 1 and the HVG
    pass alike). A new run (another ``run``) closes the previous run's source first, so a file
    rewritten between runs is read afresh."""

    _held: tuple[str, Source] | None = None  # per process: (run, its source)

    def __init__(self, reopen, run: str) -> None:
        self.reopen, self.run = reopen, run

    def get(self) -> Source:
        held = _WorkerSource._held
        if held is None or held[0] != self.run:
            _WorkerSource._held = None
            if held is not None:
                held[1].close()
            _WorkerSource._held = held = (self.run, self.reopen())
        return held[1]


def _pass_one_task(reopen: _WorkerSource, plan: _Plan, part: int, lo: int, hi: int, fault_variables: dict) -> dict:
    faults.install(fault_variables)
    faults.maybe_kill_shard_part(plan.staging, part)
    return _pass_one(reopen.get(), plan, part, lo, hi)


def _ray_pass_one(reopen, plan: _Plan, settings: ShardSettings, n_obs: int) -> list[dict]:
    ranges = _partitions(n_obs, settings.workers, settings.block_size)
    results: list[dict | None] = [None] * len(ranges)
    variables = faults.forwarded()
    with Progress(n_obs, f"shard pass 1/2 (read, {settings.workers} workers)", enabled=settings.progress) as bar:
        calls = {part: (reopen, plan, part, lo, hi, variables) for part, (lo, hi) in enumerate(ranges)}
        for part, result in _ray_map(_pass_one_task, calls, settings.workers):
            results[part] = result
            bar.update(result["cells"])
    return results  # type: ignore[return-value]


def _ray_map(function, calls: dict, limit: int):
    """(key, result) of ``function(*calls[key])`` on Ray tasks (one CPU each, retried up to 3
    times when a worker dies), at most ``limit`` in flight, as they finish."""
    ray = _ray()
    task = ray.remote(num_cpus=1, max_retries=3)(function)
    queue, pending = list(calls.items()), {}
    while queue or pending:
        while queue and len(pending) < limit:
            key, args = queue.pop(0)
            pending[task.remote(*args)] = key
        done, _ = ray.wait(list(pending), num_returns=1)
        yield pending.pop(done[0]), ray.get(done[0])


def _ray():
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), configure_logging=False, log_to_driver=False)
    return ray


@dataclass
class _Assembler:
    """Pass 2 for one shard: its rows from every part's spill, in destination order, written."""

    out: str
    directories: list[str]
    n_vars: int
    data_dtype: np.dtype
    indices_dtype: np.dtype
    layout: "_ObsLayout"
    var: pd.DataFrame
    provenance: dict
    compression: str
    shard_sizes: list[int]

    def load(self, k: int):
        counts, order = _load_spill(
            self.directories, k, self.shard_sizes[k], self.n_vars, self.data_dtype, self.indices_dtype
        )
        return counts, self.layout.load(self.directories, k, order)

    def write(self, k: int, counts, obs) -> int:
        fs, out_path = filesystem(self.out)
        _write_shard(
            self.out,
            out_path,
            fs,
            not is_remote(self.out),
            f"shard-{k:05d}.zarr",
            counts,
            obs,
            self.var,
            self.provenance,
            self.compression,
        )
        self.remove_spill(k)  # only once written: a retried task finds its input
        return int(counts.nnz)

    def remove_spill(self, k: int) -> None:
        for directory in self.directories:
            for suffix in ("bin", "obs"):
                path = os.path.join(directory, f"{k}.{suffix}")
                if os.path.exists(path):
                    os.remove(path)

    def __call__(self, k: int) -> int:
        counts, obs = self.load(k)
        return self.write(k, counts, obs)


def _pass_two(assemble: _Assembler, n_shards: int, progress: bool, n_obs: int) -> list[int]:
    nnz = []
    with Progress(n_obs, "shard pass 2/2 (write)", enabled=progress) as bar, ThreadPoolExecutor(1) as writer:
        pending = None  # shard k is written in the background while shard k+1 is loaded
        for k in range(n_shards):
            counts, obs = assemble.load(k)
            if pending is not None:
                nnz.append(pending.result())
            pending = writer.submit(assemble.write, k, counts, obs)
            faults.point("shard.shard")
            bar.update(assemble.shard_sizes[k])
        if pending is not None:
            nnz.append(pending.result())
    return nnz


def _ray_pass_two(assemble: _Assembler, n_shards: int, settings: ShardSettings) -> list[int]:
    shared = _ray().put(assemble)
    variables = faults.forwarded()
    nnz: list[int] = [0] * n_shards
    with Progress(
        sum(assemble.shard_sizes), f"shard pass 2/2 (write, {settings.workers} workers)", enabled=settings.progress
    ) as bar:
        for k, result in _ray_map(
            _assemble_task, {k: (shared, k, variables) for k in range(n_shards)}, settings.workers
        ):
            nnz[k] = result
            faults.point("shard.shard")
            bar.update(assemble.shard_sizes[k])
    return nnz


def _assemble_task(assemble: _Assembler, k: int, fault_variables: dict) -> int:
    faults.install(fault_variables)
    return assemble(k)


def _existed_before_check(out: str) -> bool:
    """Whether ``out`` existed before ``check_writable`` (which creates a local directory); an
    unreachable store, missing credentials or permissions fail here, in words."""
    existed = os.path.exists(out) if not is_remote(out) else None
    check_writable(out)
    if existed is None:
        fs, path = filesystem(out)
        existed = fs.exists(path)
    return existed


def _ours(name: str) -> bool:
    """A file or directory ``shard`` writes in its output directory."""
    return name.startswith(("shard-", PROBE)) or name in (".staging", MANIFEST_NAME, MANIFEST_NAME + ".tmp")


def _clear(fs, path: str) -> None:
    for entry in fs.ls(path, detail=False):
        if _ours(entry.rstrip("/").rsplit("/", 1)[-1]):
            fs.rm(entry, recursive=True)


def _available_columns(source: Source) -> list[str]:
    return list(source.obs_rows(0, min(1, source.n_obs)).columns)


def _obs_columns(source: Source, columns: Sequence[str] | None) -> list[str]:
    """The obs columns kept in the shards (``source_row`` always), checked against the source."""
    available = _available_columns(source)
    if columns is None:
        return available
    missing = [c for c in columns if c not in available]
    if missing:
        raise ValueError(f"{source.uri}: obs has no column(s) {missing} (columns: {available})")
    return list(dict.fromkeys([*columns, "source_row"]))


def _target_genes(source: Source, settings: ShardSettings, echo, reopen=None) -> list[str]:
    if settings.genes is not None:
        return list(settings.genes)
    if settings.n_top_genes is None:
        return source.feature_ids.tolist()
    from .genes import GeneStatistics, highly_variable_by_batch

    if settings.n_top_genes > len(source.feature_ids):
        raise ValueError(
            f"--n-top-genes {settings.n_top_genes} exceeds the {len(source.feature_ids)} genes of {source.uri}"
        )
    key = settings.hvg_batch_key
    if key is not None:
        available = _available_columns(source)
        if key not in available:
            raise ValueError(f"{source.uri}: HVG batch key {key!r} is not an obs column (columns: {available})")
    how = f", {settings.workers} workers" if settings.workers else ""
    with Progress(source.n_obs, f"highly variable genes{how}", enabled=settings.progress) as bar:
        if settings.workers:  # each part's sums on a worker, added here in part order
            statistics: dict = {}
            ranges = _partitions(source.n_obs, settings.workers, settings.block_size)
            calls = {part: (reopen, key, settings.block_size, lo, hi) for part, (lo, hi) in enumerate(ranges)}
            results = dict(_ray_map(_gene_statistics_task, calls, settings.workers))
            for part in range(len(ranges)):
                for label, part_statistics in results[part].items():  # Ray's results are read-only: sum into new arrays
                    statistics.setdefault(label, GeneStatistics(part_statistics.n_genes)).merge(part_statistics)
                bar.update(ranges[part][1] - ranges[part][0])
        else:
            statistics = _gene_statistics(source, key, settings.block_size, 0, source.n_obs, bar.update)
    statistics = dict(sorted(statistics.items()))
    chosen = (
        statistics["all"].highly_variable(settings.n_top_genes)
        if key is None
        else highly_variable_by_batch(statistics, settings.n_top_genes)
    )
    echo(
        f"selected {len(chosen)} highly variable genes"
        + (f" across {len(statistics)} batches of {key!r}" if key else "")
    )
    return source.feature_ids[chosen].tolist()


def _gene_statistics(source: Source, key: str | None, block_size: int, lo: int, hi: int, update=None) -> dict:
    """Per-gene sums over source rows [lo, hi): ``{"all": ...}``, or one per value of obs column ``key``."""
    from .genes import GeneStatistics

    statistics: dict[str, GeneStatistics] = {}
    for offset, block in _row_blocks(source, lo, hi, block_size):
        if key is None:
            statistics.setdefault("all", GeneStatistics(block.shape[1])).update(block)
        else:
            block_labels = source.obs_rows(offset, offset + block.shape[0])[key].astype(str).to_numpy()
            for label in np.unique(block_labels):
                statistics.setdefault(label, GeneStatistics(block.shape[1])).update(block[block_labels == label])
        if update is not None:
            update(block.shape[0])
    return statistics


def _gene_statistics_task(reopen: _WorkerSource, key: str | None, block_size: int, lo: int, hi: int) -> dict:
    return _gene_statistics(reopen.get(), key, block_size, lo, hi)


def _target_var(source: Source, alignment: GeneAlignment) -> pd.DataFrame:
    var = pd.DataFrame(index=pd.Index(alignment.target_ids, name="feature_id", dtype=object))
    if "feature_name" in source.var.columns:
        names = source.var["feature_name"].reindex(alignment.target_ids)
        var["feature_name"] = names.fillna("").astype(str).to_numpy()
    return var


def _shard_groups(destination: np.ndarray, shard_offsets: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(shard, the block's rows bound for it) for every shard the block's rows go to, rows in
    block order: one grouping for both spills (counts and obs), so their records line up."""
    shard_of = np.searchsorted(shard_offsets, destination, side="right") - 1
    order = np.argsort(shard_of, kind="stable")
    bounds = np.searchsorted(shard_of[order], np.arange(len(shard_offsets)))
    return [(int(shard), order[bounds[shard] : bounds[shard + 1]]) for shard in np.unique(shard_of)]


def _spill(
    staging: str,
    block: sp.csr_matrix,
    destination: np.ndarray,
    shard_offsets: np.ndarray,
    groups: list[tuple[int, np.ndarray]],
) -> None:
    """Append each row to its shard's spill file, one record per (block, shard): header [n, nnz,
    data itemsize, index itemsize] + positions + lengths + data + indices."""
    for shard, rows in groups:
        part = block[rows]
        positions = (destination[rows] - shard_offsets[shard]).astype(np.int64)
        # Compact spill records: uint16 counts when the record's largest count fits, int16 gene ids
        # below 32,768 genes; the header says which (spill volume is the external shuffle's cost).
        data = (
            part.data.astype(np.uint16) if part.nnz == 0 or part.data.max() <= 65_535 else part.data.astype(np.uint32)
        )
        indices = part.indices.astype(np.int16 if block.shape[1] <= 32_768 else np.int32)
        header = np.array([len(rows), part.nnz, data.itemsize, indices.itemsize], dtype=np.int64)
        with open(os.path.join(staging, f"{shard}.bin"), "ab") as handle:
            for array in (header, positions, np.diff(part.indptr).astype(np.int64), data, indices):
                handle.write(memoryview(np.ascontiguousarray(array)))


@dataclass
class _ShardCounts:
    """A shard's CSR arrays, already in the shard's compact dtypes."""

    data: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray
    shape: tuple[int, int]

    @property
    def nnz(self) -> int:
        return len(self.data)


def _read_spills(directories: list[str], name: str) -> np.ndarray:
    """The spill file ``name`` of every part, concatenated in part order (records are self-delimiting)."""
    raws = [
        np.fromfile(path, dtype=np.uint8)
        for path in (os.path.join(d, name) for d in directories)
        if os.path.exists(path)
    ]
    return np.concatenate(raws) if raws else np.zeros(0, np.uint8)


def _load_spill(
    directories: list[str],
    shard: int,
    n_rows: int,
    n_vars: int,
    data_dtype: np.dtype,
    indices_dtype: np.dtype,
    rows_per_gather: int = 8_192,
) -> tuple[_ShardCounts, np.ndarray]:
    """The shard's rows from its spill files, in destination order, in compact dtypes, and the
    order (arrival index of each destination position) that puts its obs records in place.

    Peak memory is about two copies of the shard's entries (the spill and the ordered output)
    plus one gather index of ``rows_per_gather`` rows."""
    raw = _read_spills(directories, f"{shard}.bin")
    positions, lengths, datas, indices = [], [], [], []
    cursor = 0
    while cursor < len(raw):
        n, nnz, data_size, index_size = np.frombuffer(raw, np.int64, 4, cursor)
        cursor += 32
        data_type = np.uint16 if data_size == 2 else np.uint32
        index_type = np.int16 if index_size == 2 else np.int32
        for target, dtype, count in (
            (positions, np.int64, n),
            (lengths, np.int64, n),
            (datas, data_type, nnz),
            (indices, index_type, nnz),
        ):
            target.append(np.frombuffer(raw, dtype, int(count), cursor))
            cursor += int(count) * np.dtype(dtype).itemsize
    position = np.concatenate(positions) if positions else np.zeros(0, np.int64)
    if len(position) != n_rows or not np.array_equal(np.sort(position), np.arange(n_rows)):
        raise RuntimeError(f"shard {shard}: spill holds {len(position)} rows, expected {n_rows} (staging corrupted?)")
    length = np.concatenate(lengths)
    data = np.concatenate(datas, dtype=data_dtype, casting="unsafe")  # values were checked to fit
    index = np.concatenate(indices, dtype=indices_dtype, casting="unsafe")
    del raw, datas, indices
    arrived_start = np.concatenate([[0], np.cumsum(length)[:-1]])
    order = np.argsort(position)  # arrived row of each destination position
    out_length = length[order]
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(out_length, out=indptr[1:])
    out_data, out_index = np.empty_like(data), np.empty_like(index)
    for lo in range(0, n_rows, rows_per_gather):
        rows = order[lo : lo + rows_per_gather]
        row_length = out_length[lo : lo + rows_per_gather]
        # Entry j of the chunk comes from arrived_start[row] + (j - first entry of that row in the chunk).
        first = indptr[lo : lo + len(rows)] - indptr[lo]
        gather = np.repeat(arrived_start[rows] - first, row_length) + np.arange(int(row_length.sum()))
        out_data[indptr[lo] : indptr[lo + len(rows)]] = data[gather]
        out_index[indptr[lo] : indptr[lo + len(rows)]] = index[gather]
    return _ShardCounts(out_data, out_index, indptr, (n_rows, n_vars)), order


def _write_shard(
    out: str,
    out_path: str,
    fs,
    local: bool,
    name: str,
    counts: _ShardCounts,
    obs: pd.DataFrame,
    var: pd.DataFrame,
    provenance: dict,
    compression: str,
) -> None:
    import warnings

    import zarr
    from anndata.io import write_elem

    final = join(out, name)
    target = os.path.join(out_path, name + ".partial") if local else final
    group = zarr.open_group(target, mode="w", zarr_format=3)
    group.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
    write_csr_arrays(group, "X", counts.data, counts.indices, counts.indptr, counts.shape, compression)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)
        write_elem(group, "obs", portable_frame(obs))
        write_elem(group, "var", portable_frame(var))
        write_elem(group, "uns", {"provenance": json.dumps(provenance)})
    if local:
        os.replace(target, os.path.join(out_path, name))


def _is_label(values: pd.Series) -> bool:
    """Columns stored as one global, sorted category list: strings and categoricals (and any
    column that is not a plain numpy number or boolean)."""
    return not (isinstance(values.dtype, np.dtype) and values.dtype.kind in "biuf")


class _ObsSpill:
    """obs rows spilled beside the counts, shard by shard, as raw arrays: names (UTF-8 bytes and
    lengths), label columns as codes into category lists grown as values appear (mapped to one
    sorted list per column at the end), numeric columns as they are. One record per (block, shard),
    in the same order as the count records, so the counts' order puts them in place."""

    def __init__(self, staging: str, columns: list[str]) -> None:
        self.staging, self.columns = staging, columns
        self.kinds: dict[str, np.dtype | None] = {}  # None: a label column
        self.seen: dict[str, dict[str, int]] = {}  # label column -> value -> first-seen code
        self.missing: dict[str, int] = {}

    def append(self, obs: pd.DataFrame, groups: list[tuple[int, np.ndarray]]) -> None:
        """Spill a block's obs, one record per (shard, rows) of ``groups`` (as ``_spill`` was given)."""
        encoded = [self._encode_names(obs.index)]
        for column in self.columns:
            values = obs[column]
            if column not in self.kinds:
                self.kinds[column] = None if _is_label(values) else values.dtype
                if self.kinds[column] is None:
                    self.seen[column], self.missing[column] = {}, 0
            kind = self.kinds[column]
            if kind is None:
                encoded.append(self._encode_labels(column, values))
            else:
                encoded.append(values.to_numpy(dtype=kind))
        names, lengths = encoded[0]
        for shard, rows in groups:
            name_bytes = b"".join([names[r] for r in rows.tolist()])
            arrays = [
                np.array([len(rows), len(name_bytes)], np.int64),
                lengths[rows].astype(np.int32),
                np.frombuffer(name_bytes, np.uint8),
            ] + [array[rows] for array in encoded[1:]]
            with open(os.path.join(self.staging, f"{shard}.obs"), "ab") as handle:
                for array in arrays:
                    handle.write(memoryview(np.ascontiguousarray(array)))

    @staticmethod
    def _encode_names(index: pd.Index) -> tuple[list[bytes], np.ndarray]:
        encoded = [str(name).encode() for name in index]
        return encoded, np.fromiter(map(len, encoded), np.int64, len(encoded))

    def _encode_labels(self, column: str, values: pd.Series) -> np.ndarray:
        seen = self.seen[column]
        codes, uniques = pd.factorize(values, use_na_sentinel=True)  # missing -> -1
        self.missing[column] += int((codes < 0).sum())
        mapping = np.fromiter(
            (seen.setdefault(str(v), len(seen)) for v in np.asarray(uniques, dtype=object)), np.int32, len(uniques)
        )
        return np.where(codes >= 0, mapping[np.maximum(codes, 0)] if len(mapping) else -1, -1).astype(np.int32)

    def state(self) -> dict:
        """What pass 2 needs of this part: each column's kind, each label column's values in
        first-seen order (the codes spilled) and its missing count."""
        return {
            "kinds": {c: (None if k is None else np.dtype(k).str) for c, k in self.kinds.items()},
            "seen": {c: list(seen) for c, seen in self.seen.items()},
            "missing": dict(self.missing),
        }


class _ObsLayout:
    """The obs columns over every part: one sorted category list per label column, and each
    part's map from its first-seen codes to it; numeric columns in one dtype."""

    def __init__(self, columns: list[str], states: list[dict]) -> None:
        self.columns = columns
        self.kinds: dict[str, np.dtype | None] = {}
        for column in columns:
            kinds = {state["kinds"][column] for state in states if column in state["kinds"]}
            if None in kinds and len(kinds) > 1:
                raise ValueError(
                    f"obs column {column!r} holds text in some rows and only numbers in others; make it "
                    "one type (or shard with --workers 0)"
                )
            self.kinds[column] = None if None in kinds or not kinds else np.result_type(*[np.dtype(k) for k in kinds])
        self.categories = {
            c: sorted(set().union(*[s["seen"].get(c, []) for s in states])) for c in columns if self.kinds[c] is None
        }
        self.missing = {c: sum(s["missing"].get(c, 0) for s in states) for c in self.categories}
        self.part_kinds = [{c: (None if k is None else np.dtype(k)) for c, k in s["kinds"].items()} for s in states]
        self.sorted_code = []
        for state in states:
            maps = {}
            for column, categories in self.categories.items():
                seen = state["seen"].get(column, [])
                maps[column] = (
                    pd.Index(categories).get_indexer(seen).astype(np.int64) if seen else np.zeros(0, np.int64)
                )
            self.sorted_code.append(maps)

    def meta(self) -> dict:
        meta = {}
        for column in self.columns:
            if self.kinds[column] is None:
                meta[column] = {
                    "dtype": "category",
                    "categories": self.categories[column],
                    "missing": self.missing[column],
                }
            else:
                meta[column] = {"dtype": str(self.kinds[column])}
        return meta

    def load(self, directories: list[str], shard: int, order: np.ndarray) -> pd.DataFrame:
        """Shard ``shard``'s obs from every part's spill, rows in destination order (``order`` from
        ``_load_spill``, which read the parts in the same order)."""
        names, columns = [], {c: [] for c in self.columns}
        for part, directory in enumerate(directories):
            path = os.path.join(directory, f"{shard}.obs")
            raw = np.fromfile(path, dtype=np.uint8) if os.path.exists(path) else np.zeros(0, np.uint8)
            cursor = 0
            while cursor < len(raw):
                n, n_bytes = (int(v) for v in np.frombuffer(raw, np.int64, 2, cursor))
                cursor += 16
                lengths = np.frombuffer(raw, np.int32, n, cursor)
                cursor += 4 * n
                blob = raw[cursor : cursor + n_bytes].tobytes()
                cursor += n_bytes
                ends = np.cumsum(lengths)
                names += [blob[e - l : e].decode() for e, l in zip(ends.tolist(), lengths.tolist())]
                for column in self.columns:
                    kind = self.part_kinds[part][column]
                    dtype = np.dtype(np.int32) if kind is None else kind
                    values = np.frombuffer(raw, dtype, n, cursor)
                    cursor += n * dtype.itemsize
                    if kind is None:
                        sorted_code = self.sorted_code[part][column]
                        values = np.where(
                            values >= 0, sorted_code[np.maximum(values, 0)] if len(sorted_code) else -1, -1
                        )
                    else:
                        values = values.astype(self.kinds[column])
                    columns[column].append(values)
        frame = {}
        for column in self.columns:
            values = np.concatenate(columns[column]) if columns[column] else np.zeros(0, np.int64)
            values = values[order]
            if self.kinds[column] is None:
                frame[column] = pd.Categorical.from_codes(values.astype(np.int64), categories=self.categories[column])
            else:
                frame[column] = values
        return pd.DataFrame(frame, index=pd.Index(np.asarray(names, dtype=object)[order], dtype=object))


class _DuplicateIds:
    """Repeated obs names found without holding them: each name's 64-bit hash and row go to one of
    a few bucket files by hash; each bucket (about a million cells) is then checked alone."""

    BUCKET_CELLS = 1_000_000

    def __init__(self, staging: str, n_obs: int) -> None:
        self.staging, self.n_buckets = staging, self.buckets(n_obs)

    @classmethod
    def buckets(cls, n_obs: int) -> int:
        return max(1, -(-n_obs // cls.BUCKET_CELLS))

    def add(self, index: pd.Index, offset: int) -> None:
        hashes = pd.util.hash_array(index.to_numpy(dtype=object))
        bucket = (hashes % np.uint64(self.n_buckets)).astype(np.int64)
        rows = np.arange(offset, offset + len(index), dtype=np.int64)
        for b in np.unique(bucket):
            keep = bucket == b
            with open(os.path.join(self.staging, f"{b}.ids"), "ab") as handle:
                handle.write(memoryview(np.stack([hashes[keep].view(np.int64), rows[keep]], axis=1)))

    @classmethod
    def check_all(cls, source: Source, directories: list[str], n_obs: int) -> None:
        """Each bucket of every part's hashes together: repeated names anywhere in the source."""
        repeated, examples = 0, []
        for b in range(cls.buckets(n_obs)):
            paths = [os.path.join(d, f"{b}.ids") for d in directories]
            pairs = [np.fromfile(p, dtype=np.int64).reshape(-1, 2) for p in paths if os.path.exists(p)]
            if not pairs:
                continue
            pairs = np.concatenate(pairs)
            for p in paths:
                if os.path.exists(p):
                    os.remove(p)
            hashes = np.sort(pairs[:, 0])
            twice = np.unique(hashes[1:][hashes[1:] == hashes[:-1]])
            repeated += len(twice)
            for value in twice[: max(0, 3 - len(examples))]:
                row = int(pairs[pairs[:, 0] == value, 1][0])
                examples.append(str(source.obs_rows(row, row + 1).index[0]))
        if repeated:
            hint = getattr(source, "duplicate_hint", None)
            raise ValueError(
                f"{source.uri}: {repeated:,} obs names occur more than once (e.g. {examples}); each cell needs "
                "a unique id ("
                + (hint() if hint else "make them unique first, e.g. anndata's obs_names_make_unique")
                + ")"
            )


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("hvae-pipeline")
    except Exception:
        return "unknown"


__all__ = ["ShardSettings", "write_shards"]
