"""The Ray-free training core: one optimisation step, mixed precision, EMA, skip-on-non-finite.

The Ray Train driver wraps this; unit tests and benchmarks run it directly on the CPU.
Nothing here knows about Ray, files or configs.

A step reads nothing back to the host (on a GPU each read is a device synchronisation that
stalls the GPU and the loader behind it):

- counts and batch indices are checked on the CPU side, in numpy, before the copy;
- the metrics accumulate on the device and are read once, by ``read_metrics``, on logging steps;
- a non-finite loss or gradient skips the update *on the device*: the fused AdamW kernel takes a
  ``found_inf`` flag, and the EMA and library-size updates are weighted by it. Under
  ``torch.distributed`` the flag is MIN-all-reduced (an asynchronous collective), so every rank
  skips the same steps and the replicas never drift apart.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterable, Iterator

import numpy as np
import scipy.sparse as sp
import torch
import torch.distributed as dist

from hvae import HierarchicalVAE, kl_warmup

from ..config import TrainConfig
from ..data.loader import check_batch_counts, densify

METRICS = ("loss", "negative_elbo", "reconstruction", "coarse_reconstruction", "readout", "grad_norm")


def autocast_context(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def fused_adamw_supported(device: torch.device) -> bool:
    """Fused AdamW (one kernel, skips on a device-side ``found_inf`` flag) runs on CUDA and CPU."""
    return device.type in ("cuda", "cpu", "mps", "xpu")


def kl_shares(metrics: dict) -> dict[str, float]:
    """``kl_share_level_<l>``: each level's share of the total KL in ``metrics`` (``kl_level_<l>``, nats)."""
    kl = {int(k.rsplit("_", 1)[1]): v for k, v in metrics.items() if k.startswith("kl_level_")}
    total = sum(kl.values())
    return {f"kl_share_level_{level}": (v / total if total > 0 else 0.0) for level, v in sorted(kl.items())}


def format_kl(metrics: dict) -> str:
    """Each level's KL in nats and its share, level 0 first: ``2.3/1.2/18.9 nats (10%/5%/84%)``."""
    shares = kl_shares(metrics)
    levels = range(len(shares))
    return (
        "/".join(f"{metrics[f'kl_level_{l}']:.1f}" for l in levels)
        + " nats ("
        + "/".join(f"{shares[f'kl_share_level_{l}']:.0%}" for l in levels)
        + ")"
    )


