"""The benchmarks run end to end (a few steps): they must not rot between their full runs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import shared_file

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_hierarchy_quality_prints_levels_baselines_and_the_checks(tmp_path):
    shared_file("mouse_pancreas_sub1000_raw.h5ad")
    out = tmp_path / "quality.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "hierarchy_quality.py"),
            "--datasets",
            "pancreas",
            "--seeds",
            "0",
            "--steps",
            "20",
            "--batch-size",
            "64",
            "--jobs",
            "1",
            "--set",
            "latent_dims=[8,4,2]",
            "--json",
            str(out),
            "--save-models",
            str(tmp_path / "models"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout
    # Every level exports level 0's width (the levels above decode gene modules); the flat model as wide.
    for row in (
        "| HVAE level 2 (top) | 8 |",
        "| HVAE level 1 | 8 |",
        "| HVAE level 0 (finest) | 8 |",
        "| flat VAE 8-d | 8 |",
        "| PCA (50 comps) | 50 |",
        "| chance (each parent's majority child) |",
    ):
        assert row in table, table
    assert "kNN cell_type_fine" in table and "silhouette cell_type_coarse" in table
    assert "kNN cell_type_fine within cell_type_coarse" in table
    checks = json.loads(out.read_text())["checks"]["pancreas"]
    # No donors in pancreas: check 5 does not apply; two label levels: neither does check 7.
    assert [c["number"] for c in checks] == [1, 2, 3, 4, 6, 8, 9]
    assert all(f"{c['number']}. " in table for c in checks)
    # Each verdict says on how many seeds the check passes alone, and which.
    assert all(c["seeds_passing"] in ([], [0]) and c["passed"] == (c["seeds_passing"] == [0]) for c in checks), checks
    assert table.count(" of 1 seeds pass]") == 7
    # Runs kept as JSON are summarised again (seeds run apart, together) without training.
    again = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "hierarchy_quality.py"), "--from-json", str(out)],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 0 and "| HVAE level 0 (finest) | 8 |" in again.stdout, again.stderr[-2000:]
    assert "cell_type_fine kNN by seed (level 0 / level 1 / top; flat): seed 0: " in again.stdout
    # The kept models are scored again with the current export, without training: the same figures.
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [
        "pancreas_flat_seed0.pt",
        "pancreas_hvae_seed0.pt",
    ]
    rescored = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "hierarchy_quality.py"),
            "--rescore",
            str(tmp_path / "models"),
            "--jobs",
            "1",
        ],
        capture_output=True,
        text=True,
    )
    assert rescored.returncode == 0, rescored.stderr[-2000:]
    assert "rescored 2 models" in rescored.stdout
    first = [line for line in table.splitlines() if line.startswith("| HVAE level 0")]
    assert first and first == [line for line in rescored.stdout.splitlines() if line.startswith("| HVAE level 0")]
    # A model of another layout and a file that is not a report are named, not a raw traceback.
    saved = torch.load(tmp_path / "models" / "pancreas_hvae_seed0.pt", weights_only=True)
    saved["state"].pop(next(iter(saved["state"])))
    (tmp_path / "old").mkdir()
    torch.save(saved, tmp_path / "old" / "pancreas_hvae_seed0.pt")
    old = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "hierarchy_quality.py"),
            "--rescore",
            str(tmp_path / "old"),
            "--jobs",
            "1",
        ],
        capture_output=True,
        text=True,
    )
    assert old.returncode == 2 and "pancreas_hvae_seed0.pt: saved by a model of another layout" in old.stderr, (
        old.stderr
    )
    (tmp_path / "screen.json").write_text(json.dumps({"runs": []}))
    wrong = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "hierarchy_quality.py"),
            "--from-json",
            str(tmp_path / "screen.json"),
        ],
        capture_output=True,
        text=True,
    )
    assert (
        wrong.returncode == 2
        and "screen.json is not a --json report of this benchmark (no model, steps, pca)" in wrong.stderr
    ), wrong.stderr


@pytest.mark.slow
@pytest.mark.parametrize("where", ["s3", "local"])
def test_a_short_month_of_releases_loses_nothing(tmp_path, where):
    """benchmarks/release_month.py with 3 releases into moto S3, then a local folder: one job
    SIGKILLed and retried, two jobs started together on one release (one embeds, the other is
    refused naming the holder); every release complete once, its index built, the runs file
    whole, nothing left."""
    shared_file("census_shaped_pbmc3k_soma.tar.gz")
    out = tmp_path / "month.json"
    root = [] if where == "s3" else ["--out-root", str(tmp_path / "releases")]
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "release_month.py"),
            *("--releases", "3", "--kills", "1", "--overlaps", "1", "--seed", "1", "--json", str(out), *root),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["refused_as_held"] == 1 and figures["killed_at_point"] + figures["killed_on_timer"] == 1, figures
    assert figures["records_in_index"] == 3 and figures["releases_lost_or_wrong"] == 0, figures
    assert "verdict: PASS" in result.stdout


@pytest.mark.slow
def test_gpu_check_runs_end_to_end_on_the_cpu(tmp_path):
    """The prepared GPU check (benchmarks/gpu_check.py) as a smoke test: every path, one table."""
    out = tmp_path / "gpu_check.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_check.py"),
            "--device",
            "cpu",
            "--n-cells",
            "20000",
            "--n-genes",
            "500",
            "--hidden-dim",
            "64",
            "--batch-size",
            "512",
            "--steps",
            "4",
            "--warmup",
            "1",
            "--no-compile",
            "--work-dir",
            str(tmp_path / "work"),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["n_cells"] == 20_000 and report["n_genes"] == 500
    assert [r["path"] for r in report["rows"]] == [
        "loader -> device (no model)",
        "train, GPU-resident, eager",
        "train, from shards, eager",
        "embed end to end (shards -> Zarr)",
    ]
    assert all(r["cells_per_s"] > 0 for r in report["rows"])
    assert "| train, from shards, eager |" in result.stdout


@pytest.mark.slow
@pytest.mark.ray
def test_atlas_scale_runs_the_whole_chain_at_100k_cells_with_its_checks(tmp_path):
    """benchmarks/atlas_scale.py at 100k cells (its own runs go to 10M): every stage as its real command (Ray Train on 2 CPU
    workers), each obs id embedded once, the count checksum carried from the generator into the
    shards; exit 0 only when every check passes."""
    out = tmp_path / "scale.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "atlas_scale.py"),
            "--n-cells",
            "100000",
            "--h5ad-cells",
            "10000",
            "--steps",
            "30",
            "--eval-cells",
            "5000",
            "--out",
            str(tmp_path / "work"),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=840,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    stages = [s["stage"] for s in report["results"][0]["stages"]]
    assert stages == ["simulate -> shards", "simulate -> h5ad", "h5ad -> shard", "train (Ray)", "embed", "evaluate"]
    assert all(s["peak_rss_gb"] > 0.1 and s["wall_s"] > 0 for s in report["results"][0]["stages"])
    assert all(check["pass"] for check in report["checks"].values()) and len(report["checks"]) == 2
    assert "PASS  every obs id embedded once (100,000): 100,000 ids, 0 missing, 0 repeated" in result.stdout
    assert "| 100,000 | embed |" in result.stdout
