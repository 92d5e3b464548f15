"""scvi-tools SCVI training throughput on an h5ad: the peer column of ``train_throughput.py``.

    python benchmarks/peers/scvi_train_peer.py --h5ad cells.h5ad --batch-sizes 128,1024 --epochs 2

Runs in its own environment (``pip install scvi-tools``: it brings its own lightning, jax and
torch pins). For each batch size it trains a default ``scvi.model.SCVI`` (its in-memory
AnnData loader, no validation split) and times the training batches after ``--warmup``
batches, with the device synchronised at both ends. One JSON line per batch size on stdout.
"""

from __future__ import annotations

import argparse
import json
import time

import anndata as ad
import scvi
import torch

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # older scvi-tools
    from pytorch_lightning.callbacks import Callback


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Clock(Callback):
    """Cells and seconds over the training batches after the first ``warmup``."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.seen, self.cells = warmup, 0, 0
        self.start: float | None = None
        self.end: float | None = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.seen += 1
        if self.seen == self.warmup + 1:
            _sync()
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.start is not None:
            self.cells += int(batch[scvi.REGISTRY_KEYS.X_KEY].shape[0])

    def on_train_end(self, trainer, module) -> None:
        _sync()
        self.end = time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--h5ad", required=True)
    parser.add_argument("--batch-sizes", default="128,1024")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=20, help="batches left out of the clock")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--batch-key", default=None, help="obs column for SCVI's batch covariate")
    args = parser.parse_args()
    adata = ad.read_h5ad(args.h5ad)
    scvi.model.SCVI.setup_anndata(adata, batch_key=args.batch_key)
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        torch.manual_seed(0)
        model = scvi.model.SCVI(adata)
        clock = Clock(args.warmup)
        model.train(
            max_epochs=args.epochs,
            batch_size=batch_size,
            train_size=1.0,
            accelerator=args.accelerator,
            early_stopping=False,
            enable_progress_bar=False,
            callbacks=[clock],
        )
        if clock.start is None or clock.cells == 0:
            raise SystemExit(
                f"batch size {batch_size}: fewer than {args.warmup} batches in {args.epochs} epochs; "
                "give more cells or epochs"
            )
        print(
            json.dumps(
                {
                    "tool": "scvi-tools",
                    "version": scvi.__version__,
                    "batch_size": batch_size,
                    "cells_per_s": round(clock.cells / (clock.end - clock.start)),
                    "timed_cells": clock.cells,
                    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
