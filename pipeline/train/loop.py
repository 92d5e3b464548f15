"""The training loop on shards: plain PyTorch, one function per worker, no Ray inside.

``train_worker`` is what every rank runs (Ray Train calls it on each worker; the local backend
calls it once). Rank and world size are passed in; hooks hand checkpoints and metrics to
whoever runs it. Everything a resumed run needs is in the checkpoint: weights, EMA, optimizer,
scaler, step, and the loader position (epoch, batches consumed), identical on every rank because
every rank gets the same number of batches and skips the same non-finite steps.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from hvae import HierarchicalVAE, active_units

from .checkpoint import check_genes, check_model_config, read_checkpoint, save_checkpoint
from .. import faults
from ..config import PipelineConfig
from ..data import ShardedDataset
from ..data import densify
from .step import EarlyStopping, Trainer, format_kl

CheckpointHook = Callable[[str | None, dict], None]


def split_datasets(config: PipelineConfig) -> tuple[ShardedDataset, ShardedDataset | None]:
    """Training shards and the held-out validation shards (the last ``validation_shards``)."""
    full = ShardedDataset(config.data.path)
    n_shards, n_val = len(full.shard_paths), config.data.validation_shards
    if n_val == 0:
        return full, None
    if n_val >= n_shards:
        raise ValueError(
            f"data.validation_shards={n_val} leaves no training shards ({config.data.path} has {n_shards})"
        )
    return (
        ShardedDataset(config.data.path, subset=list(range(n_shards - n_val))),
        ShardedDataset(config.data.path, subset=list(range(n_shards - n_val, n_shards))),
    )


STAGING_PREFIX = ".hvae-ckpt-"  # a checkpoint being written (a killed run leaves it; the next run clears it)


def train_worker(
    config: PipelineConfig,
    rank: int,
    world_size: int,
    device: torch.device | str,
    restore: str | None,
    save_hook: CheckpointHook,
    metrics_path: str | None = None,
    staging: str | None = None,
) -> dict:
    """Train until ``train.max_steps``; returns a summary. ``save_hook(dir_or_None, metrics)`` is
    called on every rank at every checkpoint (rank 0 passes the directory it wrote, a temporary
    directory under ``staging``, default the system's temporary directory)."""
    device = torch.device(device)
    train, validation = split_datasets(config)
    key = config.data.batch_key
    categories = train.categories(key) if key else []
    hvae_config = config.model.hvae_config(train.n_vars, len(categories))
    torch.manual_seed(config.train.seed)  # the same initial weights on every rank
    trainer = Trainer(HierarchicalVAE(hvae_config), config.train, device=device)
    loader = train.loader(
        config.train.batch_size,
        rank=rank,
        world_size=world_size,
        seed=config.train.seed,
        num_workers=config.data.loader_workers,
        prefetch=config.data.prefetch,
        batch_key=key,
        block_rows=config.data.block_rows,
        window_blocks=config.data.window_blocks,
        segment_rows=config.data.segment_rows,
    )
    epoch = 0
    stopper = (
        EarlyStopping(config.train.early_stopping_tolerance)
        if validation is not None and config.train.early_stopping
        else None
    )
    if restore is not None:
        epoch = _restore(trainer, loader, restore, train, categories, world_size, stopper)
        _reseed(config.train.seed, trainer.step_count, rank)
    logger = _MetricsLog(metrics_path if rank == 0 else None, resume_step=trainer.step_count)
    if trainer.step_count >= config.train.max_steps:
        return {"step": trainer.step_count, "finished": True, "resumed_finished_run": True}

    max_steps, started, cells = config.train.max_steps, time.perf_counter(), 0
    if rank == 0:
        print(_startup_line(config, trainer, train, world_size, device), flush=True)
    bar = _progress(config, rank, trainer.step_count)
    last_validation = None
    stopped = False
    while trainer.step_count < max_steps and not stopped:
        loader.set_epoch(epoch) if loader.state_dict()["epoch"] != epoch else None
        for batch in loader:
            trainer.step(batch)
            cells += batch["counts"].shape[0] * world_size
            step = trainer.step_count
            faults.maybe_fail_training(config.run_dir, rank, step)
            faults.point("train.step")
            if bar is not None:
                bar.update(1)
            if validation is not None and (step % config.train.validate_every == 0 or step == max_steps):
                if rank == 0:
                    result = last_validation = validate(trainer.ema_model, validation, config, device)
                    logger.write({"step": step, "split": "validation", **result})
                    stopped = stopper is not None and stopper.update(step, result["negative_elbo"], trainer.ema_model)
                stopped = _from_rank0(stopped, device)  # every rank stops at the same step
                if stopped and rank == 0:
                    stopper.restore(trainer.ema_model)
            logging = step % config.train.log_every == 0 or step == max_steps or stopped
            checkpointing = step % config.checkpoint.every_steps == 0 or step == max_steps or stopped
            # The one host read of a step, and only on logging and checkpoint steps.
            metrics = trainer.read_metrics() if logging or checkpointing else None
            if logging:
                rate = cells / max(time.perf_counter() - started, 1e-9)
                logger.write({**metrics, "split": "train", "epoch": epoch, "cells_per_s": rate})
                kl = format_kl(metrics)
                if bar is not None:
                    bar.set_postfix_str(f"{rate:,.0f} cells/s  -ELBO {metrics['negative_elbo']:.1f}  KL {kl}")
                elif rank == 0 and config.train.progress:
                    remaining = (max_steps - step) * cells / max(rate * step, 1e-9) if step else 0.0
                    print(
                        f"step {step:,}/{max_steps:,}  {rate:,.0f} cells/s  ETA {remaining / 60:.1f} min  "
                        f"-ELBO {metrics['negative_elbo']:.1f}  KL {kl}",
                        flush=True,
                    )
            if checkpointing:
                position = loader.state_dict()
                state = {
                    "step": step,
                    "epoch": position["epoch"],
                    "batches_yielded": position["batches_yielded"],
                    "world_size": world_size,
                    "batch_size": config.train.batch_size,
                    "seed": config.train.seed,
                    "max_steps": max_steps,
                    "finished": step >= max_steps or stopped,
                    "stopped_early": stopped,
                }
                if stopper is not None:
                    state["best_step"] = stopper.best_step
                _checkpoint(
                    trainer,
                    hvae_config,
                    config,
                    state,
                    train.feature_ids,
                    key,
                    categories,
                    rank,
                    save_hook,
                    {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                    stopper,
                    staging,
                )
                _reseed(config.train.seed, step, rank)
            if step >= max_steps or stopped:
                break
        else:
            epoch += 1
    if bar is not None:
        bar.close()
    if rank == 0:
        n_levels = hvae_config.n_levels
        kl = [last_validation[f"kl_level_{l}"] for l in range(n_levels)] if last_validation else None
        units = [last_validation[f"active_units_level_{l}"] for l in range(n_levels)] if last_validation else None
        for line in end_of_run_warnings(trainer.step_count, config.train.warmup_steps, kl, units):
            print(f"warning: {line}", flush=True)
    summary = {
        "step": trainer.step_count,
        "skipped_steps": trainer.skipped_steps,
        "finished": True,
        "seconds": time.perf_counter() - started,
        "cells_per_s": cells / max(time.perf_counter() - started, 1e-9),
    }
    if stopper is not None:
        summary.update({"stopped_early": stopped, "best_step": stopper.best_step})
    return summary


def _from_rank0(flag: bool, device: torch.device) -> bool:
    """Rank 0's decision, on every rank (a broadcast when distributed; validation steps only)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.broadcast(value, src=0)
    return bool(value.item() > 0.5)


def _reseed(seed: int, step: int, rank: int) -> None:
    """Dropout's random stream restarts at every checkpoint from (seed, step, rank), so a run
    resumed from a checkpoint continues exactly as the uninterrupted run would have."""
    torch.manual_seed((seed * 1_000_003 + step) * 1_009 + rank)


def _restore(
    trainer: Trainer,
    loader,
    restore: str,
    train: ShardedDataset,
    categories: list[str],
    world_size: int,
    stopper: EarlyStopping | None,
) -> int:
    parts = read_checkpoint(restore)
    check_genes(parts, train.feature_ids, train.path)
    if parts["batches"]["categories"] != list(categories):
        raise ValueError(
            f"checkpoint {restore} has batch categories {parts['batches']['categories'][:5]}... "
            f"but {train.path} has {list(categories)[:5]}...: the batch embedding rows would not match"
        )
    check_model_config(parts, trainer.model.config)
    trainer.load_state_dict({"model": parts["model"], "ema": parts["ema"], **parts["trainer"]})
    if stopper is not None and parts["trainer"].get("early_stopping"):
        stopper.load_state_dict(parts["trainer"]["early_stopping"])
    state = parts["train_state"]
    epoch, position = int(state["epoch"]), int(state["batches_yielded"])
    if state.get("world_size") != world_size or state.get("batch_size") != loader.batch_size:
        position = 0  # another partition of the data: restart the interrupted epoch from its start
    if position >= len(loader):  # the checkpoint closed an epoch
        epoch, position = epoch + 1, 0
    loader.load_state_dict({**loader.state_dict(), "epoch": epoch, "batches_yielded": position})
    return epoch


def _checkpoint(
    trainer,
    hvae_config,
    config,
    state,
    feature_ids,
    key,
    categories,
    rank,
    save_hook,
    metrics,
    stopper: EarlyStopping | None,
    staging: str | None,
) -> None:
    if rank != 0:
        save_hook(None, metrics)
        return
    with tempfile.TemporaryDirectory(prefix=STAGING_PREFIX, dir=staging) as tmp:
        save_checkpoint(
            tmp,
            trainer,
            hvae_config,
            config.to_yaml(),
            state,
            feature_ids,
            key,
            categories,
            extra_trainer_state={"early_stopping": stopper.state_dict()} if stopper is not None else None,
        )
        save_hook(tmp, metrics)


@torch.no_grad()
def validate(model: HierarchicalVAE, dataset: ShardedDataset, config: PipelineConfig, device: torch.device) -> dict:
    """Per-level KL, active units and reconstruction on up to ``train.validation_cells`` held-out cells."""
    model.eval()
    means, kl, reconstruction, n = [], None, 0.0, 0
    for batch in dataset.loader(
        min(1024, config.train.validation_cells),
        seed=0,
        batch_key=config.data.batch_key,
        segment_rows=config.data.segment_rows,
        prefetch=1,
    ):
        counts = densify(batch["counts"], device)
        index = batch.get("batch_index")
        index = index.to(device) if index is not None else None
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(n)  # the same noise at every validation: they compare the weights
            out = model(counts, index)
        weight = counts.shape[0]
        kl = out.kl * weight if kl is None else kl + out.kl * weight
        reconstruction += float(out.reconstruction.sum())
        means.append([m.float().cpu() for m in model.encode_latents(counts)])
        n += weight
        if n >= config.train.validation_cells:
            break
    per_level = [torch.cat([m[level] for m in means]) for level in range(len(means[0]))]
    units = active_units(per_level)
    return {
        "negative_elbo": (reconstruction + float(kl.sum())) / n,
        "reconstruction": reconstruction / n,
        "cells": n,
        **{f"kl_level_{l}": float(v) / n for l, v in enumerate(kl)},
        **{f"active_units_level_{l}": int(u) for l, u in enumerate(units)},
    }


class _MetricsLog:
    """JSON lines plus TensorBoard scalars, rank 0 only. On resume, lines past the checkpoint's
    step are dropped first (and TensorBoard events purged from that step), so the steps replayed
    after a failure are never counted twice."""

    def __init__(self, path: str | None, resume_step: int) -> None:
        self.path = path
        self.tensorboard = None
        if path is None:
            return
        try:
            from tensorboardX import SummaryWriter

            self.tensorboard = SummaryWriter(
                str(Path(path).parent / "tensorboard"), purge_step=resume_step + 1 if resume_step else None
            )
        except ImportError:  # optional: JSONL always works
            pass
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        if os.path.exists(path):
            kept = [
                line
                for line in Path(path).read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            tmp = path + ".tmp"
            Path(tmp).write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a") as handle:
            handle.write(json.dumps({**clean, "time": time.time()}) + "\n")
        if self.tensorboard is not None:
            split = record.get("split", "train")
            for key, value in clean.items():
                if (
                    key not in ("step", "split", "epoch")
                    and isinstance(value, (int, float))
                    and not isinstance(value, bool)
                ):
                    self.tensorboard.add_scalar(f"{split}/{key}", value, record["step"])
            self.tensorboard.flush()


def _progress(config: PipelineConfig, rank: int, initial: int):
    """A progress bar on a terminal; None elsewhere (a cluster job's log gets a plain line per
    logging step instead of one per refresh)."""
    if rank != 0 or not config.train.progress or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=config.train.max_steps, initial=initial, unit="step", desc="training", dynamic_ncols=True)


def _startup_line(config: PipelineConfig, trainer: Trainer, train: ShardedDataset, world_size: int, device) -> str:
    cells_per_step = config.train.batch_size * world_size
    parameters = sum(p.numel() for p in trainer.model.parameters())
    epochs = config.train.max_steps * cells_per_step / max(train.n_obs, 1)
    return (
        f"training on {device} x {world_size}: {train.n_obs:,} cells x {train.n_vars:,} genes, "
        f"{trainer.model.config.n_batches} batches; {parameters:,} parameters, levels {trainer.model.config.latent_dims}; "
        f"{config.train.max_steps:,} steps of {cells_per_step:,} cells ({epochs:.1f} epochs), KL warm-up "
        f"{config.train.warmup_steps:,} steps, {config.train.precision}"
    )


def end_of_run_warnings(step: int, warmup_steps: int, kl: list[float] | None, units: list[int] | None) -> list[str]:
    """What a user should know when a run ends: an unfinished warm-up, a level holding almost nothing."""
    warnings = []
    if step < warmup_steps:
        warnings.append(
            f"training ended at step {step:,}, before the KL warm-up finished ({warmup_steps:,} steps): the "
            "model was trained with a down-weighted KL; train longer or set train.kl_warmup_steps"
        )
    for level, value in enumerate(kl or []):
        if value < 0.5:
            warnings.append(f"level {level} holds {value:.2f} nats per cell (< 0.5): it carries almost nothing")
    for level, count in enumerate(units or []):
        if count < 2:
            warnings.append(f"level {level} has {count} active unit(s) (< 2): it is nearly one-dimensional")
    return warnings


__all__ = ["train_worker", "validate", "split_datasets"]
