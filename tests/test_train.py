"""Training on shards: config validation, the local loop's exact resume, and Ray Train with
2 CPU workers (end to end on pbmc3k with a worker killed mid-run, and a restarted driver)."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import shared_file
from pipeline.train.checkpoint import CHECKPOINT_FORMAT, find_checkpoint, load_model, read_checkpoint
from pipeline.config import ConfigError, load_config

CLI = [sys.executable, "-m", "pipeline"]
ENV = {**os.environ, "TQDM_DISABLE": "1"}


def cli(*args, check=True, env=None):
    result = subprocess.run([*CLI, *args], capture_output=True, text=True, env={**ENV, **(env or {})})
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def metrics(run_dir, split="train"):
    lines = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return [l for l in lines if l["split"] == split]


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "shards"
    cli("simulate", str(out), "--format", "shards", "--n-cells", "3000", "--n-genes", "200", "--shard-size", "1000")
    return str(out)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"trian: unknown key"):
        load_config(base={"data": {"path": "x"}}, overrides=["trian.max_steps=3"])
    with pytest.raises(ConfigError, match=r"train.max_steps: Input should be a valid integer.*'abc'"):
        load_config(base={"data": {"path": "x"}}, overrides=["train.max_steps=abc"])
    with pytest.raises(ConfigError, match=r"train.precision: Input should be 'bf16', 'fp16' or 'fp32'"):
        load_config(base={"data": {"path": "x"}}, overrides=["train.precision=bf8"])
    with pytest.raises(ConfigError, match=r"override 'model.latent_dims=\[32, 16': the value '\[32, 16' is not YAML"):
        load_config(base={"data": {"path": "x"}}, overrides=["model.latent_dims=[32, 16"])
    (tmp_path / "c.yaml").write_text("data:\n  path: x\nmodel:\n  latent_dim: [4]\n")
    result = cli("train", "--config", str(tmp_path / "c.yaml"), check=False)
    assert result.returncode == 2 and "model.latent_dim: unknown key" in result.stderr


@pytest.mark.slow
def test_clear_errors_for_gpu_storage_and_genes(small_shards, tmp_path):
    base = [
        "train",
        f"data.path={small_shards}",
        "train.max_steps=4",
        "train.batch_size=64",
        "train.progress=false",
        f"run.storage_path={tmp_path}",
        "checkpoint.every_steps=2",
    ]
    if not torch.cuda.is_available():
        result = cli(*base, "scaling.use_gpu=true", check=False)
        assert result.returncode == 2 and "no CUDA device" in result.stderr
    (tmp_path / "a_file").write_text("")
    result = cli(*base, f"run.storage_path={tmp_path / 'a_file'}", check=False)
    assert result.returncode == 2 and "run.storage_path: cannot write" in result.stderr
    cli(*base, "run.name=genes")
    other = tmp_path / "other_genes"
    cli("simulate", str(other), "--format", "shards", "--n-cells", "500", "--n-genes", "150", "--shard-size", "500")
    result = cli(*base, "run.name=genes", f"data.path={other}", "train.max_steps=8", check=False)
    assert result.returncode == 2 and "was trained on 200 genes" in result.stderr


@pytest.mark.slow
def test_local_run_resumed_after_a_kill_matches_the_uninterrupted_run(small_shards, tmp_path):
    common = [
        "train",
        f"data.path={small_shards}",
        "data.batch_key=donor_id",
        "train.max_steps=40",
        "train.batch_size=64",
        "train.log_every=1",
        "checkpoint.every_steps=10",
        "train.progress=false",
        f"run.storage_path={tmp_path}",
    ]
    cli(*common, "run.name=straight")
    killed = cli(*common, "run.name=killed", check=False, env={"HVAE_FAIL_AT_STEP": "25"})
    assert (
        killed.returncode == 17 and read_checkpoint(find_checkpoint(tmp_path / "killed"))["train_state"]["step"] == 20
    )
    cli(*common, "run.name=killed")  # the same command again: resumes from step 20
    straight, resumed = metrics(tmp_path / "straight"), metrics(tmp_path / "killed")
    assert [m["step"] for m in resumed] == list(range(1, 41)), "a step was lost or counted twice"
    np.testing.assert_allclose([m["loss"] for m in resumed], [m["loss"] for m in straight], rtol=1e-5)
    a, _ = load_model(find_checkpoint(tmp_path / "straight"))
    b, parts = load_model(find_checkpoint(tmp_path / "killed"))
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)
    assert read_checkpoint(find_checkpoint(tmp_path / "killed"))["train_state"]["step"] == 40
    assert parts["batches"]["batch_key"] == "donor_id"
    again = cli(*common, "run.name=killed")
    assert "already finished at step 40" in again.stdout


def test_checkpoints_carry_a_format_version_and_model_pt_alone_loads_the_model(small_shards, tmp_path):
    base = [
        "train",
        f"data.path={small_shards}",
        "train.batch_size=64",
        "train.progress=false",
        f"run.storage_path={tmp_path}",
        "checkpoint.every_steps=2",
    ]
    cli(*base, "train.max_steps=2")
    directory = find_checkpoint(tmp_path / "hvae")
    saved = torch.load(directory / "model.pt", weights_only=False)
    assert saved["format_version"] == CHECKPOINT_FORMAT and len(saved["genes"]["feature_ids"]) == 200

    # model.pt alone is an inference checkpoint: embed-ready without trainer.pt or the JSON files.
    alone = tmp_path / "shipped"
    alone.mkdir()
    shutil.copy(directory / "model.pt", alone / "model.pt")
    model, parts = load_model(alone)
    assert model.config == load_model(directory)[0].config and parts["batches"]["batch_key"] is None
    assert find_checkpoint(alone) == alone

    # A format-2 model.pt (before molecule thinning and the read-out) and a format-3 one (before
    # the read-out) are read as the models they were trained as.
    def without_readout(weights):
        return {k: v for k, v in weights.items() if not k.removeprefix("module.").startswith("readout.")}

    assert len(without_readout(saved["ema"])) < len(saved["ema"])
    for version, added in ((2, {"molecule_thinning": 0.0, "readout_weight": 0.0}), (3, {"readout_weight": 0.0})):
        old = {
            **saved,
            "format_version": version,
            "model": without_readout(saved["model"]),
            "ema": without_readout(saved["ema"]),
            "hvae_config": {k: v for k, v in saved["hvae_config"].items() if k not in added},
        }
        torch.save(old, alone / "model.pt")
        old_model, _ = load_model(alone)
        assert old_model.config == model.config.replace(**added) and old_model.readout is None
        torch.testing.assert_close(old_model.state_dict(), without_readout(model.state_dict()))

    # A checkpoint of another format (here: written before versions existed) is refused in words,
    # and continuing the run from it too; nothing is written over it.
    del saved["format_version"]
    torch.save(saved, directory / "model.pt")
    with pytest.raises(
        ValueError, match="has checkpoint format 1; this version of hvae-pipeline reads formats 2, 3, 4"
    ):
        load_model(directory)
    refused = cli(*base, "train.max_steps=4", check=False)
    assert refused.returncode != 0 and "checkpoint format 1" in refused.stderr, refused.stderr
    assert find_checkpoint(tmp_path / "hvae") == directory


@pytest.mark.slow
def test_gene_modules_are_built_once_by_the_driver_and_resumed_from_the_checkpoint(small_shards, tmp_path):
    base = [
        "train",
        f"data.path={small_shards}",
        "train.batch_size=64",
        "train.progress=false",
        f"run.storage_path={tmp_path}",
        "checkpoint.every_steps=2",
        "model.module_levels=[[4,3],[8,5]]",
        "model.latent_dims=[6,4,2]",
        "model.hidden_dim=16",
    ]
    first = cli(*base, "train.max_steps=2")
    assert re.search(r"gene modules for the top 2 level\(s\): 4 modules, 8 modules, from 3,000 cells", first.stdout)
    run = tmp_path / "hvae"
    partitions = load_model(find_checkpoint(run))[0].config.gene_modules
    assert [len(p) for p in partitions] == [200, 200]
    assert "gene_modules: []" in (run / "config.yaml").read_text()  # the run's config as written, not 400 numbers
    resumed = cli(*base, "train.max_steps=4")
    assert "gene modules for" not in resumed.stdout  # taken from the checkpoint, not built again
    model = load_model(find_checkpoint(run))[0]
    assert model.config.gene_modules == partitions and read_checkpoint(find_checkpoint(run))["train_state"]["step"] == 4


@pytest.mark.slow
def test_a_damaged_checkpoint_is_passed_over_for_the_previous_complete_one(small_shards, tmp_path):
    base = [
        "train",
        f"data.path={small_shards}",
        "train.batch_size=64",
        "train.progress=false",
        f"run.storage_path={tmp_path}",
        "checkpoint.every_steps=2",
        "train.early_stopping=false",
    ]
    cli(*base, "train.max_steps=4")
    newest = find_checkpoint(tmp_path / "hvae")
    assert newest.name == "checkpoint_00000004"
    data = (newest / "model.pt").read_bytes()
    (newest / "model.pt").write_bytes(data[: len(data) // 3])  # truncated on disk after the run
    resumed = cli(*base, "train.max_steps=6")
    assert "checkpoint_00000004 cannot be read back" in resumed.stdout and "falling back" in resumed.stdout
    assert "from checkpoint_00000002 (step 2)" in resumed.stdout
    assert read_checkpoint(find_checkpoint(tmp_path / "hvae"))["train_state"]["step"] == 6
    for path in (tmp_path / "hvae").glob("checkpoint_*/trainer.pt"):  # every one damaged: named, refused
        path.write_bytes(b"not a torch file")
    refused = cli(*base, "train.max_steps=8", check=False)
    assert refused.returncode == 2 and "every checkpoint of" in refused.stderr and "is damaged" in refused.stderr


def test_the_pipeline_model_section_is_hvae_config_and_is_validated_when_loaded(small_shards, tmp_path):
    """configs' `model:` section is derived from HVAEConfig (minus what the data decides), and its
    bounds are HVAEConfig's: a bad value fails when the config is loaded, before anything is written."""
    import dataclasses

    from hvae import HVAEConfig
    from pipeline.config import ModelConfig

    model_defaults = {f.name: f.default for f in dataclasses.fields(HVAEConfig)}
    section = ModelConfig().model_dump()
    assert set(model_defaults) - set(section) == {"n_genes", "n_batches", "validate_inputs"}
    for name, value in section.items():
        assert value == model_defaults[name], name
    for override, message in [
        ("model.dropout=1.5", "model.dropout: must be in [0, 1) (got 1.5)"),
        ("model.hidden_dim=0", "model.hidden_dim: must be a positive integer (got 0)"),
        ("model.latent_dims=[16,0]", "model.latent_dims: must be one or more positive integers"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(base={"data": {"path": "x"}}, overrides=[override])
    result = cli("train", f"data.path={small_shards}", f"run.storage_path={tmp_path}", "model.dropout=1.5", check=False)
    assert result.returncode == 2 and "model.dropout: must be in [0, 1)" in result.stderr
    assert not (tmp_path / "hvae").exists(), "a run directory was written for a config that does not validate"


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.ray
def test_ray_two_workers_on_pbmc3k_survive_a_killed_worker(ray_cluster, tmp_path, monkeypatch):
    from pipeline.config import load_config
    from pipeline.data import ShardSettings, open_source, write_shards
    from pipeline.train.launch import train

    shards = tmp_path / "pbmc3k"
    write_shards(
        open_source(str(shared_file("pbmc3k_raw_seurat_annotations.h5ad"))),
        str(shards),
        ShardSettings(shard_size=700, n_top_genes=1000, progress=False),
    )
    config = load_config(
        base={"data": {"path": str(shards), "validation_shards": 1}},
        overrides=[
            "scaling.num_workers=2",
            "run.max_failures=1",
            "train.max_steps=240",
            "train.batch_size=128",
            "train.log_every=10",
            "train.validate_every=240",
            "train.kl_warmup_steps=100",
            "checkpoint.every_steps=60",
            "train.progress=false",
            f"run.storage_path={tmp_path / 'runs'}",
            "run.name=pbmc3k",
        ],
    )
    monkeypatch.setenv("HVAE_FAIL_AT_STEP", "70:1")  # rank 1 exits once at step 70 (pipeline.faults)
    summary = train(config)
    run_dir = tmp_path / "runs" / "pbmc3k"
    assert (run_dir / ".failed_at_70").exists(), "the fault was not injected"
    assert summary["step"] == 240
    steps = [m["step"] for m in metrics(run_dir)]
    assert steps == sorted(set(steps)) and steps[-1] == 240, f"steps counted twice or lost: {steps}"
    losses = [m["negative_elbo"] for m in metrics(run_dir)]
    assert np.mean(losses[-5:]) < 0.9 * losses[0]
    validation = metrics(run_dir, "validation")[-1]
    for level in range(3):
        assert validation[f"active_units_level_{level}"] >= 1 and validation[f"kl_level_{level}"] > 0.1, validation
    model, _ = load_model(find_checkpoint(run_dir))
    assert read_checkpoint(find_checkpoint(run_dir))["train_state"]["world_size"] == 2 and model.config.n_genes == 1000


@pytest.mark.slow
@pytest.mark.ray
def test_ray_driver_rerun_continues_from_the_checkpoint(ray_cluster, small_shards, tmp_path, monkeypatch):
    from pipeline.config import load_config
    from pipeline.train.launch import train

    monkeypatch.chdir(tmp_path)  # relative paths, as users type them (Ray workers run elsewhere)
    relative = os.path.relpath(small_shards, tmp_path)

    def config(max_steps):
        return load_config(
            base={"data": {"path": relative}},
            overrides=[
                "scaling.num_workers=2",
                f"train.max_steps={max_steps}",
                "train.batch_size=64",
                "train.log_every=1",
                "checkpoint.every_steps=10",
                "train.progress=false",
                "run.storage_path=.",
                "run.name=grow",
            ],
        )

    train(config(20))
    first = read_checkpoint(find_checkpoint(tmp_path / "grow"))["train_state"]
    train(config(40))  # a new driver: picks up at step 20 with the loader position
    steps = [m["step"] for m in metrics(tmp_path / "grow")]
    assert steps == list(range(1, 41))
    state = read_checkpoint(find_checkpoint(tmp_path / "grow"))["train_state"]
    assert state["step"] == 40 and first["step"] == 20
    assert (state["epoch"], state["batches_yielded"]) == (1, 16) and (first["epoch"], first["batches_yielded"]) == (
        0,
        20,
    )


@pytest.mark.slow
def test_training_stops_early_on_the_held_out_elbo_and_keeps_the_best_weights(tmp_path):
    """300 cells, 100 of them held out: the held-out -ELBO rises 1% (the tolerance set here) above its best well before
    3,000 steps; the run stops, its checkpoint holds the best validation's EMA weights, and a
    rerun does not train again."""
    shards, tolerance = tmp_path / "tiny", 0.01
    cli("simulate", str(shards), "--format", "shards", "--n-cells", "300", "--n-genes", "200", "--shard-size", "100")
    common = [
        "train",
        f"data.path={shards}",
        "data.validation_shards=1",
        "train.max_steps=3000",
        "train.batch_size=64",
        "train.validate_every=10",
        "train.kl_warmup_steps=20",
        f"train.early_stopping_tolerance={tolerance}",
        "checkpoint.every_steps=5000",
        "train.progress=false",
        "model.hidden_dim=64",
        f"run.storage_path={tmp_path}",
        "run.name=early",
    ]
    first = cli(*common)
    assert (
        "training on cpu x 1: 200 cells x 200 genes, 0 batches" in first.stdout
        and "KL warm-up 20 steps" in first.stdout
    )
    state = read_checkpoint(find_checkpoint(tmp_path / "early"))["train_state"]
    assert state["stopped_early"] and state["finished"] and state["step"] < 3000, state
    validations = metrics(tmp_path / "early", "validation")
    best = min(validations, key=lambda m: m["negative_elbo"])
    assert state["best_step"] == best["step"] and state["step"] == validations[-1]["step"] > best["step"]
    rise = 1 + tolerance
    assert validations[-1]["negative_elbo"] > rise * best["negative_elbo"]
    values = [m["negative_elbo"] for m in validations]
    assert all(v <= rise * min(values[: i + 1]) for i, v in enumerate(values[:-1]))  # it stopped at the first rise
    model, _ = load_model(find_checkpoint(tmp_path / "early"))
    assert model.config.n_genes == 200
    again = cli(*common)
    assert f"already stopped early at step {state['step']}, keeping step {best['step']}'s weights" in again.stdout
