"""``embed``: every level to Zarr, equal to the model's encode, resumable after a kill, untouched
when complete, robust to a new release's gene order, and readable with zarr, xarray and anndata."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
import zarr

from conftest import shared_file
from pipeline.train.checkpoint import find_checkpoint, load_model
from pipeline.data import GeneAlignment
from pipeline.embed import EmbedSettings, attach_embeddings, embed, read_embeddings

ENV = {**os.environ, "TQDM_DISABLE": "1"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small model trained on pbmc3k shards (1,000 HVGs), and the source h5ad."""
    from pipeline.config import load_config
    from pipeline.data import ShardSettings, open_source, write_shards
    from pipeline.train.launch import train

    root = tmp_path_factory.mktemp("embed")
    source = str(shared_file("pbmc3k_raw_seurat_annotations.h5ad"))
    write_shards(
        open_source(source), str(root / "shards"), ShardSettings(n_top_genes=1000, shard_size=1000, progress=False)
    )
    config = load_config(
        base={"data": {"path": str(root / "shards")}},
        overrides=[
            "train.max_steps=60",
            "train.batch_size=128",
            "checkpoint.every_steps=60",
            "train.progress=false",
            f"run.storage_path={root / 'runs'}",
            "run.name=pbmc",
        ],
    )
    train(config, echo=lambda *_: None)
    return root / "runs" / "pbmc", source, root


def embed_quiet(checkpoint, source, out, **settings):
    return embed(
        str(checkpoint), {"source": source}, str(out), EmbedSettings(progress=False, **settings), echo=lambda *_: None
    )


