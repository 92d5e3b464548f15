"""annbatch 0.3.1 as a benchmark peer: build a pre-shuffled collection, then time its Loader.

Runs in the Python 3.12 venv (benchmarks/.venv312, made by benchmarks/loader.py), never in the
project's venv. Each subcommand prints one JSON line; benchmarks/loader.py drives both.

    benchmarks/.venv312/bin/python benchmarks/peers/annbatch_peer.py build SRC.h5ad OUT.zarr
    benchmarks/.venv312/bin/python benchmarks/peers/annbatch_peer.py run OUT.zarr --batch-size 4096

Both use the zarrs codec pipeline (``zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})``),
as annbatch's README asks for local disks. ``build`` is ``DatasetCollection(OUT).add_adatas([SRC], shuffle=True)``
with annbatch's defaults except ``dataset_size`` (rows held in memory per output dataset: the default
'20GB' would hold a whole 1M x 8k atlas in RAM on a 23 GB machine). ``run`` is
``Loader(batch_size=4096, chunk_size=512, preload_nchunks=32, shuffle=True, rng, preload_to_gpu=False)
.use_collection(collection, load_adata=X + obs['donor_id'] only)`` (chunk_size and preload_nchunks are
the Loader's defaults), iterated as is: batches stay scipy CSR (``to=None``), nothing is densified.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, measure, peer_parser, rss_now_mb, run_command  # noqa: E402


def _zarrs() -> None:
    import zarr

    zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})


def build(args: argparse.Namespace) -> None:
    import numpy as np
    from annbatch import DatasetCollection

    _zarrs()
    start = time.perf_counter()
    collection = DatasetCollection(args.out)
    dataset_size: int | str = int(args.dataset_size) if args.dataset_size.isdigit() else args.dataset_size
    collection.add_adatas(
        [args.source],
        shuffle=True,
        rng=np.random.default_rng(args.seed),
        dataset_size=dataset_size,
    )
    emit(
        {
            "tool": "annbatch",
            "step": "build",
            "build_s": round(time.perf_counter() - start, 2),
            "n_datasets": sum(1 for _ in collection),
            "dataset_size": args.dataset_size,
        }
    )


def _load_x_and_donor(group):
    """annbatch's documented ``load_adata`` hook: on-disk CSR ``X`` and only the obs column we score."""
    import anndata as ad
    import pandas as pd

    donors = ad.io.read_elem(group["obs"]["donor_id"])
    obs = pd.DataFrame({"donor_id": donors}, index=pd.RangeIndex(len(donors)).astype(str))
    return ad.AnnData(X=ad.io.sparse_dataset(group["X"]), obs=obs)


def _codes(column):
    import pandas as pd

    if isinstance(column.dtype, pd.CategoricalDtype):
        return column.cat.codes.to_numpy()
    return pd.factorize(column.to_numpy())[0]


def run(args: argparse.Namespace) -> None:
    import anndata as ad
    import numpy as np
    import zarr
    from annbatch import DatasetCollection, Loader

    _zarrs()
    baseline = rss_now_mb()
    start = time.perf_counter()
    with ad.settings.override(remove_unused_categories=False):
        loader = Loader(
            batch_size=args.batch_size,
            chunk_size=args.chunk_size,
            preload_nchunks=args.preload_nchunks,
            shuffle=True,
            rng=np.random.default_rng(args.seed),
            preload_to_gpu=False,
        ).use_collection(DatasetCollection(args.store, mode="r"), load_adata=_load_x_and_donor)
        setup_s = time.perf_counter() - start
        n_obs, n_vars = loader.n_obs, loader.n_var

        def make_iter(epoch: int):
            # The Loader keeps one rng across passes, so every pass (epoch) is a fresh shuffle.
            for batch in loader:
                x = batch["X"]
                assert x.format == "csr" and x.shape[1] == n_vars, (type(x), x.shape)
                yield x.shape[0], x.nnz, _codes(batch["obs"]["donor_id"])

        result = measure(make_iter, args.batch_size, args.warmup, args.max_batches)
    emit(
        {
            "tool": "annbatch",
            "step": "run",
            "n_obs": n_obs,
            "n_vars": n_vars,
            "rss_baseline_mb": round(baseline, 1),
            "setup_s": round(setup_s, 3),
            "batch_type": "scipy.sparse.csr_matrix",
            "params": {
                "batch_size": args.batch_size,
                "chunk_size": args.chunk_size,
                "preload_nchunks": args.preload_nchunks,
                "shuffle": True,
                "seed": args.seed,
                "codec_pipeline": zarr.config.get("codec_pipeline.path"),
            },
            **result,
        }
    )


def main() -> None:
    parser, b, r = peer_parser(__doc__.splitlines()[0])
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--dataset-size", default="1GB", help="rows, or a size string, per output dataset")
    # annbatch's own Loader defaults (512 contiguous rows x 32 chunks = 16,384 rows in memory). The README's
    # example (32 x 256) was 1.7x slower here at equal mixing: the collection is already shuffled on disk.
    r.add_argument("--chunk-size", type=int, default=512)
    r.add_argument("--preload-nchunks", type=int, default=32)
    run_command(parser, build, run)


if __name__ == "__main__":
    main()
