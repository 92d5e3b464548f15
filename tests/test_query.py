"""``index`` and ``query``: an index of every level of an embeddings store, and new cells mapped to
the atlas (nearest cells, label transfer per level, an "unlike the atlas" flag), on a real model,
real Zarr stores and real faiss indexes."""

import json
import subprocess

import anndata as ad
import numpy as np
import pytest
import zarr

pytestmark = pytest.mark.slow  # a model trained once for the module (45 s), then about a minute


def cli(*args):
    """The command line, in this process (a subprocess per call cost 3 s of imports)."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    """A model trained on 4 of 6 donors of a synthetic atlas with one lineage left out, its atlas
    embedded; the other donors (with the left-out lineage) as the query."""
    from pipeline import HVAEModel
    from pipeline.data.synthetic import SyntheticAtlas, SyntheticAtlasSpec

    root = tmp_path_factory.mktemp("query")
    adata = SyntheticAtlas(SyntheticAtlasSpec(n_cells=4_000, n_genes=300, n_donors=6, seed=5)).to_anndata()
    donors = adata.obs["donor_id"].astype(str)
    held = donors.isin(sorted(donors.unique())[-2:]).to_numpy()
    novel = (adata.obs["lineage"].astype(str) == adata.obs["lineage"].astype(str).iloc[0]).to_numpy()
    reference, query = adata[~held & ~novel].copy(), adata[held].copy()
    reference.write_h5ad(root / "atlas.h5ad")
    query.write_h5ad(root / "query.h5ad")
    model = HVAEModel(reference, batch_key="donor_id", latent_dims=(16, 8, 4), hidden_dim=64)
    model.train(max_steps=600, batch_size=128, progress=False)
    model.save(root / "model")
    done = cli("embed", "--checkpoint", root / "model", "--source", root / "atlas.h5ad", "--out", root / "atlas.zarr")
    assert done.returncode == 0, done.stderr[-2000:]
    return root, reference, query


def test_index_records_its_store_and_reaches_its_recall_and_a_rerun_does_nothing(atlas):
    root, reference, _ = atlas
    built = cli("index", "--embeddings", root / "atlas.zarr")
    assert built.returncode == 0, built.stderr[-2000:]
    manifest = json.loads((root / "atlas.zarr.index" / "index.json").read_text())
    assert manifest["store"]["n_obs"] == reference.n_obs and manifest["store"]["model_id"].startswith("sha256:")
    assert len(manifest["levels"]) == 3
    for level in manifest["levels"]:
        assert level["recall_at_10"] >= 0.97, level  # measured against exact search on atlas cells
        assert sum(s["stop"] - s["start"] for s in level["shards"]) == reference.n_obs
    first = (root / "atlas.zarr.index" / manifest["levels"][0]["shards"][0]["file"]).stat().st_mtime_ns
    again = cli("index", "--embeddings", root / "atlas.zarr")
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert (root / "atlas.zarr.index" / manifest["levels"][0]["shards"][0]["file"]).stat().st_mtime_ns == first


def test_shards_answer_as_one_index_and_atlas_cells_find_themselves(atlas, tmp_path):
    from pipeline.query import AtlasIndex, IndexSettings, build_index

    root, reference, _ = atlas
    build_index(str(root / "atlas.zarr"), str(tmp_path / "one"), IndexSettings(), echo=lambda *_: None)
    build_index(str(root / "atlas.zarr"), str(tmp_path / "many"), IndexSettings(shard_cells=700), echo=lambda *_: None)
    one, many = AtlasIndex(str(tmp_path / "one")), AtlasIndex(str(tmp_path / "many"))
    assert len(many.level(0)["shards"]) == -(-reference.n_obs // 700)
    vectors = zarr.open_group(str(root / "atlas.zarr"), mode="r")["level_0/mean"][:300]
    nlist = one.level(0)["nlist"]
    d1, i1 = one.search(0, vectors, 10, nprobe=nlist)  # every list scanned: exact
    d2, i2 = many.search(0, vectors, 10, nprobe=nlist)
    np.testing.assert_allclose(d1, d2, rtol=1e-4, atol=1e-4)
    assert (i1[:, 0] == np.arange(300)).mean() > 0.99 and (i2[:, 0] == np.arange(300)).mean() > 0.99


def test_query_transfers_labels_per_level_and_flags_cells_unlike_the_atlas(atlas, tmp_path):
    root, reference, query = atlas
    cli("index", "--embeddings", root / "atlas.zarr")
    out = tmp_path / "q.h5ad"
    done = cli(
        "query",
        "--checkpoint",
        root / "model",
        "--index",
        root / "atlas.zarr",
        "--source",
        root / "query.h5ad",
        "--labels",
        "lineage",
        "--labels",
        "subtype",
        "--out",
        out,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"mapped {query.n_obs:,} cells" in done.stdout
    mapped = ad.read_h5ad(out)
    assert mapped.n_obs == query.n_obs and mapped.n_vars == query.n_vars  # the query as it was, results beside
    known = mapped.obs["lineage"].astype(str).isin(set(reference.obs["lineage"].astype(str))).to_numpy()
    for level in range(3):
        lineage = (mapped.obs[f"lineage_level_{level}"].astype(str) == mapped.obs["lineage"].astype(str)).to_numpy()
        assert lineage[known].mean() > 0.8, (level, lineage[known].mean())  # misaligned labels: ~1/3
        confidence = mapped.obs[f"lineage_level_{level}_confidence"].to_numpy()
        assert ((confidence > 0) & (confidence <= 1)).all()
        rows = mapped.obsm[f"hvae_neighbors_level_{level}"]
        assert rows.shape == (query.n_obs, 15) and rows.min() >= 0 and rows.max() < reference.n_obs
        assert (np.diff(mapped.obsm[f"hvae_distances_level_{level}"], axis=1) >= -1e-5).all()
    # The left-out lineage's subtypes are never predicted, and its cells lie farther from the atlas
    # than the others (a left-out subtype is not told apart here: benchmarks/query.py measures both).
    left_out = ~known
    assert not mapped.obs["subtype_level_0"].astype(str).isin(set(mapped.obs["subtype"][left_out].astype(str))).any()
    score = mapped.obs["unlike_level_0_score"].to_numpy()
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(left_out, score) > 0.55  # the direction (300 steps left level 0 with no active unit)
    assert mapped.obs["unlike_level_0"][~left_out].mean() < 0.05  # calibrated at 1% of atlas cells
    assert mapped.uns["hvae_query"]["model_id"].startswith("sha256:")


def test_the_notebook_call_matches_the_command_line(atlas, tmp_path):
    from pipeline import HVAEModel

    root, _, query = atlas
    cli("index", "--embeddings", root / "atlas.zarr")
    model = HVAEModel.load(root / "model")
    cells = query[:200].copy()
    model.map_query(cells, root / "atlas.zarr", labels=["cell_type"], levels=[0, 2])
    done = cli(
        "query",
        "--checkpoint",
        root / "model",
        "--index",
        root / "atlas.zarr.index",
        "--source",
        root / "query.h5ad",
        "--labels",
        "cell_type",
        "--out",
        tmp_path / "q.parquet",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    import pandas as pd

    table = pd.read_parquet(tmp_path / "q.parquet").iloc[:200]
    for level in (0, 2):
        assert (
            cells.obs[f"cell_type_level_{level}"].astype(str).to_numpy()
            == table[f"cell_type_level_{level}"].astype(str).to_numpy()
        ).mean() > 0.99
    assert "cell_type_level_1" not in cells.obs and "X_hvae_level_1" not in cells.obsm


def test_bad_input_is_named_and_changes_nothing(atlas, tmp_path):
    from pipeline import HVAEModel
    from pipeline.query import IndexMismatch

    root, reference, query = atlas
    cli("index", "--embeddings", root / "atlas.zarr")
    base = ["query", "--checkpoint", root / "model", "--index", root / "atlas.zarr", "--labels", "lineage"]
    # a query with too few of the model's genes
    few = query[:, :100].copy()
    few.write_h5ad(tmp_path / "few.h5ad")
    done = cli(*base, "--source", tmp_path / "few.h5ad", "--out", tmp_path / "a.h5ad")
    assert done.returncode == 2 and "genes" in done.stderr and not (tmp_path / "a.h5ad").exists()
    # a level that does not exist, an atlas column that does not exist
    done = cli(*base, "--source", root / "query.h5ad", "--level", "7", "--out", tmp_path / "a.h5ad")
    assert done.returncode == 2 and "level 7 does not exist" in done.stderr
    done = cli(*base[:-2], "--labels", "tissue", "--source", root / "query.h5ad", "--out", tmp_path / "a.h5ad")
    assert done.returncode == 2 and "no obs column 'tissue'" in done.stderr and not (tmp_path / "a.h5ad").exists()
    # an existing --out is kept unless --overwrite
    (tmp_path / "keep.h5ad").write_text("mine")
    done = cli(*base, "--source", root / "query.h5ad", "--out", tmp_path / "keep.h5ad")
    assert done.returncode == 2 and "--overwrite" in done.stderr and (tmp_path / "keep.h5ad").read_text() == "mine"
    # more neighbours than the atlas has cells; an --out where nothing can be written (refused before the work)
    done = cli(*base, "--source", root / "query.h5ad", "--k", str(reference.n_obs + 1), "--out", tmp_path / "a.h5ad")
    assert done.returncode == 2 and f"atlas's {reference.n_obs} cells" in done.stderr
    with pytest.raises(ValueError, match="k must be an integer from 1"):
        HVAEModel.load(root / "model").map_query(query[:10].copy(), root / "atlas.zarr", k=0)
    done = cli(*base, "--source", root / "query.h5ad", "--out", "/sys/hvae-pipeline-test/q.h5ad")
    assert done.returncode == 2 and "cannot write to /sys" in done.stderr and "genes:" not in done.stdout
    # another model
    other = HVAEModel(reference, latent_dims=(4, 2), hidden_dim=16)
    other.train(max_steps=5, batch_size=64, progress=False)
    other.save(tmp_path / "other")
    done = cli(
        "query",
        "--checkpoint",
        tmp_path / "other",
        "--index",
        root / "atlas.zarr",
        "--source",
        root / "query.h5ad",
        "--out",
        tmp_path / "a.h5ad",
    )
    assert done.returncode == 2 and "embedded by model" in done.stderr
    with pytest.raises(IndexMismatch, match="embedded by model"):
        other.map_query(query[:10].copy(), root / "atlas.zarr")
    # an index of another store; a foreign directory as --out
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    done = cli("index", "--embeddings", root / "atlas.zarr", "--out", foreign)
    assert done.returncode == 2 and "not an index" in done.stderr and (foreign / "notes.txt").read_text() == "mine"


def test_an_index_of_an_older_store_is_refused_until_rebuilt(atlas, tmp_path):
    root, reference, query = atlas
    store = tmp_path / "atlas.zarr"
    first = cli("embed", "--checkpoint", root / "model", "--source", root / "atlas.h5ad", "--out", store)
    assert first.returncode == 0 and cli("index", "--embeddings", store).returncode == 0
    smaller = reference[:1500].copy()
    smaller.write_h5ad(tmp_path / "smaller.h5ad")
    again = cli(
        "embed", "--checkpoint", root / "model", "--source", tmp_path / "smaller.h5ad", "--out", store, "--overwrite"
    )
    assert again.returncode == 0, again.stderr[-2000:]
    stale = cli(
        "query",
        "--checkpoint",
        root / "model",
        "--index",
        store,
        "--source",
        root / "query.h5ad",
        "--out",
        tmp_path / "q.h5ad",
    )
    assert stale.returncode == 2 and "Rebuild it" in stale.stderr and not (tmp_path / "q.h5ad").exists()
    refused = cli("index", "--embeddings", store)
    assert refused.returncode == 2 and "--overwrite" in refused.stderr
    rebuilt = cli("index", "--embeddings", store, "--overwrite")
    assert rebuilt.returncode == 0, rebuilt.stderr[-2000:]
    assert json.loads((tmp_path / "atlas.zarr.index" / "index.json").read_text())["store"]["n_obs"] == 1500
    assert not list(tmp_path.glob(".index-partial-*")) and not (tmp_path / "atlas.zarr.index.replaced").exists()
    done = cli(
        "query",
        "--checkpoint",
        root / "model",
        "--index",
        store,
        "--source",
        root / "query.h5ad",
        "--out",
        tmp_path / "q.h5ad",
    )
    assert done.returncode == 0, done.stderr[-2000:]
