"""The hvae-pipeline command line, run as a user runs it (a subprocess)."""

import pytest
import json
import subprocess
import sys
from pathlib import Path

import anndata as ad


def run_cli(*args, check=True):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, check=check)


def test_simulate_writes_a_labelled_atlas(tmp_path):
    out = tmp_path / "atlas.zarr"
    result = run_cli(
        "simulate", str(out), "--n-cells", "1500", "--n-genes", "120", "--branching", "2,3", "--n-donors", "3"
    )
    assert "wrote 1,500 cells x 120 genes" in result.stdout
    adata = ad.read_zarr(out)
    assert adata.shape == (1500, 120)
    assert list(adata.obs.columns) == ["level_0", "level_1", "donor_id"]
    assert adata.obs["level_1"].nunique() == 6


def test_simulate_refuses_a_bad_output_path(tmp_path):
    result = run_cli("simulate", str(tmp_path / "atlas.csv"), check=False)
    assert result.returncode != 0
    assert "must end in .h5ad or .zarr" in result.stderr


@pytest.mark.slow
def test_simulate_never_replaces_what_is_there_without_overwrite(tmp_path):
    small = ["--n-cells", "200", "--n-genes", "40", "--branching", "2,2"]
    h5ad = tmp_path / "atlas.h5ad"
    run_cli("simulate", str(h5ad), *small)
    before = h5ad.read_bytes()
    refused = run_cli("simulate", str(h5ad), *small, "--seed", "1", check=False)
    assert refused.returncode != 0 and "exists (a file); pass --overwrite" in refused.stderr
    assert h5ad.read_bytes() == before
    run_cli("simulate", str(h5ad), *small, "--seed", "1", "--overwrite")
    assert h5ad.read_bytes() != before and ad.read_h5ad(h5ad).shape == (200, 40)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atlas.h5ad"]  # nothing staged is left
    # A folder with the user's files in it: refused, with --overwrite too, and left as it was.
    mine = tmp_path / "mine.zarr"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        refused = run_cli("simulate", str(mine), *small, *extra, check=False)
        assert refused.returncode != 0 and "mine.zarr" in refused.stderr
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    soma = tmp_path / "soma"
    soma.mkdir()
    (soma / "notes.txt").write_text("mine")
    refused = run_cli("simulate", str(soma), *small, "--format", "soma", check=False)
    assert refused.returncode != 0 and "pass --overwrite" in refused.stderr and (soma / "notes.txt").exists()
    # An AnnData-Zarr atlas is replaced with --overwrite, once the new one is complete.
    atlas = tmp_path / "atlas.zarr"
    run_cli("simulate", str(atlas), *small)
    run_cli("simulate", str(atlas), *small, "--n-cells", "300", "--overwrite")
    assert ad.read_zarr(atlas).shape == (300, 40)


@pytest.mark.slow
def test_demo_runs_end_to_end_and_writes_every_level(tmp_path):
    out = tmp_path / "demo"
    result = run_cli("demo", "--out-dir", str(out), "--n-cells", "2000", "--max-steps", "60", "--workers", "0")
    assert "| HVAE level 2 (top)" in result.stdout and "| flat VAE | 32 |" in result.stdout
    from pipeline.train.checkpoint import find_checkpoint, load_model
    from pipeline.embed import read_embeddings

    embedded = read_embeddings(str(out / "embeddings.zarr"))
    assert [embedded.obsm[f"X_hvae_level_{level}"].shape for level in range(3)] == [
        (2000, 32)
    ] * 3  # level 0's width at every level
    summary = json.loads((out / "summary.json").read_text())
    # Active units are each z_l's own (32 / 16 / 8 at most), taken from the model, not the export's columns.
    units = [row["active_units"] for row in summary["rows"][:3]]
    assert all(isinstance(u, int) for u in units) and units[0] <= 8 and units[1] <= 16 and units[2] <= 32, units
    assert [row["representation"] for row in summary["rows"]][:3] == [
        "HVAE level 2 (top)",
        "HVAE level 1",
        "HVAE level 0 (finest)",
    ]
    model, parts = load_model(find_checkpoint(out / "runs" / "hvae"))
    assert len(parts["genes"]["feature_ids"]) == model.config.n_genes == 2000
    assert (out / "shards" / "manifest.json").exists()
    report = (out / "report" / "report.md").read_text()
    assert (
        "## `subtype`" in report
        and "| flat VAE | 32 |" in report
        and "## Which level to use" in report
        and "batch mixing" in report
    )
    assert "batch mixing within `subtype` |" in report
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert all(0 < r["batch_mixing_within"] <= 1 for r in metrics["results"]), metrics["results"]
    assert len(list((out / "report" / "maps").glob("*.png"))) == 5  # 3 levels, the flat model, PCA
    # [6/6]: cells of two new donors mapped to the atlas, labels transferred at every level
    assert "labels transferred to" in result.stdout and (out / "query_mapped.h5ad").exists()
    transfer = summary["query"]
    assert transfer["cells"] >= 200 and all(len(v) == 3 for v in transfer["accuracy"].values())
    assert transfer["accuracy"]["lineage"][2] > 0.6, transfer  # 3 lineages: chance is 1/3


