"""The pipeline end to end on the real labelled data in ../shared/data, hierarchical vs flat:

    shard (2,000 HVGs) -> train (3-level and flat, one process) -> embed -> evaluate --pca --compare flat=...

    python benchmarks/real_data_reports.py                        # pbmc3k and pancreas
    python benchmarks/real_data_reports.py --datasets pancreas --steps 1000 --out outputs/real

Each dataset's report (Markdown, metrics.json, maps/) lands in OUT/<dataset>/report; the script
prints the kNN table of every report and the wall time of each stage.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import load_config  # noqa: E402
from pipeline.data import ShardSettings, open_source, write_shards  # noqa: E402
from pipeline.embed import EmbedSettings, embed  # noqa: E402
from pipeline.train.launch import train  # noqa: E402
from pipeline.evaluate.report import EvaluateSettings, evaluate_embeddings  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
DATASETS = {
    "pbmc3k": ("pbmc3k_raw_seurat_annotations.h5ad", ("lineage", "cell_type_coarse", "cell_type_fine"), 700),
    "pancreas": ("mouse_pancreas_sub1000_raw.h5ad", ("cell_type_coarse", "cell_type_fine"), 250),
}


def run(name: str, out: Path, steps: int, batch_size: int, seed: int, map_method: str) -> dict:
    file, labels, shard_size = DATASETS[name]
    source, work, timings = str(DATA / file), out / name, {}
    shutil.rmtree(work, ignore_errors=True)
    started = time.perf_counter()
    write_shards(
        open_source(source),
        str(work / "shards"),
        ShardSettings(n_top_genes=2000, shard_size=shard_size, seed=seed, progress=False),
        echo=lambda *_: None,
    )
    timings["shard"] = time.perf_counter() - started
    stores = {}
    for model, dims in (("hvae", [32, 16, 8]), ("flat", [32])):
        started = time.perf_counter()
        config = load_config(
            base={"data": {"path": str(work / "shards")}},
            overrides=[
                f"model.latent_dims={dims}",
                f"train.max_steps={steps}",
                f"train.batch_size={batch_size}",
                f"train.seed={seed}",
                f"checkpoint.every_steps={steps}",
                "train.progress=false",
                f"run.storage_path={work / 'runs'}",
                f"run.name={model}",
            ],
        )
        train(config, echo=lambda *_: None)
        timings[f"train {model}"] = time.perf_counter() - started
        started = time.perf_counter()
        stores[model] = work / f"{model}.zarr"
        embed(
            str(work / "runs" / model),
            {"source": source},
            str(stores[model]),
            EmbedSettings(progress=False),
            echo=lambda *_: None,
        )
        timings[f"embed {model}"] = time.perf_counter() - started
    started = time.perf_counter()
    summary = evaluate_embeddings(
        str(stores["hvae"]),
        EvaluateSettings(
            labels=labels,
            out_dir=str(work / "report"),
            compare={"flat VAE": str(stores["flat"])},
            pca=True,
            seed=seed,
            map_method=map_method,
        ),
        echo=lambda *_: None,
    )
    timings["evaluate"] = time.perf_counter() - started
    print(
        f"\n### {name}: {summary['cells_total']:,} cells, 2,000 HVGs, {steps} steps of {batch_size}; "
        + ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in timings.items())
        + "\n"
    )
    header = ["representation", "dim", "active units"] + [f"kNN {l}" for l in labels] + [f"ARI {labels[-1]}"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in summary["results"]:
        cells = [r["representation"], r["dim"], r["active_units"]] + [
            f"{r['labels'][l]['knn_accuracy']:.3f}" for l in labels
        ]
        print("| " + " | ".join(map(str, cells + [f"{r['labels'][labels[-1]]['ari']:.3f}"])) + " |")
    print(f"\nreport: {summary['report']}")
    return {"dataset": name, "timings": timings, "report": summary["report"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs/real_data"))
    parser.add_argument("--map-method", default="auto", help="umap (the eval extra), pca or auto")
    args = parser.parse_args()
    results = [
        run(name, args.out.resolve(), args.steps, args.batch_size, args.seed, args.map_method) for name in args.datasets
    ]
    (args.out / "timings.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
