"""Train and evaluate a model on an in-memory AnnData: small data, the demo, quality benchmarks.

Atlas-scale data goes through shards and the streaming loader instead; this path exists so
that the model can be judged on a few thousand labelled cells in one function call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from hvae import HVAEConfig, HierarchicalVAE, active_units, fit_gene_modules
from hvae.modules import SAMPLE_CELLS

from ..config import TrainConfig
from .step import Trainer, encode_in_batches, heldout_negative_elbo, in_memory_batches


@dataclass
class FitResult:
    """A trained model with its per-level diagnostics."""

    trainer: Trainer
    seconds: float
    history: list[dict]
    level_means: list[np.ndarray]  # what each level exports (HierarchicalVAE.encode), level 0 first
    kl_per_level: list[float]
    active_units: list[int]  # of each z_l's own units
    steps: int = 0  # steps taken (fewer than max_steps when training stopped early)
    best_step: int | None = None  # stopped early: the step whose EMA weights the model holds

    @property
    def model(self) -> HierarchicalVAE:
        """The EMA weights: what inference and evaluation use."""
        return self.trainer.ema_model


def batch_codes(obs, batch_key: str | None) -> tuple[np.ndarray | None, list[str]]:
    """Integer codes of ``obs[batch_key]`` and the category names (None, [] without a key)."""
    if batch_key is None:
        return None, []
    if batch_key not in obs.columns:
        raise KeyError(f"batch key {batch_key!r} not in obs (columns: {list(obs.columns)})")
    column = obs[batch_key].astype("category")
    return column.cat.codes.to_numpy().astype(np.int64), [str(c) for c in column.cat.categories]


def with_gene_modules(config: HVAEConfig, counts, seed: int = 0) -> HVAEConfig:
    """``config`` with the gene modules its ``module_levels`` ask for, built from up to 20,000 of
    the cells of ``counts`` (a fixed sample: the partition belongs to the data, not to the training
    seed; ``seed`` is the partition's own, for screens of its sensitivity)."""
    if not config.module_levels or config.gene_modules:
        return config
    n_cells = counts.shape[0]
    rows = np.sort(np.random.default_rng(0).permutation(n_cells)[:SAMPLE_CELLS])
    return fit_gene_modules(config, sp.csr_matrix(counts[rows], dtype=np.float32), seed=seed)


def fit_in_memory(
    counts: sp.csr_matrix,
    model_config: HVAEConfig,
    train: TrainConfig,
    batch_index: np.ndarray | None = None,
    device: str = "cpu",
    progress: bool = False,
) -> FitResult:
    """Train on shuffled minibatches of ``train.batch_size`` cells (seed ``train.seed``), then
    encode every cell (score the levels with
    ``pipeline.evaluate.evaluate_levels(result.level_means, obs, labels)``).

    With ``train.early_stopping``, ``train.validation_fraction`` of the cells (seeded) are held
    out: every ``train.validate_every`` steps their -ELBO is measured, and training stops once it
    has risen ``train.early_stopping_tolerance`` above its best, keeping the best EMA weights;
    otherwise it runs to ``train.max_steps`` and keeps the last. Every cell, held out or not, is
    encoded.
    """
    seed = train.seed
    counts = sp.csr_matrix(counts)
    model_config = with_gene_modules(model_config, counts)
    n_cells = counts.shape[0]
    n_held_out = int(round(train.validation_fraction * n_cells)) if train.early_stopping else 0
    order = np.random.default_rng([seed, 1]).permutation(n_cells)
    held_out, fitted = np.sort(order[:n_held_out]), np.sort(order[n_held_out:])
    held_out = held_out[: train.validation_cells]
    index = None if batch_index is None else np.asarray(batch_index)
    torch.manual_seed(seed)
    trainer = Trainer(HierarchicalVAE(model_config), train, device=device)
    validate = None
    if len(held_out):
        held_counts, held_index = counts[held_out], None if index is None else index[held_out]

        def validate(model):
            return heldout_negative_elbo(model, held_counts, held_index, device=device)

    start = time.perf_counter()
    history = trainer.fit(
        in_memory_batches(counts[fitted], train.batch_size, None if index is None else index[fitted], seed=seed),
        max_steps=train.max_steps,
        log_every=train.log_every,
        progress=progress,
        validate=validate,
        validate_every=train.validate_every,
        tolerance=train.early_stopping_tolerance,
    )
    seconds = time.perf_counter() - start
    level_means = encode_in_batches(trainer.ema_model, counts, device=device)
    latents = encode_in_batches(trainer.ema_model, counts[: min(n_cells, 20_000)], device=device, latents=True)
    kl = diagnostic_kl(trainer.ema_model, counts, batch_index, device=device)
    stopper = trainer.early_stopping
    return FitResult(
        trainer=trainer,
        seconds=seconds,
        history=history,
        level_means=level_means,
        kl_per_level=kl,
        active_units=active_units([torch.from_numpy(m) for m in latents]),
        steps=trainer.step_count,
        best_step=stopper.best_step if stopper is not None and stopper.stopped else None,
    )


@torch.no_grad()
def diagnostic_kl(
    model: HierarchicalVAE,
    counts: sp.csr_matrix,
    batch_index: np.ndarray | None = None,
    n_cells: int = 4096,
    device: str = "cpu",
    seed: int = 0,
) -> list[float]:
    """Mean KL per cell of each level (nats) on up to ``n_cells`` cells, in eval mode."""
    from ..data import densify

    model.eval()
    rows = np.sort(np.random.default_rng(seed).permutation(counts.shape[0])[:n_cells])
    index = None if batch_index is None else torch.as_tensor(np.asarray(batch_index)[rows]).long().to(device)
    out = model(densify(counts[rows], device), index)
    return [float(v) for v in out.kl]
