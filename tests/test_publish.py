"""Publishing on object storage, through a real S3 server (moto) on loopback. Object stores have
no atomic rename, so a shard set, an embeddings store and an index there are written as a new
version and shown to readers by one small write (``storage.publish``). kill -9 at every kind of
point of ``shard --overwrite`` and ``embed --overwrite`` (the publication included): a reader sees
the old output until the new one is published, never a missing or partial one, and the rerun
ends identical to an uninterrupted run with no unpublished version left. `train` with its run
directory on S3, killed at its uploads, resumes to the same weights."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from pipeline import storage
from test_kill import choose, shard_content

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3():
    from test_object_storage import s3 as fixture

    yield from fixture.__wrapped__()


def cli(*args, env=None):
    """The CLI in a new process, pointed at the moto server by the environment the fixture set."""
    environment = {**os.environ, "TQDM_DISABLE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *map(str, args)], capture_output=True, text=True, env=environment
    )


def ok(result):
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def kill_points(args, log) -> list[tuple[int, str]]:
    ok(cli(*args, env={"HVAE_KILL_POINTS": str(log)}))
    return [(int(n), name) for n, name in (line.split() for line in log.read_text().splitlines())]


def killed(args, at: int) -> None:
    result = cli(*args, env={"HVAE_KILL_AT": str(at)})
    assert result.returncode == -signal.SIGKILL, (at, result.returncode, result.stderr[-2000:])


def copy(source: str, target: str) -> None:
    fs, inner = storage.filesystem(source)
    fs.copy(inner, storage.filesystem(target)[1], recursive=True)


def published_once(out: str) -> None:
    """The output holds its publication record, the version it names and at most the version that
    one replaced (kept for readers who opened it until the next publication): nothing unpublished."""
    record = json.loads(storage.read_text(storage.join(out, storage.POINTER)))
    assert storage.listdir(out) == [storage.POINTER, storage.VERSIONS], storage.listdir(out)
    versions = storage.listdir(storage.join(out, storage.VERSIONS))
    assert record["version"] in versions and set(versions) <= {record["version"], record["replaced"]}, versions


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    root = tmp_path_factory.mktemp("publish")
    ok(cli("simulate", root / "atlas.h5ad", "--n-cells", "1000", "--n-genes", "100", "--n-donors", "2"))
    return root


def test_shard_overwrite_on_s3_killed_anywhere_shows_the_old_set_then_the_new(s3, atlas, tmp_path):
    root = f"{s3}/shards-{time.time_ns()}"
    args = ["shard", atlas / "atlas.h5ad", "--shard-size", "500", "--block-size", "400", "--obs-columns", "donor_id"]
    ok(cli(*args, "--seed", "5", "--out", f"{root}/old"))
    old = shard_content(f"{root}/old")
    copy(f"{root}/old", f"{root}/reference")
    points = kill_points([*args, "--out", f"{root}/reference", "--overwrite"], tmp_path / "points.log")
    assert {"shard.spill", "shard.shard", "shard.manifest", "publish.pointer"} <= {name for _, name in points}
    expected = shard_content(f"{root}/reference")
    assert expected != old
    published_once(f"{root}/reference")
    # One kill of every kind (the spill's is the first set's below: each S3 run costs seconds).
    for at in choose([(n, name) for n, name in points if name != "shard.spill"], seed=1, extra=0):
        out = f"{root}/killed_{at}"
        copy(f"{root}/old", out)
        killed([*args, "--out", out, "--overwrite"], at)
        after_publication = dict(points)[at] == "publish.pointer"
        assert shard_content(out) == (expected if after_publication else old), f"a reader after a kill at {at}"
        ok(cli(*args, "--out", out, "--overwrite"))
        assert shard_content(out) == expected, f"killed at {at}"
        published_once(out)
    # A first set killed before its publication is no set at all (not a partial one).
    first = [n for n, name in points if name == "shard.spill"][-1]
    killed([*args, "--out", f"{root}/first"], first)
    with pytest.raises(FileNotFoundError):
        shard_content(f"{root}/first")
    ok(cli(*args, "--out", f"{root}/first"))
    assert shard_content(f"{root}/first") == expected
    published_once(f"{root}/first")


@pytest.mark.ray
def test_shard_workers_write_to_s3_through_a_shared_staging_folder(s3, atlas, tmp_path):
    """`shard --workers 2 --staging DIR --out s3://...`: the workers spill to DIR (a filesystem
    they all see; object storage cannot be appended to) and write their shards to the bucket. The
    set equals the one-process set, is published once, and DIR is left as it was."""
    root = f"{s3}/workers-{time.time_ns()}"
    args = ["shard", atlas / "atlas.h5ad", "--shard-size", "300", "--block-size", "200", "--obs-columns", "donor_id"]
    ok(cli(*args, "--out", tmp_path / "one"))  # without --staging the run is refused (test_shard.py)
    (tmp_path / "spill").mkdir()
    (tmp_path / "spill" / "theirs.txt").write_text("not ours")
    ok(cli(*args, "--out", f"{root}/two", "--workers", "2", "--staging", tmp_path / "spill"))
    assert shard_content(f"{root}/two")[1:] == shard_content(tmp_path / "one")[1:]  # counts and rows, shard by shard
    published_once(f"{root}/two")
    assert os.listdir(tmp_path / "spill") == ["theirs.txt"]


@pytest.fixture(scope="module")
def models(atlas, tmp_path_factory):
    """Shards and two models of them (different weights): what an --overwrite replaces and with what."""
    root = tmp_path_factory.mktemp("models")
    shards = root / "shards"
    ok(cli("shard", atlas / "atlas.h5ad", "--out", shards, "--shard-size", "500"))
    for name, steps in (("a", 4), ("b", 6)):
        ok(
            cli(
                "train",
                f"data.path={shards}",
                f"train.max_steps={steps}",
                "train.batch_size=64",
                "train.progress=false",
                f"run.storage_path={root}",
                f"run.name={name}",
            )
        )
    return shards, root / "a", root / "b"


def store_content(out: str) -> tuple:
    from pipeline.embed import read_embeddings

    adata = read_embeddings(out, lazy=False)
    levels = [np.asarray(adata.obsm[f"X_hvae_level_{level}"]) for level in range(3)]
    return adata.uns["hvae_embeddings"]["model_id"], list(adata.obs_names), levels


def same_store(seen: tuple, expected: tuple, message: str) -> None:
    assert seen[:2] == expected[:2], message
    for level, (a, b) in enumerate(zip(seen[2], expected[2])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"{message}: level {level}")


def test_embed_overwrite_on_s3_killed_anywhere_shows_the_old_store_then_the_new(s3, models, tmp_path):
    shards, model_a, model_b = models
    root = f"{s3}/embed-{time.time_ns()}"
    args = ["embed", "--source", shards, "--chunk-rows", "250", "--workers", "0"]
    ok(cli(*args, "--checkpoint", model_a, "--out", f"{root}/old.zarr"))
    old = store_content(f"{root}/old.zarr")
    copy(f"{root}/old.zarr", f"{root}/reference.zarr")
    new_args = [*args, "--checkpoint", model_b, "--overwrite"]
    points = kill_points([*new_args, "--out", f"{root}/reference.zarr"], tmp_path / "points.log")
    assert {"embed.levels", "embed.chunk", "embed.complete", "publish.pointer"} <= {name for _, name in points}
    expected = store_content(f"{root}/reference.zarr")
    assert expected[0] != old[0]
    published_once(f"{root}/reference.zarr")
    for at in choose(points, seed=4, extra=0):
        out = f"{root}/killed_{at}.zarr"
        copy(f"{root}/old.zarr", out)
        killed([*new_args, "--out", out], at)
        after_publication = dict(points)[at] == "publish.pointer"
        same_store(store_content(out), expected if after_publication else old, f"a reader after a kill at {at}")
        ok(cli(*new_args, "--out", out))
        same_store(store_content(out), expected, f"killed at {at}")
        published_once(out)


def test_readers_never_see_a_store_or_index_being_replaced(s3, models, tmp_path, monkeypatch):
    """A reader polling an S3 store and its index while ``embed --overwrite`` and ``index
    --overwrite`` replace them sees the old one or the new one, complete, every time."""
    from pipeline.embed import EmbedSettings, embed
    from pipeline.query import IndexSettings, build_index, read_manifest

    monkeypatch.setenv("HVAE_CACHE", str(tmp_path / "cache"))
    shards, model_a, model_b = models
    out = f"{s3}/readers-{time.time_ns()}/store.zarr"
    settings = EmbedSettings(progress=False, chunk_rows=200, workers=0)
    embed(str(model_a), {"source": str(shards)}, out, settings, echo=lambda *_: None)
    build_index(out, settings=IndexSettings(), echo=lambda *_: None)
    old = store_content(out)
    old_index = read_manifest(out + ".index")["store"]["model_id"]
    seen, failures, stop = [], [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                content = store_content(out)
                assert all(np.isfinite(level).all() and (np.abs(level).sum(axis=1) > 0).all() for level in content[2])
                seen.append((content[0], read_manifest(out + ".index")["store"]["model_id"]))
            except Exception as error:  # noqa: BLE001 - any failure of a reader is the finding
                failures.append(f"{type(error).__name__}: {error}")

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        embed(
            str(model_b),
            {"source": str(shards)},
            out,
            EmbedSettings(**{**vars(settings), "overwrite": True}),
            echo=lambda *_: None,
        )
        build_index(out, settings=IndexSettings(overwrite=True), echo=lambda *_: None)
        time.sleep(0.5)
    finally:
        stop.set()
        thread.join()
    assert not failures, failures[:3]
    new = store_content(out)
    assert new[0] != old[0] and {store for store, _ in seen} <= {old[0], new[0]} and len(seen) >= 3, seen
    assert seen[-1] == (new[0], new[0]) and (old[0], old_index) == seen[0], (seen[0], seen[-1])
    published_once(out)
    published_once(out + ".index")


def test_train_on_s3_killed_at_its_uploads_resumes_to_the_same_weights(s3, models, tmp_path, monkeypatch):
    """`train` with its run directory on S3, killed after a checkpoint's upload and after the
    `latest` pointer's write (the points that touch the bucket; the local ones are test_kill's):
    the rerun resumes and ends with the uninterrupted run's weights."""
    import torch

    from pipeline.train.checkpoint import fetch_checkpoint, load_model

    monkeypatch.setenv("HVAE_CACHE", str(tmp_path / "cache"))
    shards = models[0]
    root = f"{s3}/runs-{time.time_ns()}"

    def args(name):
        return [
            *("train", f"data.path={shards}", "train.max_steps=16", "train.batch_size=64"),
            *("checkpoint.every_steps=8", "train.progress=false", "train.validate_every=8"),
            *(f"run.storage_path={root}", f"run.name={name}"),
        ]

    points = kill_points(args("reference"), tmp_path / "points.log")
    reference = load_model(fetch_checkpoint(f"{root}/reference")[0])[0].state_dict()
    remote = [(n, name) for n, name in points if name in ("checkpoint.renamed", "checkpoint.latest")]
    assert {name for _, name in remote} == {"checkpoint.renamed", "checkpoint.latest"}
    for at in choose(remote, seed=2, extra=0):
        killed(args(f"killed_{at}"), at)
        ok(cli(*args(f"killed_{at}")))
        weights = load_model(fetch_checkpoint(f"{root}/killed_{at}")[0])[0].state_dict()
        for name, value in reference.items():
            torch.testing.assert_close(weights[name], value, rtol=1e-5, atol=1e-6, msg=f"killed at {at}: {name}")
        assert storage.read_text(f"{root}/killed_{at}/latest").strip() == "checkpoint_00000016"
