"""The Ray-free training core: one optimisation step, mixed precision, EMA, skip-on-non-finite.

The Ray Train driver wraps this; unit tests and benchmarks run it directly on the CPU.
Nothing here knows about Ray, files or configs: rank-level decisions that must agree
across workers (skipping a non-finite step) go through ``torch.distributed`` when it is
initialised and are local otherwise.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterable, Iterator

import numpy as np
import scipy.sparse as sp
import torch
import torch.distributed as dist
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from hvae import HierarchicalVAE, kl_warmup

from ..config import TrainConfig
from ..data.loader import densify

def autocast_context(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class Trainer:
    """Owns the model, its EMA copy, the optimizer and the grad scaler; ``step`` does one update.

    Every rank calls ``step`` on its own batch. The non-finite check is all-reduced, so all
    ranks skip the same steps and never drift apart.
    """

    def __init__(self, model: HierarchicalVAE, settings: TrainConfig, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.settings = settings
        self.model = model.to(self.device)
        # Under torch.distributed the forward pass goes through DDP (gradient all-reduce);
        # everything else (EMA, checkpoints, library sizes) uses the plain module.
        self.forward_module = self.model
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward_module = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(settings.ema_decay), use_buffers=True)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=settings.precision == "fp16")
        self.step_count = 0
        self.skipped_steps = 0

    @property
    def ema_model(self) -> HierarchicalVAE:
        return self.ema.module

    def step(self, batch: dict) -> dict[str, float] | None:
        """One update on ``batch`` (``counts``, optional ``batch_index``). None if skipped."""
        model, settings = self.model, self.settings
        model.train()
        counts = densify(batch["counts"], self.device)
        batch_index = batch.get("batch_index")
        if batch_index is not None:
            batch_index = torch.as_tensor(batch_index).to(self.device, non_blocking=True)
        kl_weight = kl_warmup(self.step_count, settings.kl_warmup_steps)
        with autocast_context(settings.precision, self.device):
            out = self.forward_module(counts, batch_index, kl_weight=kl_weight)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out.loss).backward()
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        finite = torch.isfinite(out.loss.detach()) & torch.isfinite(grad_norm)
        if not _all_ranks_agree(finite):
            # Skip the update everywhere; the fp16 scaler still learns from the overflow.
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler.is_enabled():
                self.scaler.update()
            self.skipped_steps += 1
            return None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        model.record_library_sizes(out.library)
        self.ema.update_parameters(model)
        self.step_count += 1
        return {
            "step": self.step_count,
            "loss": float(out.loss.detach()),
            "negative_elbo": float(out.negative_elbo.detach()),
            "reconstruction": float(out.reconstruction.detach().mean()),
            "coarse_reconstruction": float(out.coarse_reconstruction.detach()),
            "kl_weight": kl_weight,
            "grad_norm": float(grad_norm),
            **{f"kl_level_{level}": float(value) for level, value in enumerate(out.kl.detach())},
        }

    def fit(self, batches: Iterable[dict], max_steps: int, log_every: int = 0, progress: bool = False) -> list[dict]:
        """Run until ``max_steps`` updates; returns the metrics of every ``log_every``-th step.

        ``progress`` shows a bar with cells/s, ETA and the latest loss and KL per level.
        """
        from tqdm.auto import tqdm

        history = []
        with tqdm(total=max_steps, initial=self.step_count, unit="step", disable=not progress, desc="training") as bar:
            for batch in batches:
                if self.step_count >= max_steps:
                    break
                metrics = self.step(batch)
                if metrics is None:
                    continue
                bar.update(1)
                if progress and (metrics["step"] % 25 == 0):
                    rate = bar.format_dict["rate"] or 0.0
                    kl = "/".join(f"{v:.1f}" for k, v in metrics.items() if k.startswith("kl_level_"))
                    bar.set_postfix_str(f"{rate * batch['counts'].shape[0]:,.0f} cells/s  -ELBO {metrics['negative_elbo']:.1f}  KL {kl}")
                if log_every and (metrics["step"] % log_every == 0 or metrics["step"] == max_steps):
                    history.append(metrics)
        return history

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step_count,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step_count = int(state["step"])
        self.skipped_steps = int(state["skipped_steps"])


def _all_ranks_agree(finite: torch.Tensor) -> bool:
    """True only if the step is finite on every rank (a MIN all-reduce when distributed)."""
    flag = finite.to(torch.float32).reshape(1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0.5)


def in_memory_batches(
    counts: sp.csr_matrix,
    batch_size: int,
    batch_index: np.ndarray | None = None,
    seed: int = 0,
    drop_last: bool = True,
) -> Iterator[dict]:
    """Endless shuffled minibatches of an in-memory CSR matrix (small data, tests, benchmarks)."""
    counts = sp.csr_matrix(counts)
    n_cells = counts.shape[0]
    if batch_size > n_cells:
        batch_size = n_cells
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(n_cells)
        stop = n_cells - n_cells % batch_size if drop_last else n_cells
        for start in range(0, stop, batch_size):
            rows = np.sort(order[start : start + batch_size])
            batch = {"counts": counts[rows], "obs_index": rows}
            if batch_index is not None:
                batch["batch_index"] = torch.from_numpy(np.asarray(batch_index)[rows].astype(np.int64))
            yield batch


@torch.no_grad()
def encode_in_batches(
    model: HierarchicalVAE,
    counts: sp.csr_matrix,
    batch_index: np.ndarray | None = None,
    batch_size: int = 4096,
    device: torch.device | str = "cpu",
    return_logvar: bool = False,
):
    """Posterior means per level (level 0 first) for every row, as float32 numpy arrays."""
    model.eval()
    means: list[list[np.ndarray]] = []
    logvars: list[list[np.ndarray]] = []
    for start in range(0, counts.shape[0], batch_size):
        dense = densify(counts[start : start + batch_size], device)
        index = None
        if batch_index is not None:
            index = torch.as_tensor(np.asarray(batch_index)[start : start + batch_size]).long().to(device)
        result = model.encode(dense, index, return_logvar=return_logvar)
        level_means, level_logvars = result if return_logvar else (result, [])
        means.append([m.cpu().numpy() for m in level_means])
        logvars.append([v.cpu().numpy() for v in level_logvars])
    n_levels = model.config.n_levels
    stacked = [np.concatenate([part[level] for part in means]) for level in range(n_levels)]
    if return_logvar:
        return stacked, [np.concatenate([part[level] for part in logvars]) for level in range(n_levels)]
    return stacked

