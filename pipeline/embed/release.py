"""``hvae-pipeline embed-release``: the scheduled job that embeds each new atlas release.

It writes ``<out-root>/<release>/embeddings.zarr`` unless a complete output of the same model is
already there (so it is safe to run every night), resumes a partial one, and keeps a small JSON
index of what it did at ``<out-root>/index.json``. The out-root may be a local path or any fsspec
URL (``s3://bucket/embeddings``).
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import replace
from pathlib import Path
from datetime import datetime, timezone

from .. import storage
from ..train.checkpoint import fetch_checkpoint
from ..data.sources import CensusUnreachable, census_obs_filter, open_census_copy, public_census
from ..query.index import default_index_path
from ..lease import Lease
from .store import open_store
from .write import EmbedSettings, embed, model_id

INDEX_NAME = "index.json"
RECORD_KEYS = {"release", "model_id", "status", "started"}  # what every run record holds


def resolve_release(census_version: str | None, census_uri: str | None, release: str | None) -> str:
    """The release's name: ``release`` when given; for a public Census version (or an alias such as
    ``latest``/``stable``) its build date from the Census release directory; for a copy, the build
    date recorded in its ``census_info/summary``."""
    if release:
        name = release
    elif census_version:
        import cellxgene_census

        description = public_census(
            census_version, lambda: cellxgene_census.get_census_version_description(census_version)
        )
        name = description.get("release_build") or census_version
    else:
        name = _build_date(census_uri)
        if not name:
            raise ValueError(
                f"the Census copy at {census_uri} records no census_build_date in census_info/summary; "
                "name the release with --release"
            )
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ValueError(f"release name {name!r} is not a plain directory name (letters, digits, . _ -)")
    return name


def _build_date(census_uri: str) -> str | None:
    with open_census_copy(census_uri) as census:
        frame = census["census_info"]["summary"].read().concat().to_pandas()
    return dict(zip(frame["label"], frame["value"])).get("census_build_date")


def read_index(out_root: str) -> list[dict]:
    path = storage.join(out_root, INDEX_NAME)
    if not storage.exists(path):
        return []
    try:
        runs = json.loads(storage.read_text(path))["runs"]
        if not isinstance(runs, list) or not all(isinstance(run, dict) and RECORD_KEYS <= run.keys() for run in runs):
            raise TypeError(f"'runs' is not a list of records with {sorted(RECORD_KEYS)}")
        return runs
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{path} is not an embed-release index ({type(error).__name__}: {error}); move it aside"
        ) from None


def _write_index(out_root: str, runs: list[dict]) -> None:
    """Replace the index in one step (a rename locally, one PUT on object storage)."""
    storage.write_text(storage.join(out_root, INDEX_NAME), json.dumps({"runs": runs}, indent=2))


_index_lock = threading.Lock()  # this process's threads; the lease below serialises processes and hosts


def _record(out_root: str, entry: dict) -> None:
    """``entry`` into the runs file: read, replace and write under the runs file's own lease, so
    that jobs on one out-root at once (other releases, other models) never lose each other's records."""
    with (
        _index_lock,
        Lease(
            storage.join(out_root, INDEX_NAME), "update of the runs file", wait=True, poll=0.1, echo=lambda line: None
        ),
    ):
        _write_index(out_root, _replace(read_index(out_root), entry))


def embed_release(
    checkpoint: str,
    out_root: str,
    *,
    census_version: str | None = None,
    census_uri: str | None = None,
    release: str | None = None,
    organism: str = "homo_sapiens",
    obs_filter: str | None = None,
    all_cells: bool = False,
    settings: EmbedSettings | None = None,
    index: bool = True,
    echo=print,
) -> dict:
    """Embed one Census release under ``out_root`` (idempotent, resumable) and record it in the
    runs file; with ``index`` (the default) also build the release's nearest-neighbour index beside
    its store (``embeddings.zarr.index``, for ``hvae-pipeline query``)."""
    if (census_version is None) == (census_uri is None):
        raise ValueError("give exactly one of --census-version (a public release or 'latest'/'stable') or --census-uri")
    settings = settings or EmbedSettings()
    if census_uri is not None and not storage.is_url(census_uri) and not Path(census_uri).exists():
        raise FileNotFoundError(f"the Census copy {census_uri} does not exist")
    storage.check_writable(out_root)
    found = fetch_checkpoint(checkpoint)
    if found is None:
        raise FileNotFoundError(f"{checkpoint} is neither a checkpoint directory nor a run directory with one")
    directory, origin = found
    identity = model_id(directory)
    try:
        name = resolve_release(census_version, census_uri, release)
    except CensusUnreachable as error:  # the scheduled job's failure is in the index too
        now = datetime.now(timezone.utc).isoformat()
        _record(
            out_root,
            {
                "release": release or census_version or census_uri,
                "model_id": identity,
                "checkpoint": origin,
                "census_version": census_version,
                "census_uri": census_uri,
                "started": now,
                "finished": now,
                "status": "failed",
                "error": f"{error}"[:500],
            },
        )
        raise
    out = storage.join(out_root, name, "embeddings.zarr")
    with Lease(out, f"embedding of release {name}", wait=settings.wait, echo=echo):  # one job per release
        return _embed_release(
            origin,
            identity,
            out_root,
            out,
            name,
            census_version,
            census_uri,
            organism,
            obs_filter,
            all_cells,
            settings,
            index,
            echo,
        )


