"""tiledbsoma-ml 0.1.0 as a benchmark peer: ingest a SOMA experiment, then time ExperimentDataset.

Runs in the project's venv (tiledbsoma 2.3.0; ``pip install --no-deps tiledbsoma-ml==0.1.0``).
Each subcommand prints one JSON line; benchmarks/loader.py drives both.

    .venv/bin/python benchmarks/peers/tiledbsoma_ml_peer.py build SRC.h5ad OUT.soma
    .venv/bin/python benchmarks/peers/tiledbsoma_ml_peer.py run OUT.soma --batch-size 4096

``build`` is ``tiledbsoma.io.from_h5ad(OUT, SRC, measurement_name="RNA", X_layer_name="data", uns_keys=[])``
(reads the .h5ad in backed mode; default platform config). ``run`` is
``ExperimentDataset(exp.axis_query("RNA"), layer_name="data", obs_column_names=["donor_id"],
batch_size=4096, shuffle=True, seed=0, return_sparse_X=True)`` with the package defaults
``io_batch_size=65536``, ``shuffle_chunk_size=64`` and ``use_eager_fetch=True`` (one IO batch and one
mini batch fetched ahead on a thread), iterated directly in this process (no torch DataLoader:
``experiment_dataloader`` with workers refuses sparse X, and with 0 workers it adds nothing).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, measure, peer_parser, rss_now_mb, run_command  # noqa: E402

MEASUREMENT, LAYER = "RNA", "data"


def build(args: argparse.Namespace) -> None:
    import tiledbsoma.io

    start = time.perf_counter()
    tiledbsoma.io.from_h5ad(args.out, args.source, measurement_name=MEASUREMENT, X_layer_name=LAYER, uns_keys=[])
    emit({"tool": "tiledbsoma-ml", "step": "build", "build_s": round(time.perf_counter() - start, 2)})


def _codes(column):
    import pandas as pd

    if isinstance(column.dtype, pd.CategoricalDtype):
        return column.cat.codes.to_numpy()
    return pd.factorize(column.to_numpy())[0]


def run(args: argparse.Namespace) -> None:
    import tiledbsoma
    from tiledbsoma_ml import ExperimentDataset

    baseline = rss_now_mb()
    start = time.perf_counter()
    with tiledbsoma.Experiment.open(args.store) as exp, exp.axis_query(measurement_name=MEASUREMENT) as query:
        kwargs = {} if args.io_batch_size is None else {"io_batch_size": args.io_batch_size}
        if args.shuffle_chunk_size is not None:
            kwargs["shuffle_chunk_size"] = args.shuffle_chunk_size
        ds = ExperimentDataset(
            query,
            layer_name=LAYER,
            obs_column_names=["donor_id"],
            batch_size=args.batch_size,
            shuffle=True,
            seed=args.seed,
            return_sparse_X=True,
            **kwargs,
        )
        n_obs, n_vars = query.n_obs, query.n_vars
        setup_s = time.perf_counter() - start

        def make_iter(epoch: int):
            ds.set_epoch(epoch)  # 0.1.0 shuffles with `seed` alone; the epoch only labels the pass
            for x, obs in ds:
                assert x.format == "csr" and x.shape[1] == n_vars, (type(x), x.shape)
                yield x.shape[0], x.nnz, _codes(obs["donor_id"])

        result = measure(make_iter, args.batch_size, args.warmup, args.max_batches)
    emit(
        {
            "tool": "tiledbsoma-ml",
            "step": "run",
            "n_obs": n_obs,
            "n_vars": n_vars,
            "rss_baseline_mb": round(baseline, 1),
            "setup_s": round(setup_s, 3),
            "batch_type": "scipy.sparse.csr_matrix",
            "params": {
                "batch_size": ds.batch_size,
                "io_batch_size": ds.io_batch_size,
                "shuffle_chunk_size": ds.shuffle_chunk_size,
                "use_eager_fetch": ds.use_eager_fetch,
                "shuffle": True,
                "seed": args.seed,
                "return_sparse_X": True,
            },
            **result,
        }
    )


def main() -> None:
    parser, _, r = peer_parser(__doc__.splitlines()[0])
    r.add_argument("--io-batch-size", type=int, default=None, help="default: the package's (65536)")
    r.add_argument("--shuffle-chunk-size", type=int, default=None, help="default: the package's (64)")
    run_command(parser, build, run)


if __name__ == "__main__":
    main()