class Trainer:
    """Owns the model, its EMA copy, the optimizer and the grad scaler; ``step`` does one update.

    Every rank calls ``step`` on its own batch. ``step_count`` counts steps taken (an update
    skipped for a non-finite value still counts: the host never learns which steps were skipped
    until ``read_metrics``); ``read_metrics`` returns the means over the applied steps since the
    last read and the number skipped.
    """

    def __init__(self, model: HierarchicalVAE, settings: TrainConfig, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.settings = settings
        self.model = model.to(self.device)
        # Under torch.distributed the forward pass goes through DDP (gradient all-reduce);
        # everything else (EMA, checkpoints, library sizes) uses the plain module.
        self.forward_module = self.model
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if self.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward_module = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        if settings.compile:
            self.forward_module = torch.compile(self.forward_module)
        self.ema_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.fused = fused_adamw_supported(self.device)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=settings.learning_rate,
            weight_decay=settings.weight_decay,
            fused=self.fused or None,
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=settings.precision == "fp16")
        self.step_count = 0
        n_values = len(METRICS) + model.config.n_levels
        self._sums = torch.zeros(n_values, device=self.device)
        self._applied = torch.zeros((), device=self.device)
        self._skipped = torch.zeros((), device=self.device)
        self._skipped_before = 0  # read from a checkpoint
        self.last_kl_weight = 0.0

    def step(self, batch: dict, check: bool = True) -> None:
        """One update on ``batch`` (``counts``, optional ``batch_index``), with no host read.
        ``check``: validate the counts and batch indices on the CPU first (sparse batches)."""
        model, settings = self.model, self.settings
        model.train()
        counts, batch_index = batch["counts"], batch.get("batch_index")
        if check:
            check_batch_counts(counts)
            _check_batch_index(batch_index, model.config.n_batches)
        counts = densify(counts, self.device)
        if batch_index is not None:
            batch_index = torch.as_tensor(batch_index).to(self.device, non_blocking=True)
        kl_weight = self.last_kl_weight = kl_warmup(self.step_count, settings.warmup_steps)
        n_levels = model.config.n_levels
        coarse_level = 1 + self.step_count % (n_levels - 1) if n_levels > 1 else None
        with autocast_context(settings.precision, self.device):
            out = self.forward_module(
                counts, batch_index, kl_weight=kl_weight, check_values=False, coarse_level=coarse_level
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out.loss).backward()
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        finite = (torch.isfinite(out.loss.detach()) & torch.isfinite(grad_norm)).float()
        if self.distributed:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        self._apply(finite)
        self.step_count += 1
        self.scaler.update()
        keep = finite.bool()
        model.record_statistics(out, weight=finite)
        self._update_ema(finite)
        values = torch.stack(
            [
                out.loss.detach(),
                out.negative_elbo.detach(),
                out.reconstruction.detach().mean(),
                out.coarse_reconstruction.detach(),
                out.readout.detach(),
                grad_norm.detach(),
                *out.kl.detach(),
            ]
        ).float()
        self._sums += torch.where(keep, values, torch.zeros_like(values))
        self._applied += finite
        self._skipped += 1 - finite

    def _apply(self, finite: torch.Tensor) -> None:
        """The optimizer step, skipped on the device where ``finite`` is 0."""
        if self.scaler.is_enabled():  # fp16: the scaler hands its own found_inf to the fused kernel
            self.scaler.step(self.optimizer)
            return
        if not self.fused:  # a device without fused AdamW: the one host read left
            if bool(finite > 0.5):
                self.optimizer.step()
            return
        self.optimizer.found_inf = 1.0 - finite  # read by the fused kernel: no update where 1
        self.optimizer.grad_scale = None
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf, self.optimizer.grad_scale

    @torch.no_grad()
    def _update_ema(self, finite: torch.Tensor) -> None:
        weight = finite * (1.0 - self.settings.ema_decay)
        ema, live = list(self.ema_model.parameters()), list(self.model.parameters())
        differences = torch._foreach_sub(live, ema)
        torch._foreach_mul_(differences, weight)
        torch._foreach_add_(ema, differences)
        for target, source in zip(self.ema_model.buffers(), self.model.buffers(), strict=True):
            target.copy_(source)

    def read_metrics(self) -> dict[str, float]:
        """Means over the steps applied since the last read (one host read), then reset."""
        values = torch.cat(
            [self._sums / self._applied.clamp(min=1), torch.stack([self._applied, self._skipped])]
        ).tolist()
        self._sums.zero_()
        self._applied.zero_()
        n = len(METRICS)
        metrics = {
            "step": self.step_count,
            **dict(zip(METRICS, values[:n], strict=True)),
            "kl_weight": self.last_kl_weight,
            **{f"kl_level_{level}": v for level, v in enumerate(values[n:-2])},
            "applied_steps": int(values[-2]),
        }
        metrics.update(kl_shares(metrics))
        self._skipped_before += int(values[-1])
        self._skipped.zero_()
        metrics["skipped_steps"] = self._skipped_before
        return metrics

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for a non-finite value so far (a host read)."""
        return self._skipped_before + int(self._skipped.item())

    def fit(
        self,
        batches: Iterable[dict],
        max_steps: int,
        log_every: int = 0,
        progress: bool = False,
        validate=None,
        validate_every: int = 0,
        tolerance: float | None = None,
    ) -> list[dict]:
        """Run until ``max_steps`` steps; returns the metrics of every ``log_every``-th step
        (means since the previous one). ``progress`` shows a bar with cells/s and ETA, and the
        loss and KL per level on logging steps.

        ``validate(ema_model) -> held-out -ELBO``, called every ``validate_every`` steps, drives
        early stopping (:class:`EarlyStopping` with ``tolerance``; None: never stop): the EMA
        model ends with the best validation's weights, ``self.early_stopping`` says where.
        """
        from ..progress import Progress

        history = []
        self.early_stopping = stopper = (
            EarlyStopping(tolerance) if validate is not None and tolerance is not None else None
        )
        with Progress(max_steps, "training", unit="step", enabled=progress, initial=self.step_count) as bar:
            for batch in batches:
                if self.step_count >= max_steps:
                    break
                self.step(batch)
                bar.update(1)
                step = self.step_count
                if log_every and (step % log_every == 0 or step == max_steps):
                    metrics = self.read_metrics()
                    history.append(metrics)
                    if progress:
                        bar.postfix(
                            f"{bar.rate * batch['counts'].shape[0]:,.0f} cells/s  "
                            f"-ELBO {metrics['negative_elbo']:.1f}  KL {format_kl(metrics)}"
                        )
                if stopper is not None and validate_every and (step % validate_every == 0 or step == max_steps):
                    value = validate(self.ema_model)
                    if history and history[-1]["step"] == step:
                        history[-1]["validation_negative_elbo"] = value
                    if stopper.update(step, value, self.ema_model):
                        stopper.stopped = True
                        stopper.restore(self.ema_model)
                        break
        return history

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "ema": {f"module.{k}": v for k, v in self.ema_model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step_count,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.ema_model.load_state_dict(
            {k.removeprefix("module."): v for k, v in state["ema"].items() if k.startswith("module.")}
        )
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step_count = int(state["step"])
        self._skipped_before = int(state["skipped_steps"])
        self._skipped.zero_()


class EarlyStopping:
    """Stop once the held-out -ELBO has risen ``tolerance`` (a fraction) above its best: the
    model has started to fit its training cells at the expense of new ones. A stopped run keeps
    the EMA weights of the best validation (what it then returns and checkpoints); a run that
    never rises that far keeps its last weights.

    Small data overfit: on pancreas (1,000 cells) the held-out -ELBO is lowest at step 1,000 of
    256 cells and 3% above it by step 1,500, while level-0 kNN accuracy on the fine types falls
    from 0.89 to 0.83 by step 3,000. A slow drift is not a stop: on the 10k-cell synthetic atlas
    the held-out -ELBO rises 1.3% in the 2,000 steps after its best while subtype kNN climbs
    0.92 -> 0.97, hence the 3% default (benchmarks/RESULTS.md, "Training curves").
    """

    def __init__(self, tolerance: float) -> None:
        self.tolerance = tolerance
        self.best, self.best_step, self.best_weights = float("inf"), None, None
        self.stopped = False

    def update(self, step: int, negative_elbo: float, model: torch.nn.Module) -> bool:
        """Record a validation; True when training should stop."""
        if negative_elbo < self.best:
            self.best, self.best_step = negative_elbo, step
            self.best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return False
        return negative_elbo > self.best + self.tolerance * abs(self.best)

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "weights": self.best_weights}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_step, self.best_weights = state["best"], state["best_step"], state["weights"]

    def restore(self, model: torch.nn.Module) -> None:
        """Load the best validation's weights into ``model`` (nothing if none was recorded)."""
        if self.best_weights is not None:
            model.load_state_dict(self.best_weights)