@pytest.mark.slow
def test_embeddings_equal_encode_and_read_everywhere(trained, tmp_path):
    run_dir, source, _ = trained
    out = tmp_path / "pbmc.zarr"
    result = embed_quiet(run_dir, source, out, chunk_rows=1000, batch_size=512, logvar=True)
    assert result["complete"] and result["cells"] == 2700
    model, parts = load_model(find_checkpoint(run_dir))
    adata = ad.read_h5ad(source)
    counts = GeneAlignment(adata.var_names, parts["genes"]["feature_ids"]).apply(sp.csr_matrix(adata.X))
    with torch.no_grad():
        means, logvars = model.encode(torch.from_numpy(counts.toarray()), return_logvar=True)
    group = zarr.open_group(str(out), mode="r")
    assert list(np.asarray(group["obs_id"][:]).astype(object)) == list(adata.obs_names)  # every cell once, in order
    for level, (mean, logvar) in enumerate(zip(means, logvars, strict=True)):
        np.testing.assert_allclose(group[f"level_{level}/mean"][:], mean.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(group[f"level_{level}/logvar"][:], logvar.numpy(), rtol=1e-4, atol=1e-5)
    assert (
        group.attrs["model_id"].startswith("sha256:")
        and group.attrs["level_dims"] == [32, 32, 32]
        and group.attrs["latent_dims"] == [32, 16, 8]
    )
    assert group.attrs["export"] == "readout"
    embedded = read_embeddings(str(out))
    assert embedded.obsm["X_hvae_level_2"].shape == (2700, 32)
    dataset = read_embeddings(str(out), as_="xarray")
    np.testing.assert_allclose(dataset["level_1_mean"].values, means[1].numpy(), rtol=1e-4, atol=1e-5)
    import xarray as xr

    plain = xr.open_zarr(str(out), group="level_0", consolidated=False)
    assert plain["mean"].shape == (2700, 32)
    subset = adata[::7].copy()
    attach_embeddings(subset, str(out))
    np.testing.assert_allclose(subset.obsm["X_hvae_level_0"], means[0].numpy()[::7], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_killed_embedding_resumes_to_the_same_output_and_a_complete_one_is_untouched(trained, tmp_path):
    run_dir, source, _ = trained
    straight = tmp_path / "straight.zarr"
    embed_quiet(run_dir, source, straight, chunk_rows=500)
    command = [
        sys.executable,
        "-m",
        "pipeline",
        "embed",
        "--checkpoint",
        str(run_dir),
        "--source",
        source,
        "--out",
        str(tmp_path / "killed.zarr"),
        "--chunk-rows",
        "500",
    ]
    killed = subprocess.run(command, capture_output=True, text=True, env={**ENV, "HVAE_FAIL_AFTER_CHUNKS": "3"})
    assert killed.returncode == 17
    with pytest.raises(ValueError, match="incomplete"):
        read_embeddings(str(tmp_path / "killed.zarr"))
    resumed = subprocess.run(command, capture_output=True, text=True, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout and "3 of 6 chunks already written" in resumed.stdout
    a, b = zarr.open_group(str(straight), mode="r"), zarr.open_group(str(tmp_path / "killed.zarr"), mode="r")
    for level in range(3):
        np.testing.assert_array_equal(a[f"level_{level}/mean"][:], b[f"level_{level}/mean"][:])
    assert list(a["obs_id"][:]) == list(b["obs_id"][:])
    chunk_file = tmp_path / "killed.zarr" / "level_0" / "mean" / "c" / "0" / "0"
    before = chunk_file.stat().st_mtime_ns
    again = subprocess.run(command, capture_output=True, text=True, env=ENV)
    assert again.returncode == 0 and "already complete" in again.stdout
    assert chunk_file.stat().st_mtime_ns == before


@pytest.mark.slow
def test_new_release_with_permuted_and_missing_genes(trained, tmp_path):
    run_dir, source, _ = trained
    original = tmp_path / "original.zarr"
    embed_quiet(run_dir, source, original)
    _, parts = load_model(find_checkpoint(run_dir))
    genes = parts["genes"]["feature_ids"]
    adata = ad.read_h5ad(source)
    rng = np.random.default_rng(0)
    keep = [g for g in genes if rng.random() > 0.05]  # 5% of the model's genes absent in the release
    release = adata[:1200, rng.permutation(keep)].copy()
    release.write_h5ad(tmp_path / "release.h5ad")
    messages = []
    embed(
        str(run_dir),
        {"source": str(tmp_path / "release.h5ad")},
        str(tmp_path / "release.zarr"),
        EmbedSettings(progress=False),
        echo=messages.append,
    )
    assert any(f"{len(keep)}/1000 genes found; {1000 - len(keep)} missing zero-filled" in m for m in messages)
    new = read_embeddings(str(tmp_path / "release.zarr"), lazy=False).obsm["X_hvae_level_0"]
    old = read_embeddings(str(original), lazy=False).obsm["X_hvae_level_0"][:1200]
    correlation = np.corrcoef(new.ravel(), old.ravel())[0, 1]
    assert correlation > 0.95, correlation


@pytest.mark.slow
def test_embed_errors(trained, tmp_path):
    run_dir, source, root = trained
    out = tmp_path / "e.zarr"
    embed_quiet(run_dir, source, out, chunk_rows=1000)
    other = tmp_path / "other_run"
    shutil.copytree(find_checkpoint(run_dir), other)
    state = torch.load(other / "model.pt", weights_only=False)
    state["ema"] = {k: (v + 0.01 if v.is_floating_point() else v) for k, v in state["ema"].items()}
    torch.save(state, other / "model.pt")
    with pytest.raises(FileExistsError, match="holds embeddings of another model"):
        embed_quiet(other, source, out, chunk_rows=1000)
    # A store an earlier version wrote (no export attribute: the code's posterior means) is not
    # resumed or taken as complete with today's export, and is left as it was.
    group = zarr.open_group(str(out), mode="r+")
    del group.attrs["export"]
    before = group["level_0/mean"][:]
    with pytest.raises(FileExistsError, match=r"another kind of level export \(code, not readout"):
        embed_quiet(run_dir, source, out, chunk_rows=1000)
    np.testing.assert_array_equal(zarr.open_group(str(out), mode="r")["level_0/mean"][:], before)
    assert embed_quiet(other, source, out, chunk_rows=1000, overwrite=True)["written_chunks"] == 3
    broken = tmp_path / "broken"
    shutil.copytree(find_checkpoint(run_dir), broken)
    (broken / "model.pt").write_bytes((broken / "model.pt").read_bytes()[:1000])
    with pytest.raises(ValueError, match="corrupt or partial"):
        embed_quiet(broken, source, tmp_path / "x.zarr")
    (broken / "trainer.pt").unlink()  # not needed to embed: model.pt alone is an inference checkpoint
    (broken / "model.pt").unlink()
    with pytest.raises(FileNotFoundError, match="neither a checkpoint directory nor a run directory"):
        embed_quiet(broken, source, tmp_path / "x.zarr")
    foreign = ad.AnnData(
        X=sp.csr_matrix(np.ones((10, 50), dtype=np.float32)), var=pd.DataFrame(index=[f"MOUSE{i}" for i in range(50)])
    )
    foreign.write_h5ad(tmp_path / "mouse.h5ad")
    with pytest.raises(ValueError, match="below the minimum overlap"):
        embed_quiet(run_dir, str(tmp_path / "mouse.h5ad"), tmp_path / "y.zarr")


@pytest.mark.slow
@pytest.mark.ray
def test_ray_actors_write_the_same_embeddings(trained, tmp_path, monkeypatch):
    import ray

    run_dir, source, root = trained
    monkeypatch.chdir(tmp_path)  # relative paths, as users type them (Ray actors run elsewhere)
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        embed_quiet(
            os.path.relpath(run_dir, tmp_path),
            os.path.relpath(root / "shards", tmp_path),
            "ray.zarr",
            chunk_rows=400,
            workers=2,
        )
    finally:
        ray.shutdown()
    embed_quiet(run_dir, str(root / "shards"), tmp_path / "local.zarr", chunk_rows=400)
    a, b = (
        zarr.open_group(str(tmp_path / "ray.zarr"), mode="r"),
        zarr.open_group(str(tmp_path / "local.zarr"), mode="r"),
    )
    assert a.attrs["complete"] and list(a["obs_id"][:]) == list(b["obs_id"][:])
    for level in range(3):
        np.testing.assert_allclose(a[f"level_{level}/mean"][:], b[f"level_{level}/mean"][:], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_evaluate_scores_every_level_against_baselines_on_the_same_cells(trained, tmp_path):
    run_dir, source, _ = trained
    embed_quiet(run_dir, source, tmp_path / "e.zarr")
    adata = ad.read_h5ad(source)
    adata[::-1].copy().write_h5ad(tmp_path / "reversed.h5ad")  # the same cells in the opposite order
    embed_quiet(run_dir, str(tmp_path / "reversed.h5ad"), tmp_path / "r.zarr")
    command = [
        sys.executable,
        "-m",
        "pipeline",
        "evaluate",
        "--embeddings",
        str(tmp_path / "e.zarr"),
        "--labels",
        "lineage,cell_type_fine",
        "--map-method",
        "pca",
        "--out",
        str(tmp_path / "report"),
    ]
    result = subprocess.run(
        [*command, "--pca", "--compare", f"reversed={tmp_path / 'r.zarr'}", "--max-cells", "2000"],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "report" / "metrics.json").read_text())
    levels = ["level 2 (top)", "level 1", "level 0 (finest)"]
    assert [r["representation"] for r in summary["results"]] == [f"HVAE {l}" for l in levels] + [
        f"reversed {l}" for l in levels
    ] + ["PCA (50 comps)"]
    assert summary["cells_evaluated"] == 2000 and summary["cells_total"] == 2700
    kl = summary["level_kl"]  # each level's KL from the store's checkpoint, and its share
    assert len(kl["nats"]) == 3 and all(v > 0 for v in kl["nats"]) and sum(kl["share"]) == pytest.approx(1.0)
    assert "KL per level (nats per cell on 2,000 cells" in (tmp_path / "report" / "report.md").read_text()
    # The labels came from the source the store records (made absolute and resolved, so a
    # checkout under a symlink records the real path).
    assert Path(summary["source"]["source"]).resolve() == Path(source).resolve()
    hvae, reversed_, pca = summary["results"][:3], summary["results"][3:6], summary["results"][6]
    for ours, theirs in zip(hvae, reversed_, strict=True):  # matched by obs id, not by row: the same scores
        for label in ("lineage", "cell_type_fine"):
            for metric, value in ours["labels"][label].items():
                assert theirs["labels"][label][metric] == pytest.approx(value, abs=0.01), (
                    ours["representation"],
                    metric,
                )
    assert pca["labels"]["lineage"]["knn_accuracy"] > 0.95
    assert max(r["labels"]["lineage"]["knn_accuracy"] for r in hvae) > 0.8
    # A read-out export's columns are not units: its active units are the training log's, not the report's.
    assert all(r["active_units"] is None for r in hvae + reversed_) and pca["active_units"] <= pca["dim"]
    report = (tmp_path / "report" / "report.md").read_text()
    assert (
        "## `lineage`" in report and "| HVAE level 0 (finest) | 32 |" in report and "| PCA (50 comps) | 50 |" in report
    )
    assert all((tmp_path / "report" / file).stat().st_size > 10_000 for file in summary["maps"].values())
    assert len(summary["maps"]) == 7
    # The report says which level to pass to scanpy for each label column.
    assert len(summary["guidance"]) == 2 and summary["guidance"][0].startswith("lineage: level ")
    assert 'use_rep="X_hvae_level_' in summary["guidance"][1] and "## Which level to use" in report
    wrong = subprocess.run([*command[:7], "lineage,celltype"], capture_output=True, text=True, env=ENV)
    assert wrong.returncode == 2 and "column(s) ['celltype'] not in the obs" in wrong.stderr
    same = subprocess.run([*command, "--overwrite", "--batch-key", "lineage"], capture_output=True, text=True, env=ENV)
    assert same.returncode == 2 and "'lineage' is both a label column and the batch key" in same.stderr
    # --out never writes into a folder of other files; scores no kNN cannot give are refused, by name.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("my notes")
    foreign = subprocess.run([*command[:-1], str(mine)], capture_output=True, text=True, env=ENV)
    assert foreign.returncode == 2 and "not an evaluate report" in foreign.stderr
    assert (mine / "report.md").read_text() == "my notes"
    for extra, said in ((["--k", "5000"], "--k 5000 is not below"), (["--max-cells", "0"], "--max-cells must be")):
        refused = subprocess.run([*command, "--overwrite", *extra], capture_output=True, text=True, env=ENV)
        assert refused.returncode == 2 and said in refused.stderr, refused.stderr[-1000:]


@pytest.mark.slow
def test_embed_release_records_an_unreachable_census_in_the_index(trained, tmp_path, monkeypatch):
    import cellxgene_census._release_directory as directory

    from pipeline.embed.release import embed_release, read_index

    run_dir, _, _ = trained
    monkeypatch.setattr(directory, "CELL_CENSUS_RELEASE_DIRECTORY_URL", "http://127.0.0.1:9/release.json")
    with pytest.raises(ValueError, match="cannot reach the Census to open release 'stable'.*--census-uri"):
        embed_release(str(run_dir), str(tmp_path / "releases"), census_version="stable", echo=lambda *_: None)
    [entry] = read_index(str(tmp_path / "releases"))
    assert entry["release"] == "stable" and entry["status"] == "failed" and "cannot reach the Census" in entry["error"]


@pytest.mark.slow
def test_embed_release_is_idempotent_resumes_and_keeps_an_index(trained, census_uri, tmp_path):
    run_dir, _, _ = trained
    root = tmp_path / "releases"
    release = [
        sys.executable,
        "-m",
        "pipeline",
        "embed-release",
        "--checkpoint",
        str(run_dir),
        "--census-uri",
        census_uri,
        "--out-root",
        str(root),
        "--chunk-rows",
        "500",
    ]
    unnamed = subprocess.run(release, capture_output=True, text=True, env=ENV)
    assert (
        unnamed.returncode == 2 and "records no census_build_date" in unnamed.stderr and "--release" in unnamed.stderr
    )
    first = subprocess.run([*release, "--release", "2025-01-30"], capture_output=True, text=True, env=ENV)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "embedded: release 2025-01-30 (2,638 cells)" in first.stdout
    store = root / "2025-01-30" / "embeddings.zarr"
    assert read_embeddings(str(store)).n_obs == 2638  # the fixture's primary cells
    index = json.loads((root / "index.json").read_text())["runs"]
    assert [(r["release"], r["status"], r["n_cells"]) for r in index] == [("2025-01-30", "complete", 2638)]
    manifest = json.loads((root / "2025-01-30" / "embeddings.zarr.index" / "index.json").read_text())
    assert manifest["store"]["n_obs"] == 2638 and index[0]["index"].endswith("embeddings.zarr.index")  # for `query`
    chunk = store / "level_0" / "mean" / "c" / "0" / "0"
    before = chunk.stat().st_mtime_ns
    again = subprocess.run([*release, "--release", "2025-01-30"], capture_output=True, text=True, env=ENV)
    assert again.returncode == 0 and "already embedded" in again.stdout and chunk.stat().st_mtime_ns == before
    # The same release with another obs filter is not "already embedded": refused, the store untouched.
    other = subprocess.run(
        [*release, "--release", "2025-01-30", "--obs-filter", "cell_type == 'B'"],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert other.returncode == 2 and "with obs filter 'is_primary_data == True'" in other.stderr, other.stderr[-2000:]
    assert "(is_primary_data == True) and (cell_type == 'B')" in other.stderr and chunk.stat().st_mtime_ns == before
    assert json.loads((root / "index.json").read_text())["runs"] == index

    # The job killed mid-way (after 2 of 6 chunks) resumes on the next run, to the same output.
    killed = subprocess.run(
        [*release, "--release", "2025-03-01"],
        capture_output=True,
        text=True,
        env={**ENV, "HVAE_FAIL_AFTER_CHUNKS": "2"},
    )
    assert killed.returncode == 17
    index = json.loads((root / "index.json").read_text())["runs"]
    assert [(r["release"], r["status"]) for r in index] == [("2025-01-30", "complete"), ("2025-03-01", "running")]
    resumed = subprocess.run([*release, "--release", "2025-03-01"], capture_output=True, text=True, env=ENV)
    assert resumed.returncode == 0 and "2 of 6 chunks already written" in resumed.stdout, (
        resumed.stdout + resumed.stderr
    )
    partial = root / "2025-03-01" / "embeddings.zarr"
    for level in range(3):
        np.testing.assert_array_equal(
            zarr.open_group(str(partial), mode="r")[f"level_{level}/mean"][:],
            zarr.open_group(str(store), mode="r")[f"level_{level}/mean"][:],
        )
    index = json.loads((root / "index.json").read_text())["runs"]
    assert [(r["release"], r["status"]) for r in index] == [("2025-01-30", "complete"), ("2025-03-01", "complete")]
    missing = subprocess.run(
        [*release[:-6], "--census-uri", str(tmp_path / "no_census"), "--out-root", str(root), "--release", "x"],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert missing.returncode == 2 and "the Census copy" in missing.stderr and "does not exist" in missing.stderr
    bad = subprocess.run([*release, "--release", "../elsewhere"], capture_output=True, text=True, env=ENV)
    assert bad.returncode == 2 and "not a plain directory name" in bad.stderr


def test_embed_never_deletes_what_it_did_not_write_and_never_mixes_sources(trained, tmp_path):
    run_dir, source, _ = trained
    # An existing folder that is not an embeddings store is refused, its files untouched.
    mine = tmp_path / "my_folder"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not an embeddings store"):
        embed_quiet(run_dir, source, mine)
    assert (mine / "notes.txt").read_text() == "mine"

    out = tmp_path / "e.zarr"
    embed_quiet(run_dir, source, out, chunk_rows=1000)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    # Another source of the same size: not "already complete", refused naming both.
    other = tmp_path / "renamed.h5ad"
    adata = ad.read_h5ad(source)
    adata.obs_names = [f"other_{i}" for i in range(adata.n_obs)]
    adata.write_h5ad(other)
    with pytest.raises(
        FileExistsError, match=r"embedded from another source: .*pbmc3k.*2,700 cells.*this source is .*renamed"
    ):
        embed_quiet(run_dir, str(other), out, chunk_rows=1000)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    # A killed job rerun with another source does not resume: the partial store is one source's.
    part = tmp_path / "part.zarr"
    killed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "embed",
            "--checkpoint",
            str(run_dir),
            "--source",
            source,
            "--out",
            str(part),
            "--chunk-rows",
            "500",
        ],
        capture_output=True,
        text=True,
        env={**ENV, "HVAE_FAIL_AFTER_CHUNKS": "2"},
    )
    assert killed.returncode == 17, killed.stderr[-2000:]
    with pytest.raises(FileExistsError, match=r"embedded from another source: .*this source is .*renamed"):
        embed_quiet(run_dir, str(other), part, chunk_rows=500)
    assert embed_quiet(run_dir, source, part, chunk_rows=500)["written_chunks"] == 4  # its own source resumes

    # The source's counts changed in place with its size and times kept (a file restored or copied
    # with `cp -p`): the resume reads the finished chunks again and refuses, writing nothing.
    import h5py

    kept = tmp_path / "kept.h5ad"
    ad.read_h5ad(source).write_h5ad(kept)  # uncompressed: a value changed in place keeps the file's size
    part = tmp_path / "part_kept.zarr"
    command = [sys.executable, "-m", "pipeline", "embed", "--checkpoint", str(run_dir), "--source", str(kept)]
    command += ["--out", str(part), "--chunk-rows", "500"]
    killed = subprocess.run(command, capture_output=True, text=True, env={**ENV, "HVAE_FAIL_AFTER_CHUNKS": "2"})
    assert killed.returncode == 17, killed.stderr[-2000:]
    times = os.stat(kept)
    with h5py.File(kept, "r+") as handle:
        data = handle["X/data"]
        data[:20] = data[:20][::-1] + 1  # cell 0's counts (chunk 0), same dtype and length
    os.utime(kept, ns=(times.st_atime_ns, times.st_mtime_ns))
    assert os.stat(kept).st_size == times.st_size
    written = {p: p.stat().st_mtime_ns for p in part.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"kept.h5ad changed since .*part_kept.zarr was partly embedded: rows 0-499"):
        embed_quiet(run_dir, str(kept), part, chunk_rows=500)
    assert {p: p.stat().st_mtime_ns for p in part.rglob("*") if p.is_file()} == written

    # --overwrite with a source that fails leaves the complete store as it was.
    bad = tmp_path / "bad.h5ad"
    broken = adata.copy()
    broken.X = broken.X.copy()
    broken.X.data[broken.X.indptr[1500]] = -3.0  # a negative count in cell 1500, chunk 2
    broken.write_h5ad(bad)
    with pytest.raises(ValueError, match="negative"):
        embed_quiet(run_dir, str(bad), out, chunk_rows=1000, overwrite=True)
    assert read_embeddings(str(out)).uns["hvae_embeddings"]["complete"]
    np.testing.assert_array_equal(read_embeddings(str(out), lazy=False).obs_names, ad.read_h5ad(source).obs_names)
    # ... and a good one replaces it once complete.
    assert embed_quiet(run_dir, str(other), out, chunk_rows=1000, overwrite=True)["complete"]
    assert read_embeddings(str(out), lazy=False).obs_names[0] == "other_0"
    assert not (tmp_path / "e.zarr.overwrite-partial").exists()

    # Duplicate obs names are refused, the first named.
    duplicated = adata.copy()
    duplicated.obs_names = ["cell_a"] * 2 + [f"c{i}" for i in range(adata.n_obs - 2)]
    duplicated.write_h5ad(tmp_path / "dup.h5ad")
    with pytest.raises(ValueError, match=r"1 obs names occur more than once \(e.g. \['cell_a'\]\)"):
        embed_quiet(run_dir, str(tmp_path / "dup.h5ad"), tmp_path / "dup.zarr")
    for bad_settings, message in [
        ({"chunk_rows": 0}, "--chunk-rows must be an integer >= 1"),
        ({"workers": -1}, "--workers must be an integer >= 0"),
        ({"batch_size": 0}, "--batch-size must be an integer >= 1"),
        ({"min_gene_overlap": 0.0}, "--min-gene-overlap must be in"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            EmbedSettings(**bad_settings)


@pytest.fixture
def fresh(tmp_path):
    """Two untrained 60-gene models (seeds 0 and 1) saved as checkpoints, 300 labelled cells of
    their genes, and the cells embedded by model0 (e.zarr): what the careless-user cases need, in a second."""
    from hvae import HVAEConfig, HierarchicalVAE, fit_gene_modules
    from pipeline.config import TrainConfig
    from pipeline.train.checkpoint import save_checkpoint
    from pipeline.train.step import Trainer

    genes = [f"gene{i}" for i in range(60)]
    for seed in (0, 1):
        torch.manual_seed(seed)
        config = fit_gene_modules(
            HVAEConfig(n_genes=len(genes), latent_dims=(8, 4), hidden_dim=32),
            torch.poisson(torch.full((256, len(genes)), 1.5)),
        )
        save_checkpoint(
            tmp_path / f"model{seed}",
            Trainer(HierarchicalVAE(config), TrainConfig()),
            config,
            "{}\n",
            {"step": 0},
            genes,
            None,
            [],
        )
    rng = np.random.default_rng(0)
    names = [f"cell{i}" for i in range(300)]
    obs = pd.DataFrame(
        {
            "kind": rng.choice(["a", "b", "c"], 300),
            "serial": np.arange(300),
            "barcode": names,
            "depth": rng.normal(size=300),
            "tissue": "blood",
        },
        index=names,
    )
    adata = ad.AnnData(
        sp.csr_matrix(rng.poisson(1.5, (300, len(genes))).astype(np.float32)), obs=obs, var=pd.DataFrame(index=genes)
    )
    adata.write_h5ad(tmp_path / "cells.h5ad")
    embed_quiet(tmp_path / "model0", str(tmp_path / "cells.h5ad"), tmp_path / "e.zarr")
    return tmp_path


def test_an_untrained_checkpoint_is_embedded_with_a_warning(fresh):
    said = []
    embed(
        str(fresh / "model1"),
        {"source": str(fresh / "cells.h5ad")},
        str(fresh / "u.zarr"),
        EmbedSettings(progress=False),
        echo=said.append,
    )
    assert any("was never trained (step 0)" in line for line in said), said


def test_embed_release_over_another_store_says_what_works_not_overwrite(fresh):
    from pipeline.embed.release import embed_release

    root = fresh / "releases"
    (root / "r1").mkdir(parents=True)
    shutil.copytree(fresh / "e.zarr", root / "r1" / "embeddings.zarr")  # release r1, embedded by model0
    quiet = EmbedSettings(progress=False)
    for model, settings, said in (
        ("model1", quiet, "another model.*give this model its own --out-root"),
        ("model0", EmbedSettings(chunk_rows=100, progress=False), "rerun with --chunk-rows 16384"),
    ):
        with pytest.raises(FileExistsError, match=said) as refused:
            embed_release(
                str(fresh / model),
                str(root),
                census_uri=str(fresh),
                release="r1",
                settings=settings,
                index=False,
                echo=lambda *_: None,
            )
        assert "--overwrite" not in str(refused.value)  # embed-release has no such option
    assert not (root / "index.json").exists()  # refused before the index was touched


def test_embed_release_names_a_census_uri_that_is_not_a_census(fresh):
    from pipeline.embed.release import embed_release

    with pytest.raises(ValueError, match="--census-uri .*cells.h5ad is not a Census"):
        embed_release(
            str(fresh / "model0"), str(fresh / "releases"), census_uri=str(fresh / "cells.h5ad"), echo=lambda *_: None
        )


def evaluate_quietly(store, **settings):
    from pipeline.evaluate.report import EvaluateSettings, evaluate_embeddings

    said = []
    summary = evaluate_embeddings(str(store), EvaluateSettings(maps=False, **settings), echo=said.append)
    return summary, said


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux's /sys, a folder nobody writes to")
def test_evaluate_refuses_an_unwritable_out_before_the_work(fresh):
    from pipeline.evaluate.report import EvaluateSettings, evaluate_embeddings

    said = []
    with pytest.raises(ValueError, match="--out /sys/hvae-pipeline-test: cannot write to /sys"):
        evaluate_embeddings(
            str(fresh / "e.zarr"),
            EvaluateSettings(labels=("kind",), out_dir="/sys/hvae-pipeline-test", maps=False),
            echo=said.append,
        )
    assert said == []  # nothing was scored first


def test_evaluate_replaces_an_earlier_report_only_with_overwrite(fresh):
    report = fresh / "report"
    evaluate_quietly(fresh / "e.zarr", labels=("kind",), out_dir=str(report))
    with pytest.raises(FileExistsError, match="holds an evaluate report already; pass --overwrite"):
        evaluate_quietly(fresh / "e.zarr", labels=("kind",), out_dir=str(report), k=5)
    assert json.loads((report / "metrics.json").read_text())["k"] == 15  # untouched
    summary, _ = evaluate_quietly(fresh / "e.zarr", labels=("kind",), out_dir=str(report), k=5, overwrite=True)
    assert json.loads((report / "metrics.json").read_text())["k"] == 5 and summary["report"] == str(
        report / "report.md"
    )
    assert sorted(p.name for p in fresh.iterdir() if p.name.startswith("report")) == ["report"]  # no staging left


def test_evaluate_refuses_a_label_no_knn_can_score_by_name(fresh):
    """Numbers, ids and a single class would each still name a "best" level."""
    for label, said in (
        ("serial", "'serial' .* looks continuous"),
        ("barcode", r"'barcode' .* \(an id, not a label\)"),
        ("depth", "'depth' .* looks continuous"),
        ("tissue", "'tissue' .* has 1 class"),
    ):
        with pytest.raises(ValueError, match=said):
            evaluate_quietly(fresh / "e.zarr", labels=(label,), out_dir=str(fresh / "report"))


def test_shards_written_again_in_place_are_not_taken_for_the_ones_embedded(fresh):
    """Same ids and genes, other counts (``shard --overwrite`` from an edited file): not resumed, not "complete"."""
    import time

    from pipeline.data import ShardSettings, open_source, write_shards

    shards, cells = fresh / "shards", fresh / "cells.h5ad"
    write_shards(
        open_source(str(cells)), str(shards), ShardSettings(shard_size=100, progress=False), echo=lambda *_: None
    )
    embed_quiet(fresh / "model0", str(shards), fresh / "s.zarr", chunk_rows=100)
    adata = ad.read_h5ad(cells)
    adata.X = sp.csr_matrix(adata.X.toarray()[::-1])
    adata.write_h5ad(cells)
    time.sleep(0.05)  # a later manifest, whatever the clock's resolution
    write_shards(
        open_source(str(cells)),
        str(shards),
        ShardSettings(shard_size=100, overwrite=True, progress=False),
        echo=lambda *_: None,
    )
    with pytest.raises(FileExistsError, match="embedded from another source.*Pass --overwrite"):
        embed_quiet(fresh / "model0", str(shards), fresh / "s.zarr", chunk_rows=100)
