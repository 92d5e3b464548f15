"""scvi-tools SCVI's latent representation of an h5ad: the peer row of ``hierarchy_quality.py``.

    python benchmarks/peers/scvi_embed_peer.py --h5ad cells.h5ad --out latent.npy --seed 0 [--batch-key donor_id]
    python benchmarks/peers/scvi_embed_peer.py --h5ad reference.h5ad --out ref.npy \
        --query query.h5ad --query-out query.npy [--batch-key donor_id]

Runs in its own environment (``pip install scvi-tools``: it brings its own lightning, jax and
torch pins). Trains ``scvi.model.SCVI`` with its defaults (n_latent 10, one hidden layer of 128, ZINB
likelihood, ``min(round(20000 / cells * 400), 400)`` epochs, its default training plan) on the
raw counts in ``X``, with the batch key as its batch covariate when given, on one CPU thread,
and saves ``get_latent_representation()`` (cells, n_latent) as float32. One JSON line on stdout.

With ``--query``, the cells of a second h5ad (same genes) are mapped into the trained model's
latent space as scvi-tools' reference mapping does: with a batch key, by scArches surgery
(``SCVI.load_query_data``, then ``train(max_epochs=200, plan_kwargs={"weight_decay": 0.0})``: only
the new batches' weights learn); without one, by the reference model's encoder as it is.
"""

from __future__ import annotations

import argparse
import json
import time

import anndata as ad
import numpy as np
import scvi
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--h5ad", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-key", default=None)
    parser.add_argument("--n-latent", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--query", default=None, help="an h5ad of query cells to map into the model")
    parser.add_argument("--query-out", default=None, help="where the query's latent goes (.npy)")
    args = parser.parse_args()
    if bool(args.query) != bool(args.query_out):
        parser.error("--query and --query-out go together")

    torch.set_num_threads(args.threads)
    scvi.settings.seed = args.seed
    adata = ad.read_h5ad(args.h5ad)
    scvi.model.SCVI.setup_anndata(adata, batch_key=args.batch_key)
    model = scvi.model.SCVI(adata, n_latent=args.n_latent)
    start = time.perf_counter()
    model.train(accelerator="cpu", devices=1, enable_progress_bar=False)
    seconds = time.perf_counter() - start
    latent = model.get_latent_representation().astype(np.float32)
    np.save(args.out, latent)
    if args.query:
        query = ad.read_h5ad(args.query)
        if args.batch_key:  # new batches: scArches surgery, the reference weights frozen
            mapped = scvi.model.SCVI.load_query_data(query, model)
            mapped.train(
                max_epochs=200,
                plan_kwargs={"weight_decay": 0.0},
                accelerator="cpu",
                devices=1,
                enable_progress_bar=False,
            )
        else:
            mapped = model
        np.save(args.query_out, mapped.get_latent_representation(query).astype(np.float32))
    print(
        json.dumps(
            {
                "peer": "scvi-tools",
                "version": scvi.__version__,
                "seed": args.seed,
                "cells": adata.n_obs,
                "n_latent": args.n_latent,
                "epochs": int(model.history["elbo_train"].shape[0]),
                "seconds": round(seconds, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
