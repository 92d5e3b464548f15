"""``embed``: one embedding per hierarchy level for every cell of a source, written to Zarr.

Output (DESIGN.md "Storage contracts"), a Zarr v3 group readable with zarr, xarray and dask::

    obs_id            (cells,)        the source's cell ids, in source order
    level_<l>/mean    (cells, D_l)    float32: what level l exports (``HierarchicalVAE.encode``):
                                      with the read-out, what levels l..top predict of the cell's
                                      standardised expression, in the read-out's coordinates
                                      (D_l = the code's width, d_0 + ... + d_top, at every level;
                                      Euclidean distances are those of the predicted expression);
                                      without it, the posterior means of [z_l, ..., z_top]
                                      (D_l = d_l + ... + d_top)
    level_<l>/logvar  (cells, D_l)    with --logvar, laid out alike (the posterior's variance carried
                                      through the export to first order)
    progress/done     (chunks,)       1 once a chunk of rows is written (one Zarr chunk each)
    progress/content  (chunks,)       uint64 hash of the counts each chunk read (a resume reads the
                                      first and last finished chunks again and compares)
    attrs             format_version, model_id (hash of the checkpoint's model.pt), checkpoint,
                      feature_ids_hash, level_dims (D_l), latent_dims (d_l), export ("readout" or
                      "code", as above), source, chunk_rows, ema, created, complete

Rows are processed in chunks aligned with the Zarr chunks, so writers never share a chunk; a
chunk is marked done only after its rows are written. A killed job rerun skips the done chunks;
a complete output is left untouched; an output of another model is refused without --overwrite.
With ``workers`` >= 1, chunks go to Ray actors (one model copy each, GPU when there is one).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .. import faults
from ..train.checkpoint import fetch_checkpoint, load_model, read_train_state
from ..data.alignment import GeneAlignment, gene_id_note
from ..data.background import run_ahead
from ..data.sources import open_source
from ..lease import Lease
from ..storage import is_url, recover_replace, replace_tree
from ..data import densify

# 2: level_<l> holds the code from level l up (format 1: z_l alone).
FORMAT_VERSION = 2


@dataclass
class EmbedSettings:
    batch_size: int = 4096
    chunk_rows: int = 16_384
    ema: bool = True
    logvar: bool = False
    workers: int = 0
    overwrite: bool = False
    min_gene_overlap: float = 0.5
    progress: bool = True
    device: str | None = None
    wait: bool = False  # another writer holds the output's lease: wait for it (else refused)

    def __post_init__(self) -> None:
        for name, low in (("batch_size", 1), ("chunk_rows", 1), ("workers", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")
        if not 0 < self.min_gene_overlap <= 1:
            raise ValueError(
                f"--min-gene-overlap must be in (0, 1], got {self.min_gene_overlap!r}: a model fed no "
                "gene it knows gives every cell the same embedding"
            )


def source_identity(source, block_rows: int = 1_000_000) -> dict:
    """What the embeddings were made from: the source (URI, layer, filters), its number of cells
    and a hash of its obs ids. A store resumes, or counts as complete, only for the same identity.

    The obs ids are read ``block_rows`` at a time (never all at once) and checked to be unique
    through their 64-bit hashes (8 bytes a cell)."""
    provenance = source.provenance()
    digest, hashes = hashlib.sha256(), []
    for lo in range(0, source.n_obs, block_rows):
        names = source.obs_names(lo, min(source.n_obs, lo + block_rows))
        digest.update((("\n" if lo else "") + "\n".join(names)).encode())
        hashes.append(pd.util.hash_array(names))
    hashes = np.sort(np.concatenate(hashes)) if hashes else np.zeros(0, np.uint64)
    repeated = np.unique(hashes[1:][hashes[1:] == hashes[:-1]])
    del hashes
    if len(repeated):
        examples = _names_with_hashes(source, repeated[:3], block_rows)
        raise ValueError(
            f"{source.uri}: {len(repeated):,} obs names occur more than once (e.g. {examples}); "
            "each cell needs a unique id to be embedded and read back (make them unique first)"
        )
    identity = {
        "uri": source.uri,
        "layer": provenance.get("layer"),
        "obs_filter": provenance.get("obs_filter"),
        "var_filter": provenance.get("var_filter"),
        "n_obs": int(source.n_obs),
        "obs_ids_hash": f"sha256:{digest.hexdigest()[:16]}",
    }
    stamp = source.content_stamp()
    if stamp is not None:  # a file rewritten in place, same ids, other values: not the same source
        identity["content"] = stamp
    return identity


def _same_source(old: dict | None, new: dict) -> bool:
    """Whether a store's recorded source identity is this source's (a store written before the
    content stamp was recorded is compared on the rest)."""
    if not old:
        return False
    keys = set(new) if "content" in old else set(new) - {"content"}
    return all(old.get(key) == new.get(key) for key in keys)


def _names_with_hashes(source, wanted: np.ndarray, block_rows: int) -> list[str]:
    found: list[str] = []
    for lo in range(0, source.n_obs, block_rows):
        names = source.obs_names(lo, min(source.n_obs, lo + block_rows))
        hit = np.isin(pd.util.hash_array(names), wanted)
        for name in names[hit]:
            if name not in found:
                found.append(name)
        if len(found) >= len(wanted):
            break
    return found


def model_id(checkpoint_dir: Path) -> str:
    digest = hashlib.sha256()
    with open(checkpoint_dir / "model.pt", "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()[:16]}"


def _load(checkpoint: str, ema: bool):
    """(local checkpoint directory, where it came from, model, parts); remote checkpoints are
    downloaded once per node."""
    found = fetch_checkpoint(checkpoint)
    if found is None:
        raise FileNotFoundError(f"{checkpoint} is neither a checkpoint directory nor a run directory with one")
    directory, origin = found
    try:
        model, parts = load_model(directory, ema=ema)
    except FileNotFoundError:
        raise
    except Exception as error:
        raise ValueError(f"checkpoint {directory} is corrupt or partial ({type(error).__name__}: {error})") from None
    return directory, origin, model, parts


def _never_trained(directory) -> bool:
    """Whether the checkpoint records step 0 (``HVAEModel.save`` before ``train()``)."""
    try:
        return read_train_state(directory).get("step") == 0
    except (OSError, ValueError, AttributeError):  # model.pt alone (a shipped model): no record of its steps
        return False


def embed(checkpoint: str, source_args: dict, out: str, settings: EmbedSettings | None = None, echo=print) -> dict:
    """Embed every cell of ``open_source(**source_args)`` with the checkpoint's model into ``out``
    (holding the store's lease: a second writer is refused, or waits with ``settings.wait``)."""
    settings = settings or EmbedSettings()
    started = time.perf_counter()
    # Ray actors do not run in this directory: make local paths absolute.
    source_args = {**source_args, "source": _absolute(str(source_args["source"]))}
    out = _absolute(str(out))
    with Lease(out, "embedding", wait=settings.wait, echo=echo) as lease:  # one writer per store
        return _embed(checkpoint, source_args, out, settings, echo, started, lease)


def _embed(checkpoint: str, source_args: dict, out: str, settings: EmbedSettings, echo, started: float, lease) -> dict:
    import zarr

    directory, origin, model, parts = _load(checkpoint, settings.ema)
    if _never_trained(directory):
        echo(f"warning: checkpoint {origin} was never trained (step 0): its embeddings are those of random weights")
    genes = parts["genes"]["feature_ids"]
    # open for the whole run: the local path reads from it
    source_args, source = _open_as_recorded(source_args, parts.get("setup"), echo)
    try:
        alignment = GeneAlignment(
            source.feature_ids, genes, settings.min_gene_overlap, source_name=source.uri, id_note=_id_note(source)
        )
        echo(f"genes: {alignment.summary()}")
        if source_args.get("source") == "census":
            echo(f"Census cells: obs filter {source.obs_filter!r} ({source.n_obs:,} cells)")
        identity_of_source = source_identity(source)  # also refuses repeated obs names
        n_obs, provenance, identity = source.n_obs, source.provenance(), model_id(directory)
        dims = list(model.config.representation_dims)
        attrs = {
            "format_version": FORMAT_VERSION,
            "model_id": identity,
            "checkpoint": origin,
            "feature_ids_hash": parts["genes"]["feature_ids_hash"],
            "level_dims": dims,
            "latent_dims": list(model.config.latent_dims),
            "export": model.export_kind,
            "source": provenance,
            "source_identity": identity_of_source,
            "source_args": json.dumps(source_args),
            "chunk_rows": settings.chunk_rows,
            "ema": settings.ema,
            "n_genes_missing_zero_filled": len(alignment.missing),
        }
        recover_replace(out)  # an --overwrite swap cut short by a kill
        final = out
        out, scratch = _working_path(final, settings)
        group, existing = _open_output(out, attrs, n_obs, dims, settings, scratch)
        if existing == "complete":
            if scratch:  # a new store finished before its swap or publication was cut short
                replace_tree(out, final, legacy=_store_entry)
            echo(f"{final} is already complete for model {identity} and this source; nothing to do")
            return {"out": final, "cells": n_obs, "written_chunks": 0, "complete": True}
        n_chunks = -(-n_obs // settings.chunk_rows)
        done = np.asarray(group["progress/done"][:])
        todo = [c for c in range(n_chunks) if not done[c]]
        if existing == "partial":
            _check_unchanged(group, source, alignment, settings, done, final)
            echo(f"resuming {out}: {n_chunks - len(todo)} of {n_chunks} chunks already written")
        if settings.logvar and todo:
            echo(
                f"--logvar: about {logvar_cost(model, settings.batch_size, settings.device):.0f}x the time of the means "
                "(measured on one batch here)"
            )
        bar = _bar(n_obs, n_obs - sum(_chunk_size(c, n_obs, settings.chunk_rows) for c in todo), settings.progress)
        if settings.workers == 0:
            worker = _ChunkEmbedder(model, source, alignment, out, settings)  # the model and source already open
            reads = run_ahead(todo, 1, lambda chunk: (chunk, *worker.read(chunk)), name="embed-read-ahead")
            for count, (chunk, counts, obs_ids) in enumerate(reads):
                lease.check()
                faults.maybe_fail_embedding(count)  # tests only: a killed job
                bar.update(worker.write(chunk, counts, obs_ids))
        else:
            _embed_with_ray(origin, source_args, out, genes, settings, todo, bar)
        bar.close()
        done = np.asarray(zarr.open_array(f"{out}/progress/done", mode="r")[:])
        if not done.all():
            raise RuntimeError(f"{out}: {int((done == 0).sum())} chunks were not written")
        faults.point("embed.complete")
        group.attrs.update({"complete": True, "completed": datetime.now(timezone.utc).isoformat()})
        if scratch:  # the old store is replaced only now, by a complete new one
            replace_tree(out, final, legacy=_store_entry)
        seconds = time.perf_counter() - started
        rows = sum(_chunk_size(c, n_obs, settings.chunk_rows) for c in todo)
        return {
            "out": final,
            "cells": n_obs,
            "written_chunks": len(todo),
            "complete": True,
            "seconds": round(seconds, 2),
            "cells_per_s": round(rows / max(seconds, 1e-9)),
        }
    finally:
        source.close()


def _open_as_recorded(source_args: dict, setup: dict | None, echo):
    """(source arguments, the opened source): an AnnData source is read as the model's AnnData was
    (the layer and gene id column that ``HVAEModel.save`` recorded), where the command line does
    not say otherwise; any other source as given (shards hold counts; SOMA and the Census name
    their own layers)."""
    from ..data.sources import AnnDataSource

    source = open_source(**source_args)
    recorded = {key: (setup or {}).get(key) for key in ("layer", "gene_column")}
    recorded = {key: value for key, value in recorded.items() if value and not source_args.get(key)}
    if not recorded or not isinstance(source, AnnDataSource):
        return source_args, source
    source.close()
    echo(
        "reading the source as the model's cells were read: "
        + ", ".join(f"{key.replace('_', ' ')} {value!r}" for key, value in recorded.items())
        + " (recorded with the model; --layer / --gene-column override)"
    )
    source_args = {**source_args, **recorded}
    return source_args, open_source(**source_args)


def _id_note(source) -> str | None:
    used = getattr(source, "gene_ids_from", None)
    return gene_id_note(used) if used else None


def _absolute(path: str) -> str:
    if path == "census" or is_url(path):
        return path
    return str(Path(path).resolve())


def _chunk_size(chunk: int, n_obs: int, chunk_rows: int) -> int:
    return min(n_obs, (chunk + 1) * chunk_rows) - chunk * chunk_rows


def _working_path(final: str, settings: EmbedSettings) -> tuple[str, bool]:
    """(where this run writes, whether that is scratch of its own that replaces ``final`` once
    complete). Local: ``final`` itself, or with --overwrite over an existing store a sibling (a
    failure leaves the old store as it was). Object storage: the published store when there is
    one and no --overwrite (complete, or refused), else a new version published when complete
    (readers never see a store being written)."""
    from ..storage import exists, is_remote, join, listdir, resolve, staging_path

    published = resolve(final)
    found = exists(join(published, "zarr.json"))
    if not is_remote(final):
        if settings.overwrite and found:
            return final.rstrip("/") + ".overwrite-partial", True
        return final, False
    if found and not settings.overwrite:
        return published, False
    foreign = [n for n in listdir(final) if not _store_entry(n)]
    if foreign:
        raise FileExistsError(
            f"{final} exists and is not an embeddings store (it holds {foreign[:5]}); "
            "choose another --out (nothing was changed)"
        )
    return staging_path(final), True


def _store_entry(name: str) -> bool:
    """An entry this tool writes at the top of an embeddings store (versioned or not)."""
    from ..storage import POINTER, PROBE, VERSIONS

    return name in ("zarr.json", "obs_id", "progress", POINTER, VERSIONS) or name.startswith(("level_", PROBE))


def _is_our_store(attrs: dict) -> bool:
    return "model_id" in attrs and "format_version" in attrs and "level_dims" in attrs


def _open_output(out: str, attrs: dict, n_obs: int, dims: list[int], settings: EmbedSettings, scratch: bool):
    """(group, state): state is 'new', 'partial' or 'complete'. Never deletes what it did not
    write: a path that exists and is not an embeddings store is refused."""
    import zarr

    from ..storage import PROBE, check_writable, filesystem, listdir

    check_writable(out)  # an unreachable store, missing credentials or permissions fail here, in words
    fs, path = filesystem(out)
    if fs.exists(f"{path}/zarr.json"):
        group = zarr.open_group(out, mode="r+")
        old = dict(group.attrs)
        if not _is_our_store(old):
            raise FileExistsError(
                f"{out} is a Zarr group but not an embeddings store written by hvae-pipeline; "
                "choose another --out (nothing was changed)"
            )
        same_source = _same_source(old.get("source_identity"), attrs["source_identity"])
        old_export = old.get("export", "code")  # stores written before the attribute hold the code
        same = (
            old.get("model_id") == attrs["model_id"]
            and old.get("chunk_rows") == attrs["chunk_rows"]
            and old.get("ema") == attrs["ema"]
            and old_export == attrs["export"]
            and int(group["obs_id"].shape[0]) == n_obs
            and ("level_0/logvar" in group) == settings.logvar
            and same_source
        )
        if same:
            return group, "complete" if old.get("complete") else "partial"
        if not scratch:
            if old.get("model_id") != attrs["model_id"]:
                raise FileExistsError(
                    f"{out} holds embeddings of another model ({old.get('model_id')}, not "
                    f"{attrs['model_id']}); pass --overwrite to replace them"
                )
            if not same_source:
                raise FileExistsError(
                    f"{out} was embedded from another source: {_describe(old.get('source_identity'))}; this source is "
                    f"{_describe(attrs['source_identity'])}. Pass --overwrite to replace it, or choose another --out"
                )
            if old_export != attrs["export"]:
                raise FileExistsError(
                    f"{out} holds another kind of level export ({old_export}, not "
                    f"{attrs['export']}: written by an earlier hvae-pipeline); pass --overwrite to "
                    "replace it"
                )
            raise FileExistsError(
                f"{out} was written with other settings (chunk rows, EMA or logvar); pass --overwrite to replace it"
            )
    elif [n for n in listdir(out) if not n.startswith(PROBE)]:
        raise FileExistsError(
            f"{out} exists and is not an embeddings store (it holds {listdir(out)[:5]}); "
            "choose another --out (nothing was changed)"
        )
    group = zarr.open_group(out, mode="w", zarr_format=3)
    rows = settings.chunk_rows
    group.create_array("obs_id", shape=(n_obs,), chunks=(rows,), dtype=str, dimension_names=["cell"])
    for level, dim in enumerate(dims):
        names = ["cell", f"latent_{level}"]
        group.create_array(
            f"level_{level}/mean",
            shape=(n_obs, dim),
            chunks=(rows, dim),
            dtype="float32",
            dimension_names=names,
            compressors=None,
        )
        if settings.logvar:
            group.create_array(
                f"level_{level}/logvar",
                shape=(n_obs, dim),
                chunks=(rows, dim),
                dtype="float32",
                dimension_names=names,
                compressors=None,
            )
    n_chunks = -(-n_obs // rows)
    group.create_array("progress/done", shape=(n_chunks,), chunks=(1,), dtype="uint8", fill_value=0)
    group.create_array("progress/content", shape=(n_chunks,), chunks=(1,), dtype="uint64", fill_value=0)
    group.attrs.update({**attrs, "created": datetime.now(timezone.utc).isoformat(), "complete": False})
    return group, "new"


def _describe(identity: dict | None) -> str:
    if not identity:
        return "an unrecorded source"
    filters = ", ".join(f"{k} {identity[k]!r}" for k in ("layer", "obs_filter", "var_filter") if identity.get(k))
    if identity.get("content"):
        latest = max(mtime for _, mtime in identity["content"].values())
        filters += (
            ", " if filters else ""
        ) + f"files written {datetime.fromtimestamp(latest, timezone.utc):%Y-%m-%d %H:%M:%S} UTC"
    return f"{identity['uri']} ({identity['n_obs']:,} cells, obs ids {identity['obs_ids_hash']}{', ' + filters if filters else ''})"


class _ChunkEmbedder:
    """Holds one model copy and an opened source; embeds and writes whole chunks."""

    def __init__(self, model, source, alignment: GeneAlignment, out: str, settings: EmbedSettings) -> None:
        import zarr

        self.device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device)
        self.source, self.alignment, self.settings = source, alignment, settings
        self.group = zarr.open_group(out, mode="r+")

    def read(self, chunk: int) -> tuple[sp.csr_matrix, np.ndarray]:
        """The chunk's counts, checked and aligned to the model's genes, and its obs ids (the local
        path runs this a chunk ahead, in a thread, while the previous chunk is encoded)."""
        return _read_chunk(self.source, self.alignment, self.settings.chunk_rows, chunk)

    def run(self, chunk: int) -> int:
        return self.write(chunk, *self.read(chunk))

    @torch.no_grad()
    def write(self, chunk: int, counts: sp.csr_matrix, obs_ids: np.ndarray) -> int:
        """Encode one chunk's counts and write every level's rows, then mark the chunk done.

        The counts were checked on the CPU (``read``); the batches are encoded with no host read
        and the chunk's results come back in one copy per array."""
        lo = chunk * self.settings.chunk_rows
        hi = lo + counts.shape[0]
        kinds = ("mean", "logvar") if self.settings.logvar else ("mean",)
        parts: dict[str, list] = {kind: [] for kind in kinds}
        for start in range(0, hi - lo, self.settings.batch_size):
            dense = densify(counts[start : start + self.settings.batch_size], self.device)
            for kind, levels in zip(kinds, _encode(self.model, dense, self.settings.logvar), strict=True):
                parts[kind].append(levels)
        for kind, batches in parts.items():
            for level in range(len(batches[0])):
                self.group[f"level_{level}/{kind}"][lo:hi] = (
                    torch.cat([b[level] for b in batches]).float().cpu().numpy()
                )
        faults.point("embed.levels")
        self.group["obs_id"][lo:hi] = np.asarray(obs_ids, dtype=object).astype(str)
        if "progress/content" in self.group:  # stores written before it have none
            self.group["progress/content"][chunk] = _content_hash(counts)
        self.group["progress/done"][chunk] = 1  # only after every row of the chunk is written
        faults.point("embed.chunk")
        return hi - lo


def _read_chunk(source, alignment: GeneAlignment, chunk_rows: int, chunk: int) -> tuple[sp.csr_matrix, np.ndarray]:
    lo, hi = chunk * chunk_rows, min(source.n_obs, (chunk + 1) * chunk_rows)
    counts = source.rows(lo, hi)
    obs_ids = source.obs_names(lo, hi)
    source.check_counts(counts, obs_ids)
    return alignment.apply(counts), obs_ids


def _content_hash(counts: sp.csr_matrix) -> int:
    """A 64-bit hash of a chunk's counts as the model read them (never 0: 0 means not recorded)."""
    counts = counts.tocsr()
    digest = hashlib.blake2b(digest_size=8)
    for array in (counts.indptr, counts.indices, counts.data):
        digest.update(np.ascontiguousarray(array).tobytes())
    return int.from_bytes(digest.digest(), "little") or 1


def _check_unchanged(group, source, alignment: GeneAlignment, settings: EmbedSettings, done, final: str) -> None:
    """Before a resume: the first and last finished chunks read again must hash as they did when
    they were embedded, or the source changed under the same ids, size and modification time
    (a file restored or copied with its times kept): refused, nothing written."""
    if "progress/content" not in group:
        return
    recorded = np.asarray(group["progress/content"][:])
    finished = [int(c) for c in np.flatnonzero(done) if recorded[c]]
    for chunk in sorted({finished[0], finished[-1]}) if finished else []:
        if _content_hash(_read_chunk(source, alignment, settings.chunk_rows, chunk)[0]) != int(recorded[chunk]):
            lo = chunk * settings.chunk_rows
            last = lo + _chunk_size(chunk, source.n_obs, settings.chunk_rows) - 1
            raise ValueError(
                f"{source.uri} changed since {final} was partly embedded: rows {lo:,}-{last:,} (chunk {chunk}) "
                "read other counts than when they were embedded (the ids, file size and modification time are "
                "the same). Pass --overwrite to embed it again from the start, or restore the source"
            )


def _encode(model, dense: torch.Tensor, logvar: bool) -> tuple:
    """(means,) or (means, logvars) of one batch: the variances, a forward-mode Jacobian of every
    upper level's export, only when asked for (they cost several times the means)."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dense.device.type == "cuda" else contextlib.nullcontext()
    with autocast:
        if logvar:
            return model.encode(dense, return_logvar=True, check_values=False)
        return (model.encode(dense, check_values=False),)


def logvar_cost(model, batch_size: int, device: str | None = None, repeats: int = 2) -> float:
    """How many times the time of the means an encoding with variances takes, measured on one batch
    of ``min(batch_size, 2048)`` cells of random counts (the cost does not depend on the values)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device)
    generator = torch.Generator().manual_seed(0)
    dense = torch.poisson(torch.rand(min(batch_size, 2048), model.config.n_genes, generator=generator)).to(device)
    seconds = {}
    for logvar in (False, True):
        _encode(model, dense, logvar)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(repeats):
            _encode(model, dense, logvar)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds[logvar] = time.perf_counter() - started
    return seconds[True] / max(seconds[False], 1e-9)


class _RemoteEmbedder(_ChunkEmbedder):
    """A Ray actor: loads its own model copy and opens its own source."""

    def __init__(
        self, checkpoint_dir: str, source_args: dict, out: str, genes: list[str], settings: EmbedSettings
    ) -> None:
        _, _, model, _ = _load(checkpoint_dir, settings.ema)
        source = open_source(**source_args)
        alignment = GeneAlignment(source.feature_ids, genes, settings.min_gene_overlap, source_name=source.uri)
        super().__init__(model, source, alignment, out, settings)


def _embed_with_ray(checkpoint_dir, source_args, out, genes, settings, todo, bar) -> None:
    import ray
    from ray.util import ActorPool

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), configure_logging=False, log_to_driver=False)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= settings.workers else 0
    actor = ray.remote(num_cpus=1, num_gpus=gpus)(_RemoteEmbedder)
    actors = [actor.remote(checkpoint_dir, source_args, out, genes, settings) for _ in range(settings.workers)]
    pool = ActorPool(actors)
    for written in pool.map_unordered(lambda actor, chunk: actor.run.remote(chunk), todo):
        bar.update(written)
    for a in actors:
        ray.kill(a)


def _bar(total: int, initial: int, enabled: bool):
    from ..progress import Progress

    return Progress(total, "embed", enabled=enabled, initial=initial)