def _embed_release(
    origin,
    identity,
    out_root,
    out,
    name,
    census_version,
    census_uri,
    organism,
    obs_filter,
    all_cells,
    settings,
    index,
    echo,
) -> dict:
    _refuse_another_store(out, identity, settings, name)
    runs = read_index(out_root)
    effective = census_obs_filter(obs_filter, all_cells)
    for entry in runs:
        if (
            entry["release"] == name
            and entry["model_id"] == identity
            and entry["status"] == "complete"
            and _complete(out)
        ):
            if entry.get("obs_filter", effective) != effective:
                raise FileExistsError(
                    f"release {name} was embedded by model {identity} with obs filter "
                    f"{entry.get('obs_filter')!r}, this run asks for {effective!r}: use another --out-root "
                    "(or --release name) for another selection of cells"
                )
            echo(f"release {name} is already embedded by model {identity} at {out}; nothing to do")
            if index and not storage.exists(storage.join(storage.resolve(default_index_path(out)), "index.json")):
                entry = {**entry, "index": _index(out, echo)}
                _record(out_root, entry)
            return {**entry, "action": "skipped"}
    source_args = {
        "source": "census",
        "census_version": census_version,
        "census_uri": census_uri,
        "organism": organism,
        "obs_filter": obs_filter,
        "all_cells": all_cells,
    }
    entry = {
        "release": name,
        "model_id": identity,
        "checkpoint": origin,
        "out": out,
        "census_version": census_version,
        "census_uri": census_uri,
        "organism": organism,
        "obs_filter": effective,
        "started": datetime.now(timezone.utc).isoformat(),
        "status": "running",
    }
    _record(out_root, entry)
    echo(f"embedding release {name} with model {identity} -> {out}")
    started = time.perf_counter()
    try:
        result = embed(origin, source_args, out, replace(settings, overwrite=False), echo=echo)
        if index:
            entry["index"] = _index(out, echo)
    except BaseException as error:
        _record(
            out_root,
            {
                **entry,
                "status": "failed",
                "error": f"{type(error).__name__}: {error}"[:500],
                "finished": datetime.now(timezone.utc).isoformat(),
                "seconds": round(time.perf_counter() - started, 1),
            },
        )
        raise
    entry.update(
        {
            "status": "complete",
            "n_cells": result["cells"],
            "finished": datetime.now(timezone.utc).isoformat(),
            "seconds": round(time.perf_counter() - started, 1),
            "cells_per_s": result.get("cells_per_s"),
        }
    )
    _record(out_root, entry)
    return {**entry, "action": "embedded"}


def _index(out: str, echo) -> str:
    """Build the release's index beside its store (a no-op where it is already built)."""
    from ..query.index import build_index

    build_index(out, echo=echo)
    return default_index_path(out)


def _replace(runs: list[dict], entry: dict) -> list[dict]:
    """The index with ``entry`` as the record of its (release, model) pair."""
    kept = [r for r in runs if (r["release"], r["model_id"]) != (entry["release"], entry["model_id"])]
    return sorted(kept + [entry], key=lambda r: (r["release"], r["started"]))


def _refuse_another_store(out: str, identity: str, settings: EmbedSettings, name: str) -> None:
    """embed-release never replaces a release's store (it has no --overwrite): one of another model
    or written with other settings is refused before the index is touched, saying what works."""
    try:
        group = open_store(out)
    except (FileNotFoundError, KeyError, ValueError):
        return
    attrs, logvar = dict(group.attrs), "level_0/logvar" in group
    if "model_id" not in attrs:
        return  # not an embeddings store: embed refuses it, naming what it holds
    if attrs["model_id"] != identity:
        what = f"embeddings of another model ({attrs['model_id']}, not {identity})"
        way = "give this model its own --out-root"
    elif attrs.get("chunk_rows") != settings.chunk_rows or logvar != settings.logvar:
        stored = f"--chunk-rows {attrs.get('chunk_rows')}{' --logvar' if logvar else ''}"
        what = (
            f"embeddings written with {stored} (this run: --chunk-rows {settings.chunk_rows}"
            f"{' --logvar' if settings.logvar else ''})"
        )
        way = f"rerun with {stored}"
    else:
        return
    raise FileExistsError(
        f"release {name} at {out} holds {what}; embed-release never replaces a release's store: {way}, "
        f"or delete {out} yourself to embed the release again"
    )


def _complete(out: str) -> bool:
    try:
        return bool(open_store(out).attrs.get("complete"))
    except (FileNotFoundError, KeyError, ValueError):
        return False


__all__ = ["embed_release", "read_index", "resolve_release"]
