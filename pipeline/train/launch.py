"""``train``: the local single-process backend and the thin Ray Train (V2) driver.

Both run ``train_loop.train_worker``; Ray adds processes, the process group, checkpoint
persistence and restarts. Run directory ``<run.storage_path>/<run.name>/``::

    config.yaml          the resolved config (written by the driver)
    metrics.jsonl        one line per logged step (train) and per validation
    checkpoint_<step>/   checkpoints (see pipeline.train.checkpoint); ``latest`` names the newest
    summary.json         written when the run finishes

Rerunning the same command resumes from the latest checkpoint; a finished run is not retrained.
``run.storage_path`` may be an object-storage URL (``s3://bucket/runs``): Ray persists its
checkpoints there itself; the local backend uploads each checkpoint (``train_state.json`` last, so
a listed checkpoint is complete) and rank 0 keeps ``metrics.jsonl`` and ``tensorboard/`` in a
local mirror that it uploads at every checkpoint and at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import scipy.sparse as sp
import torch

from hvae import fit_gene_modules
from hvae.modules import SAMPLE_CELLS

from .. import faults, storage
from ..lease import Lease, check_generation
from .checkpoint import (
    check_genes,
    fetch_checkpoint,
    find_checkpoint,
    prune_checkpoints,
    read_model_file,
    read_train_state,
    resumable_checkpoint,
    write_latest,
)
from ..config import PipelineConfig
from .loop import STAGING_PREFIX, split_datasets, train_worker


def train(config: PipelineConfig, echo=print) -> dict:
    """Train as configured; returns the summary (also written to ``summary.json``)."""
    if not storage.is_url(config.data.path):  # Ray workers do not run in this directory: absolute paths
        config = config.model_copy(
            update={"data": config.data.model_copy(update={"path": str(Path(config.data.path).resolve())})}
        )
    run_dir = config.run_dir if storage.is_url(config.run_dir) else str(Path(config.run_dir).resolve())
    _check_storage(run_dir)
    _check_gpu(config)
    with Lease(run_dir, "training", wait=config.run.wait, echo=echo) as lease:  # one writer per run directory
        return _train(config, run_dir, lease, echo)


def _train(config: PipelineConfig, run_dir: str, lease: Lease, echo) -> dict:
    _clear_staging(run_dir)
    previous = resumable_checkpoint(run_dir, echo)
    summary_file = storage.join(run_dir, "summary.json")
    if previous is not None:
        state = read_train_state(previous)  # the driver needs the step, not the weights
        if state.get("finished") and (state["step"] >= config.train.max_steps or state.get("stopped_early")):
            how = (
                f"stopped early at step {state['step']}, keeping step {state.get('best_step')}'s weights"
                if state.get("stopped_early")
                else f"finished at step {state['step']}"
            )
            echo(f"run {run_dir} already {how} ({storage.basename(previous)}); nothing to train")
            return json.loads(storage.read_text(summary_file)) if storage.exists(summary_file) else state
        echo(f"resuming run {run_dir} from {storage.basename(previous)} (step {state['step']})")
    storage.write_text(storage.join(run_dir, "config.yaml"), config.to_yaml())
    config = _with_gene_modules(config, previous, echo)
    started = time.time()
    if config.scaling.num_workers == 0:
        result = _train_local(config, run_dir, previous, lease)
    else:
        result = _train_ray(config, run_dir, previous, lease, echo)
    latest = find_checkpoint(run_dir)
    summary = {
        **result,
        "run_dir": run_dir,
        "checkpoint": str(latest) if latest else None,
        "wall_seconds": round(time.time() - started, 2),
        "num_workers": config.scaling.num_workers,
    }
    storage.write_text(summary_file, json.dumps(summary, indent=1))
    return summary


def _with_gene_modules(config: PipelineConfig, previous, echo) -> PipelineConfig:
    """The config with the gene modules ``model.module_levels`` asks for: a resumed run's from its
    checkpoint, a new run's built here, once, from the first 20,000 cells of the training shards
    (the shards are shuffled: a random sample), and handed to every worker."""
    model = config.model
    if model.gene_modules:
        return config
    train, _ = split_datasets(config)
    key = config.data.batch_key
    hvae_config = model.hvae_config(train.n_vars, len(train.categories(key)) if key else 0)
    if not hvae_config.module_levels:  # none asked for (module_levels left to the depth asks for some)
        return config
    if previous is not None:
        parts = read_model_file(fetch_checkpoint(previous)[0])
        check_genes(parts, train.feature_ids, train.path)  # its partitions are of its genes
        partitions = parts["hvae_config"].gene_modules
    else:
        started = time.time()
        blocks, cells = [], 0
        for shard in range(len(train.shard_paths)):
            rows = min(int(train.shard_sizes[shard]), SAMPLE_CELLS - cells)
            indptr, indices, data = train.shard(shard).read(0, rows)
            blocks.append(sp.csr_matrix((data, indices, indptr), shape=(rows, train.n_vars)))
            cells += rows
            if cells >= SAMPLE_CELLS:
                break
        partitions = fit_gene_modules(hvae_config, sp.vstack(blocks, format="csr")).gene_modules
        sizes = ", ".join(f"{len(set(p))} modules" for p in partitions)
        echo(
            f"gene modules for the top {len(partitions)} level(s): {sizes}, from {cells:,} cells "
            f"({time.time() - started:.1f} s)"
        )
    return config.model_copy(update={"model": model.model_copy(update={"gene_modules": partitions})})


def _clear_staging(run_dir: str) -> None:
    """What a killed local run leaves in its directory: a checkpoint being written or being renamed."""
    if storage.is_url(run_dir) or not Path(run_dir).exists():
        return
    for entry in Path(run_dir).iterdir():
        if entry.is_dir() and (
            entry.name.startswith(STAGING_PREFIX)
            or (entry.name.startswith(".checkpoint_") and entry.name.endswith(".partial"))
        ):
            shutil.rmtree(entry)


def _partial_name(checkpoint_name: str) -> str:
    """A local checkpoint copied under this name, then renamed: what a killed copy leaves."""
    return f".{checkpoint_name}.partial"


def _check_storage(run_dir: str) -> None:
    try:
        storage.check_writable(run_dir)
    except storage.StorageError as error:
        raise ValueError(f"run.storage_path: {error}") from None


class _MetricsMirror:
    """Where rank 0 writes metrics.jsonl and tensorboard/: the run directory itself when local; for
    a remote run, a local directory seeded from the remote metrics and uploaded by ``sync``."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir, self.remote = run_dir, storage.is_url(run_dir)
        self.local = Path(tempfile.mkdtemp(prefix="hvae-metrics-")) if self.remote else Path(run_dir)
        remote_metrics = storage.join(run_dir, "metrics.jsonl")
        if self.remote and storage.exists(remote_metrics):
            (self.local / "metrics.jsonl").write_text(storage.read_text(remote_metrics))

    @property
    def metrics_path(self) -> str:
        return str(self.local / "metrics.jsonl")

    def sync(self) -> None:
        if not self.remote:
            return
        if (self.local / "metrics.jsonl").exists():
            storage.upload(self.local / "metrics.jsonl", storage.join(self.run_dir, "metrics.jsonl"))
        if (self.local / "tensorboard").exists():
            storage.upload(self.local / "tensorboard", storage.join(self.run_dir, "tensorboard"))

    def close(self) -> None:
        """The last upload; a remote run's local mirror is then deleted."""
        self.sync()
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)