def test_bad_files_and_paths_get_named_errors_not_tracebacks(tmp_path):
    from pipeline.config import ConfigError, load_config
    from pipeline.data import open_source
    from pipeline.embed.release import read_index

    config = tmp_path / "run.yaml"
    config.write_text("train: [1, 2\n  x: {")
    with pytest.raises(ConfigError, match="is not YAML"):
        load_config(str(config))
    h5ad = tmp_path / "cells.h5ad"
    h5ad.write_bytes(b"not a census")
    for uri, said in ((h5ad, "is not a Census"), (tmp_path, "is not a Census"), (tmp_path / "gone", "does not exist")):
        with pytest.raises(ValueError, match=said):
            open_source("census", census_uri=str(uri))
    for content in ("[1, 2]", '{"runs": 5}', '{"runs": [1]}'):
        (tmp_path / "index.json").write_text(content)
        with pytest.raises(ValueError, match="is not an embed-release index"):
            read_index(str(tmp_path))


def cli_here(*args):
    """The command line in this process (a subprocess per call costs seconds of imports); an
    exception it did not turn into a named line (a traceback for the user) fails the test."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


UNWRITABLE = Path("/sys/hvae-pipeline-test")  # /sys takes no new files, for root too
needs_sys = pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux's /sys, a folder nobody writes to")
SMALL = ["--n-cells", "200", "--n-genes", "40", "--branching", "2,2"]


@needs_sys
def test_an_unwritable_output_is_one_named_line_before_any_work(tmp_path):
    atlas = tmp_path / "atlas.h5ad"
    assert cli_here("simulate", atlas, *SMALL).returncode == 0
    for args in (
        ["simulate", UNWRITABLE / "atlas.h5ad", *SMALL],
        ["simulate", UNWRITABLE / "soma", "--format", "soma", *SMALL],
        ["shard", atlas, "--out", UNWRITABLE / "shards"],
        ["embed", "--checkpoint", tmp_path, "--source", atlas, "--out", UNWRITABLE / "e.zarr"],
    ):
        result = cli_here(*args)
        assert result.returncode == 2 and "cannot write to /sys" in result.stderr, (args, result.stderr)
        assert "synthetic atlas" not in result.stderr + result.stdout  # refused before the cells were generated


def test_bad_paths_and_values_in_options_are_one_named_line(tmp_path):
    (tmp_path / "genes").mkdir()
    (tmp_path / "a_file").write_text("mine")
    for args, said in (
        (["shard", tmp_path, "--out", tmp_path / "s", "--genes", tmp_path / "genes"], "Is a directory"),
        (["train", f"data.path={tmp_path}", f"run.storage_path={tmp_path / 'a_file'}"], "a_file"),
        (["train", f"data.path={tmp_path}", "train.max_steps=[1"], "ParserError"),
    ):
        result = cli_here(*args)
        assert result.returncode == 2 and result.stderr.startswith("error: ") and said in result.stderr, (
            args,
            result.stderr,
        )
        assert result.stderr.count("\n") == 1  # one line
    assert (tmp_path / "a_file").read_text() == "mine"


def test_an_index_whose_records_lack_their_keys_is_named(tmp_path):
    from pipeline.embed.release import read_index

    (tmp_path / "index.json").write_text('{"runs": [{"release": "2025-01-30"}]}')
    with pytest.raises(ValueError, match="is not an embed-release index.*model_id"):
        read_index(str(tmp_path))
