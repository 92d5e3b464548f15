"""kill -9 during shard, train and embed, at kill points chosen with a seed (HVAE_KILL_AT: the
process SIGKILLs itself at the n-th point it reaches, between two writes): the same command run
again ends identical to the uninterrupted run and leaves no staging files behind."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import ShardedDataset

CLI = [sys.executable, "-m", "pipeline"]
ENV = {**os.environ, "TQDM_DISABLE": "1"}
STAGING = (".staging", ".tmp", ".partial", ".overwrite-partial", ".replaced", ".hvae-ckpt-", ".hvae-write-test")

pytestmark = pytest.mark.slow


def cli(*args, env=None):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, env={**ENV, **(env or {})})


def ok(result):
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def kill_points(args, log: Path) -> list[tuple[int, str]]:
    """Every kill point an uninterrupted run of ``args`` reaches, in order."""
    ok(cli(*args, env={"HVAE_KILL_POINTS": str(log)}))
    return [(int(n), name) for n, name in (line.split() for line in log.read_text().splitlines())]


def choose(points, seed: int, extra: int) -> list[int]:
    """One occurrence of every kind of point, and ``extra`` more anywhere (seeded: CI is deterministic)."""
    rng = np.random.default_rng(seed)
    kinds = sorted({name for _, name in points})
    chosen = {int(rng.choice([n for n, name in points if name == kind])) for kind in kinds}
    rest = [n for n, _ in points if n not in chosen]
    chosen |= {int(n) for n in rng.choice(rest, size=min(extra, len(rest)), replace=False)}
    return sorted(chosen)


def killed_then_rerun(args, at: int, env=None):
    killed = cli(*args, env={**(env or {}), "HVAE_KILL_AT": str(at)})
    assert killed.returncode == -signal.SIGKILL, (at, killed.returncode, killed.stderr[-2000:])
    return ok(cli(*args, env=env))


def no_staging(root: Path) -> None:
    left = [str(p.relative_to(root)) for p in root.rglob("*") if any(mark in p.name for mark in STAGING)]
    assert not left, f"staging files left behind: {left[:10]}"


def shard_content(path) -> tuple:
    dataset = ShardedDataset(str(path))
    manifest = dict(dataset.manifest)
    for volatile in ("build_seconds", "provenance"):
        manifest.pop(volatile)
    arrays = [
        (p, *dataset.shard(k).read(0, int(n))) for k, (p, n) in enumerate(zip(dataset.shard_paths, dataset.shard_sizes))
    ]
    return (
        json.dumps(manifest, sort_keys=True),
        [(Path(p).name, *(a.tobytes() for a in rest)) for p, *rest in arrays],
        dataset.obs_column("source_row").tolist(),
    )


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    ok(cli("simulate", root / "atlas.h5ad", "--n-cells", "2400", "--n-genes", "150", "--n-donors", "3"))
    return root


def test_shard_killed_anywhere_reruns_to_the_same_shards(atlas, tmp_path):
    args = ["shard", atlas / "atlas.h5ad", "--shard-size", "500", "--block-size", "600"]
    reference = tmp_path / "reference"
    points = kill_points([*args, "--out", reference], tmp_path / "points.log")
    assert {name for _, name in points} >= {"shard.spill", "shard.shard", "shard.manifest", "manifest.tmp"}
    expected = shard_content(reference)
    for at in choose(points, seed=1, extra=1):
        out = tmp_path / f"killed_{at}"
        killed_then_rerun([*args, "--out", out], at)
        assert shard_content(out) == expected, f"killed at point {at}"
    # --overwrite of a finished set, killed anywhere, the swap included: the rerun ends with the new set.
    old_args = [*args, "--seed", "5"]
    log = tmp_path / "overwrite.log"
    ok(cli(*old_args, "--out", tmp_path / "scratch"))
    points = kill_points([*args, "--out", tmp_path / "scratch", "--overwrite"], log)
    assert {"replace.aside", "replace.swapped"} <= {name for _, name in points}
    for at in [n for n, name in points if name.startswith("replace.")]:  # the other points are as above
        out = tmp_path / f"overwritten_{at}"
        ok(cli(*old_args, "--out", out))
        killed_then_rerun([*args, "--out", out, "--overwrite"], at)
        assert shard_content(out) == expected, f"--overwrite killed at point {at}"
    no_staging(tmp_path)


@pytest.fixture(scope="module")
def shards(atlas):
    out = atlas / "shards"
    ok(cli("shard", atlas / "atlas.h5ad", "--out", out, "--shard-size", "600"))
    return out


def test_train_killed_anywhere_resumes_to_the_same_weights(shards, tmp_path):
    import torch

    from pipeline.train.checkpoint import find_checkpoint, load_model

    def args(name):
        return [
            "train",
            f"data.path={shards}",
            "data.batch_key=donor_id",
            "train.max_steps=24",
            "train.batch_size=64",
            "checkpoint.every_steps=8",
            "train.progress=false",
            "train.validate_every=8",
            f"run.storage_path={tmp_path}",
            f"run.name={name}",
        ]

    points = kill_points(args("reference"), tmp_path / "points.log")
    assert {name for _, name in points} >= {
        "train.step",
        "checkpoint.model",
        "checkpoint.trainer",
        "checkpoint.copied",
        "checkpoint.renamed",
        "checkpoint.latest",
    }
    reference = load_model(find_checkpoint(tmp_path / "reference"))[0].state_dict()
    for at in choose(points, seed=3, extra=0):
        rerun = killed_then_rerun(args(f"killed_{at}"), at)
        weights = load_model(find_checkpoint(tmp_path / f"killed_{at}"))[0].state_dict()
        for name, value in reference.items():
            torch.testing.assert_close(weights[name], value, rtol=1e-5, atol=1e-6, msg=f"killed at {at}: {name}")
        steps = [
            json.loads(line)["step"]
            for line in (tmp_path / f"killed_{at}" / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["split"] == "train"
        ]
        assert steps == sorted(set(steps)) and steps[-1] == 24, (at, rerun.stdout[-500:])
    no_staging(tmp_path)


def test_embed_killed_anywhere_resumes_to_the_same_store(shards, tmp_path):
    import zarr

    ok(
        cli(
            "train",
            f"data.path={shards}",
            "train.max_steps=4",
            "train.batch_size=64",
            "train.progress=false",
            f"run.storage_path={tmp_path}",
            "run.name=model",
        )
    )
    args = ["embed", "--checkpoint", tmp_path / "model", "--source", shards, "--chunk-rows", "500", "--workers", "0"]
    points = kill_points([*args, "--out", tmp_path / "reference.zarr"], tmp_path / "points.log")
    assert {name for _, name in points} >= {"embed.levels", "embed.chunk", "embed.complete"}
    reference = zarr.open_group(tmp_path / "reference.zarr", mode="r")
    for at in choose(points, seed=4, extra=0):
        out = tmp_path / f"killed_{at}.zarr"
        killed_then_rerun([*args, "--out", out], at)
        store = zarr.open_group(out, mode="r")
        assert store.attrs["complete"] and list(store["obs_id"][:]) == list(reference["obs_id"][:])
        for level in range(3):
            np.testing.assert_allclose(
                store[f"level_{level}/mean"][:],
                reference[f"level_{level}/mean"][:],
                rtol=1e-5,
                atol=1e-6,
                err_msg=f"killed at {at}",
            )
    no_staging(tmp_path)