@torch.no_grad()
def heldout_negative_elbo(
    model: HierarchicalVAE, counts, batch_index=None, batch_size: int = 1024, device: torch.device | str = "cpu"
) -> float:
    """Mean -ELBO per cell of held-out ``counts`` (CSR) in eval mode, with a fixed noise seed so
    that successive validations compare the weights, not the sampling noise."""
    model.eval()
    device = torch.device(device)
    total, n = 0.0, 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        for start in range(0, counts.shape[0], batch_size):
            part = densify(counts[start : start + batch_size], device)
            index = None
            if batch_index is not None:
                index = torch.as_tensor(np.asarray(batch_index)[start : start + batch_size]).long().to(device)
            out = model(part, index, check_values=False)
            total += float(out.negative_elbo) * part.shape[0]
            n += part.shape[0]
    return total / max(n, 1)


def _check_batch_index(batch_index, n_batches: int) -> None:
    """Batch indices in range, checked on the CPU (a tensor already on an accelerator is not)."""
    if batch_index is None or n_batches == 0:
        return
    if isinstance(batch_index, torch.Tensor):
        if batch_index.device.type != "cpu":
            return
        batch_index = batch_index.numpy()
    values = np.asarray(batch_index).reshape(-1)
    bad = (values < 0) | (values >= n_batches)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"batch_index[{row}] = {int(values[row])} is out of range: the model has "
            f"n_batches={n_batches} (valid 0..{n_batches - 1})"
        )


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
    batch_size: int = 4096,
    device: torch.device | str = "cpu",
    return_logvar: bool = False,
    latents: bool = False,
):
    """What every level exports (``model.encode``; ``latents=True``: each z_l alone,
    ``model.encode_latents``) for every row, level 0 first, as float32 numpy arrays."""
    model.eval()
    encode = model.encode_latents if latents else model.encode
    means: list[list[np.ndarray]] = []
    logvars: list[list[np.ndarray]] = []
    for start in range(0, counts.shape[0], batch_size):
        part = counts[start : start + batch_size]
        check_batch_counts(part)
        result = encode(densify(part, device), return_logvar=return_logvar, check_values=False)
        level_means, level_logvars = result if return_logvar else (result, [])
        means.append([m.cpu().numpy() for m in level_means])
        logvars.append([v.cpu().numpy() for v in level_logvars])
    n_levels = model.config.n_levels
    stacked = [np.concatenate([part[level] for part in means]) for level in range(n_levels)]
    if return_logvar:
        return stacked, [np.concatenate([part[level] for part in logvars]) for level in range(n_levels)]
    return stacked