def _check_gpu(config: PipelineConfig) -> None:
    if not config.scaling.use_gpu:
        return
    if config.scaling.num_workers == 0 and not torch.cuda.is_available():
        raise ValueError("scaling.use_gpu is true but this machine has no CUDA device (set scaling.use_gpu=false)")


def _train_local(config: PipelineConfig, run_dir: str, previous, lease: Lease) -> dict:
    device = torch.device("cuda" if config.scaling.use_gpu else "cpu")
    mirror = _MetricsMirror(run_dir)

    def save(directory: str | None, metrics: dict) -> None:
        lease.check()
        name = f"checkpoint_{int(metrics['step']):08d}"
        if mirror.remote:
            storage.upload(Path(directory), storage.join(run_dir, name), last="train_state.json")
        else:
            target, partial = Path(run_dir) / name, Path(run_dir) / _partial_name(name)
            shutil.copytree(directory, partial)
            faults.point("checkpoint.copied")
            if target.exists():  # the same step saved again (a rerun): replaced once the copy is complete
                shutil.rmtree(target)
            os.replace(partial, target)
        faults.point("checkpoint.renamed")
        write_latest(run_dir, name)
        faults.point("checkpoint.latest")
        prune_checkpoints(run_dir, config.checkpoint.keep)
        mirror.sync()

    restore = str(fetch_checkpoint(previous)[0]) if previous is not None else None
    try:
        return train_worker(
            config, 0, 1, device, restore, save, mirror.metrics_path, staging=None if mirror.remote else run_dir
        )
    finally:
        mirror.close()


