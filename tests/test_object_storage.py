"""Object storage end to end, through a real S3-compatible server (moto) on loopback: shards,
checkpoints (the local backend, then 2 Ray workers resuming from the S3 checkpoint), embeddings,
the release job's index, all on s3://, with credentials from the standard AWS variables."""

import json
import os

import numpy as np
import pytest

from conftest import shared_file
from pipeline import storage

BUCKET = "hvae-test"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 and the AWS variables that point every client at it
    (boto3, s3fs, pyarrow and zarr honour AWS_ENDPOINT_URL; Ray workers inherit them)."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is in the dev extra")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {
        k: os.environ.get(k)
        for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    }
    os.environ.update(
        {
            "AWS_ENDPOINT_URL": f"http://{host}:{port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    import boto3
    import s3fs

    # fsspec keeps one S3FileSystem per set of options: one made against another module's server
    # (its endpoint read from the environment then) would be handed out here
    s3fs.S3FileSystem.clear_instance_cache()
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    yield f"s3://{BUCKET}"
    server.stop()
    s3fs.S3FileSystem.clear_instance_cache()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.mark.slow
@pytest.mark.ray
def test_shard_train_resume_embed_and_release_on_s3(s3, census_uri, tmp_path, monkeypatch):
    import ray

    from pipeline.config import load_config
    from pipeline.data import ShardedDataset, ShardSettings, open_source, write_shards
    from pipeline.embed import EmbedSettings, embed, read_embeddings
    from pipeline.train.launch import train
    from pipeline.embed.release import embed_release, read_index

    monkeypatch.setenv("HVAE_CACHE", str(tmp_path / "cache"))
    source = str(shared_file("pbmc3k_raw_seurat_annotations.h5ad"))
    write_shards(open_source(source), f"{s3}/shards", ShardSettings(n_top_genes=500, shard_size=700, progress=False))
    assert ShardedDataset(f"{s3}/shards").n_obs == 2700

    def config(steps, workers):
        return load_config(
            base={"data": {"path": f"{s3}/shards"}},
            overrides=[
                f"train.max_steps={steps}",
                "train.batch_size=64",
                "checkpoint.every_steps=20",
                "train.log_every=5",
                "train.progress=false",
                f"scaling.num_workers={workers}",
                f"run.storage_path={s3}/runs",
                "run.name=pbmc",
            ],
        )

    run = f"{s3}/runs/pbmc"
    train(config(20, 0), echo=lambda *_: None)  # the local backend uploads its checkpoints
    names = storage.listdir(run)
    assert {"checkpoint_00000020", "latest", "metrics.jsonl", "config.yaml", "summary.json"} <= set(names), names
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        messages = []
        summary = train(config(40, 2), echo=messages.append)  # 2 Ray workers resume from the S3 checkpoint
    finally:
        ray.shutdown()
    assert any("resuming run" in m and "checkpoint_00000020 (step 20)" in m for m in messages), messages
    assert summary["checkpoint"] == f"{run}/checkpoint_00000040"
    assert storage.read_text(f"{run}/latest").strip() == "checkpoint_00000040"
    steps = [
        json.loads(l)["step"]
        for l in storage.read_text(f"{run}/metrics.jsonl").splitlines()
        if json.loads(l)["split"] == "train"
    ]
    assert steps == list(range(5, 45, 5))  # steps 5..40 once each, across the two backends

    out = f"{s3}/embeddings/pbmc.zarr"
    result = embed(
        run, {"source": f"{s3}/shards"}, out, EmbedSettings(progress=False, chunk_rows=1000), echo=lambda *_: None
    )
    assert result["cells"] == 2700
    embedded = read_embeddings(out, lazy=False)
    assert embedded.n_obs == 2700 and embedded.obsm["X_hvae_level_0"].shape == (2700, 32)
    assert embedded.uns["hvae_embeddings"]["checkpoint"] == f"{run}/checkpoint_00000040"
    assert np.isfinite(embedded.obsm["X_hvae_level_2"]).all()

    entry = embed_release(
        run,
        f"{s3}/releases",
        census_uri=census_uri,
        release="2025-01-30",
        settings=EmbedSettings(progress=False),
        echo=lambda *_: None,
    )
    assert entry["action"] == "embedded" and entry["n_cells"] == 2638
    assert [(r["release"], r["status"]) for r in read_index(f"{s3}/releases")] == [("2025-01-30", "complete")]
    assert read_embeddings(f"{s3}/releases/2025-01-30/embeddings.zarr").n_obs == 2638
    again = embed_release(
        run,
        f"{s3}/releases",
        census_uri=census_uri,
        release="2025-01-30",
        settings=EmbedSettings(progress=False),
        echo=lambda *_: None,
    )
    assert again["action"] == "skipped"


@pytest.mark.slow
def test_unusable_object_storage_is_refused_in_words(s3, tmp_path):
    import json as json_
    import socket
    import subprocess
    import sys

    import boto3
    import moto.settings

    base = {**os.environ, "TQDM_DISABLE": "1", "AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_MODE": "standard"}
    shards = str(shared_file("pbmc3k_raw_seurat_annotations.h5ad"))

    def train(storage_path, **env):
        command = [
            sys.executable,
            "-m",
            "pipeline",
            "train",
            "--config",
            "configs/demo.yaml",
            f"data.path={tmp_path}",
            f"run.storage_path={storage_path}",
        ]
        return subprocess.run(
            command,
            capture_output=True,
            text=True,
            env={**base, **env},
            timeout=300,
            cwd=os.path.dirname(os.path.dirname(__file__)),
        )

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    unreachable = train(f"{s3}/runs", AWS_ENDPOINT_URL=f"http://127.0.0.1:{closed}")
    assert (
        unreachable.returncode == 2
        and f"cannot reach the object store at http://127.0.0.1:{closed}" in unreachable.stderr
    )

    no_credentials = {k: v for k, v in base.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    no_credentials.update(
        {
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
            "AWS_CONFIG_FILE": str(tmp_path / "none"),
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    )
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "shard", shards, "--out", f"{s3}/x", "--n-top-genes", "100"],
        capture_output=True,
        text=True,
        env=no_credentials,
        timeout=300,
    )
    assert result.returncode == 2 and "no credentials found" in result.stderr, result.stderr[-2000:]

    missing_bucket = train("s3://no-such-bucket-hvae/runs")
    assert missing_bucket.returncode == 2 and "the bucket does not exist" in missing_bucket.stderr, (
        missing_bucket.stderr[-2000:]
    )

    # A reader that may list and get but not put: moto checks IAM from here on.
    iam = boto3.client("iam")
    iam.create_user(UserName="reader")
    iam.put_user_policy(
        UserName="reader",
        PolicyName="read-only",
        PolicyDocument=json_.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": "*"}],
            }
        ),
    )
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
    try:
        denied = train(f"{s3}/runs", AWS_ACCESS_KEY_ID=key["AccessKeyId"], AWS_SECRET_ACCESS_KEY=key["SecretAccessKey"])
    finally:
        moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = float("inf")
    assert denied.returncode == 2 and "permission denied" in denied.stderr, denied.stderr[-2000:]
    assert "run.storage_path: s3://hvae-test/runs" in denied.stderr