def _train_ray(config: PipelineConfig, run_dir: str, previous, lease: Lease, echo=print) -> dict:
    import ray
    from ray.exceptions import ActorDiedError
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True, configure_logging=False)
    if config.scaling.use_gpu:
        gpus = ray.cluster_resources().get("GPU", 0)
        if gpus < config.scaling.num_workers:
            raise ValueError(
                f"scaling.use_gpu is true with {config.scaling.num_workers} workers but the Ray cluster has {gpus:g} GPUs"
            )

    def trainer() -> TorchTrainer:
        return TorchTrainer(
            _ray_worker,
            train_loop_config={
                "config": config.model_dump(mode="json"),
                "run_dir": run_dir,
                "faults": faults.forwarded(),
                "previous": None if previous is None else str(previous),
                "lease": [lease.output, lease.generation],
            },
            scaling_config=ScalingConfig(
                num_workers=config.scaling.num_workers,
                use_gpu=config.scaling.use_gpu,
                resources_per_worker=config.scaling.resources_per_worker,
            ),
            run_config=RunConfig(
                name=config.run.name,
                storage_path=run_dir.rstrip("/").rsplit("/", 1)[0],
                failure_config=FailureConfig(max_failures=config.run.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=config.checkpoint.keep),
            ),
        )

    try:
        result = trainer().fit()
    except ActorDiedError as error:
        # Ray cancelled Train's controller before it ran (a loaded machine): nothing was trained, start once more
        if "never ran" not in str(error):
            raise
        echo(f"Ray Train's controller was cancelled before it started ({error.actor_id}); starting it once more")
        result = trainer().fit()
    metrics = dict(result.metrics or {})
    return {"step": int(metrics.get("step", 0)), "finished": True, "final_metrics": metrics}


def _ray_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker: rank, world size, device and checkpoint from Ray's context."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    faults.install(loop_config.get("faults", {}))
    config = PipelineConfig.model_validate(loop_config["config"])
    run_dir = loop_config["run_dir"]
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and loop_config.get("previous"):  # the run's checkpoint the driver chose and read back
        checkpoint = Checkpoint.from_directory(str(fetch_checkpoint(loop_config["previous"])[0]))
    mirror = _MetricsMirror(run_dir) if rank == 0 else None

    def save(directory: str | None, metrics: dict) -> None:
        if rank == 0 and loop_config.get("lease", [None, None])[1] is not None:  # the driver's lease still ours?
            check_generation(*loop_config["lease"])
        name = f"checkpoint_{int(metrics['step']):08d}"
        ray.train.report(
            metrics, checkpoint=Checkpoint.from_directory(directory) if directory else None, checkpoint_dir_name=name
        )
        if rank == 0:  # report returns once the checkpoint is persisted
            write_latest(run_dir, name)
            mirror.sync()

    with checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext(None) as restore:
        try:
            train_worker(config, rank, world_size, device, restore, save, mirror.metrics_path if mirror else None)
        finally:
            if mirror is not None:
                mirror.close()
