"""The ``hvae-pipeline`` command line (also ``python -m pipeline``).

Subcommands: ``simulate``, ``shard``, ``train``, ``embed``, ``embed-release``, ``index``, ``query``, ``evaluate``
and ``demo``.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

from pathlib import Path

import typer

app = typer.Typer(
    name="hvae-pipeline",
    help="Out-of-core training of hierarchical VAEs on single-cell atlases.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@contextmanager
def _named_errors(*also: type[BaseException]):
    """Bad input and an unusable path end the command with one line naming them and exit status 2;
    a traceback is left for bugs. ``also``: more error types that are expected here."""
    try:
        yield
    except Exception as error:
        if not (isinstance(error, also) or _expected(error)):
            raise
        typer.echo(f"error: {_one_line(error)}", err=True)
        raise typer.Exit(2) from None


def _expected(error: Exception) -> bool:
    """Errors of the input or the environment, not of the code: bad values (ValueError, KeyError),
    paths missing, unreadable or unwritable (OSError), a file that is not YAML, a path that is not a
    TileDB store."""
    if isinstance(error, (ValueError, KeyError, OSError)):
        return True
    return any(kind.__module__.split(".")[0] in ("yaml", "tiledb", "tiledbsoma") for kind in type(error).__mro__)


def _one_line(error: Exception) -> str:
    text = " ".join(str(error).split())
    return text if isinstance(error, (ValueError, KeyError, OSError)) else f"{type(error).__name__}: {text}"


def _parse_ints(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"{option} takes comma-separated integers, got {text!r}") from None
    return values


@app.command()
def simulate(
    out: Path = typer.Argument(..., help="Output path ending in .h5ad or .zarr (AnnData-Zarr)."),
    n_cells: int = typer.Option(10_000, help="Number of cells."),
    n_genes: int = typer.Option(2_000, help="Number of genes."),
    branching: str = typer.Option("3,3,3", help="Children per tree level, coarsest first (lineages,types,subtypes)."),
    n_donors: int = typer.Option(8, help="Number of donors (batch effects), stored contiguously."),
    seed: int = typer.Option(0, help="Random seed: the same seed gives the same atlas."),
    block_size: int = typer.Option(16_384, help="Cells per block written (counts are generated 1,024 rows at a time)."),
    format: str = typer.Option(
        "auto",
        help="auto (from the suffix: .h5ad / .zarr), shards (pre-shuffled shards + "
        "manifest, as `shard` writes) or soma (a TileDB-SOMA Experiment).",
    ),
    shard_size: int = typer.Option(65_536, help="Cells per shard with --format shards."),
    workers: int = typer.Option(
        0, help="--format shards: generate and write on N Ray tasks at a time (as `shard --workers`)."
    ),
    overwrite: bool = typer.Option(False, help="Replace an existing atlas at OUT (only once the new one is complete)."),
) -> None:
    """Write a synthetic atlas with a known cell-type tree and donor effects, streamed in blocks."""
    from .data.synthetic import SyntheticAtlas, SyntheticAtlasSpec, write_synthetic_atlas
    from .storage import check_writable

    final = out
    with _named_errors(), _usage_errors():
        check_writable(out.parent)  # an unwritable place is refused before the atlas is generated
        if format != "shards":  # `shard`'s writer refuses and stages on its own
            out = _simulate_target(out, overwrite, format)
        spec = SyntheticAtlasSpec(
            n_cells=n_cells,
            n_genes=n_genes,
            branching=_parse_ints(branching, "--branching"),
            n_donors=n_donors,
            seed=seed,
            block_size=block_size,
            effect_sd=_default_per_level("effect_sd", len(branching.split(","))),
            program_fraction=_default_per_level("program_fraction", len(branching.split(","))),
        )
        if format == "auto":
            path = write_synthetic_atlas(spec, out)
        elif format in ("shards", "soma"):
            from .data.sources import SyntheticSource

            source = SyntheticSource(SyntheticAtlas(spec))
            if format == "soma":
                from .data.soma_writer import write_soma

                path = write_soma(source, str(out), block_size=block_size)
            else:
                from .data import ShardSettings, write_shards

                from functools import partial

                write_shards(
                    source,
                    str(out),
                    ShardSettings(
                        shard_size=shard_size, seed=seed, block_size=block_size, overwrite=overwrite, workers=workers
                    ),
                    echo=typer.echo,
                    reopen=partial(_synthetic_source, spec),
                )
                path = out
        else:
            raise ValueError(f"--format must be auto, shards or soma, got {format!r}")
        if out != final:  # the new atlas is complete: only now does it replace the old one
            _swap_in(out, final)
            path = final
    typer.echo(f"wrote {n_cells:,} cells x {n_genes:,} genes to {path}")


@contextmanager
def _usage_errors():
    """``simulate``'s bad values and existing outputs, as usage errors (exit status 2)."""
    try:
        yield
    except (ValueError, FileExistsError) as error:
        raise typer.BadParameter(str(error)) from None


def _synthetic_source(spec):
    """The synthetic atlas of ``spec`` as a source (what a Ray task of `simulate --workers` opens)."""
    from .data.sources import SyntheticSource
    from .data.synthetic import SyntheticAtlas

    return SyntheticSource(SyntheticAtlas(spec))


def _simulate_target(out: Path, overwrite: bool, format: str) -> Path:
    """Where ``simulate`` writes: ``out``, or with --overwrite over an atlas it can recognise, a
    sibling that replaces it once complete. An existing file or non-empty folder is refused without
    --overwrite, and a folder that is not an AnnData-Zarr or SOMA store is refused even with it (it
    may hold the user's other files)."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return out
    if not overwrite:
        what = "a file" if out.is_file() else f"a folder holding {sorted(p.name for p in out.iterdir())[:5]}"
        raise FileExistsError(
            f"{out} exists ({what}); pass --overwrite to replace it, or choose another path (nothing was changed)"
        )
    if out.is_dir() and not any((out / marker).exists() for marker in ("zarr.json", ".zgroup", "__tiledb_group.tdb")):
        raise FileExistsError(
            f"{out} is a folder but not an AnnData-Zarr or SOMA store; --overwrite replaces only an "
            "atlas, never other files: choose another path (nothing was changed)"
        )
    staged = out.with_name(f"{out.stem}.overwrite-partial{out.suffix}")
    if staged.is_dir():
        import shutil

        shutil.rmtree(staged)
    elif staged.exists():
        staged.unlink()
    return staged


def _swap_in(staged: Path, final: Path) -> None:
    if staged.is_file():
        os.replace(staged, final)  # atomic for a file
    else:
        from .storage import replace_tree

        replace_tree(str(staged), str(final))


@app.command()
def shard(
    sources: list[str] = typer.Argument(
        ...,
        help="h5ad, AnnData-Zarr or TileDB-SOMA Experiment path/URL, or the word 'census'; several "
        "are sharded as one atlas (obs column source_file names each cell's).",
        metavar="SOURCE",
    ),
    out: str = typer.Option(
        ..., "--out", help="Output directory (local path or fsspec URL such as s3://bucket/shards)."
    ),
    shard_size: int = typer.Option(65_536, help="Cells per shard (shards come out near-equal in size)."),
    seed: int = typer.Option(0, help="Seed of the global shuffle."),
    layer: str | None = typer.Option(
        None, help="Count layer: AnnData 'raw' (raw/X) or a layers key; SOMA X layer (default 'raw')."
    ),
    obs_filter: str | None = typer.Option(
        None,
        help="Keep cells matching this expression, e.g. \"tissue_general == 'blood'\". "
        "For the Census it is AND-ed with 'is_primary_data == True' (see --all-cells).",
    ),
    all_cells: bool = typer.Option(
        False,
        "--all-cells",
        help="Census: read every copy of a cell (drop the default "
        "is_primary_data == True that any --obs-filter is AND-ed with).",
    ),
    var_filter: str | None = typer.Option(None, help="SOMA var value filter (SOMA and Census sources)."),
    genes: Path | None = typer.Option(
        None, help="Gene list: one feature_id per line (or CSV/TSV with a feature_id column)."
    ),
    n_top_genes: int | None = typer.Option(None, help="Select this many highly variable genes in a streaming pass."),
    hvg_batch_key: str | None = typer.Option(None, help="obs column for per-batch HVG selection."),
    min_gene_overlap: float = typer.Option(
        0.5, help="Refuse a gene list with less than this fraction present in the source."
    ),
    gene_column: str | None = typer.Option(
        None,
        help="AnnData var column holding gene ids (default: the first of "
        "feature_id, gene_ids, gene_id, ensembl_id, else var_names).",
    ),
    obs_columns: str | None = typer.Option(None, help="Comma-separated obs columns to keep (default: all)."),
    census_version: str | None = typer.Option(
        None, help="Public Census release, e.g. 'stable' or '2025-01-30' (source 'census')."
    ),
    census_uri: str | None = typer.Option(None, help="Local or mirrored Census copy (source 'census')."),
    organism: str = typer.Option("homo_sapiens", help="Census organism."),
    measurement: str = typer.Option("RNA", help="SOMA measurement."),
    block_size: int = typer.Option(8_192, help="Source rows read at a time (memory ~ block x genes x nnz)."),
    overwrite: bool = typer.Option(False, help="Replace existing shards in --out."),
    compression: str = typer.Option(
        "lz4", help="X codec: lz4 (fast), zstd (smaller, for object storage) or none (fastest reads)."
    ),
    workers: int = typer.Option(
        0,
        help="0: this process; N: read and write on N Ray tasks at a time (RAY_ADDRESS or a "
        "local cluster; --out on a shared filesystem, or --staging). The shards are the same.",
    ),
    staging: str | None = typer.Option(
        None,
        help="Where the spill files go (a filesystem every worker sees; needed with --workers and --out "
        "on object storage). Default: beside a local --out.",
    ),
    prefix_ids: bool = typer.Option(
        False, "--prefix-ids", help="Several sources: name each cell <source_file>:<id> (ids that repeat across files)."
    ),
) -> None:
    """Write globally pre-shuffled AnnData-Zarr shards plus manifest.json, out of core."""
    from functools import partial

    from .data import ShardSettings, open_sources, read_gene_list, write_shards

    with _named_errors():
        settings = ShardSettings(
            shard_size=shard_size,
            seed=seed,
            genes=read_gene_list(genes) if genes else None,
            n_top_genes=n_top_genes,
            hvg_batch_key=hvg_batch_key,
            min_gene_overlap=min_gene_overlap,
            obs_columns=[c.strip() for c in obs_columns.split(",") if c.strip()] if obs_columns else None,
            block_size=block_size,
            overwrite=overwrite,
            compression=compression,
            workers=workers,
            staging=staging,
        )
        source_args = dict(
            layer=layer,
            obs_filter=obs_filter,
            var_filter=var_filter,
            measurement=measurement,
            census_version=census_version,
            census_uri=census_uri,
            organism=organism,
            gene_column=gene_column,
            all_cells=all_cells,
        )
        # Ray tasks do not run in this directory
        sources = [s if s == "census" or "://" in s else str(Path(s).resolve()) for s in sources]
        # several sources are one atlas, their genes aligned (sources.ConcatSource)
        source_args.update(genes=settings.genes, min_overlap=min_gene_overlap, prefix_ids=prefix_ids)
        with open_sources(sources, **source_args) as opened:
            for source, member in zip(sources, getattr(opened, "members", [opened])):
                _echo_census_filter(source, member)
            manifest = write_shards(
                opened, out, settings, echo=typer.echo, reopen=partial(open_sources, sources, **source_args)
            )
    typer.echo(
        f"wrote {manifest['n_obs']:,} cells x {manifest['n_vars']:,} genes in {len(manifest['shards'])} shards "
        f"to {out} ({manifest['build_seconds']:.1f} s)"
    )


def _echo_census_filter(source: str, opened) -> None:
    if source == "census":
        typer.echo(f"Census cells: obs filter {opened.obs_filter!r} ({opened.n_obs:,} cells)")


@app.command()
def train(
    config: Path | None = typer.Option(
        None, "--config", help="YAML config (sections data, model, train, scaling, run, checkpoint)."
    ),
    overrides: list[str] = typer.Argument(
        None, help="Dotted overrides, e.g. train.max_steps=2000 scaling.num_workers=2."
    ),
) -> None:
    """Train the hierarchical VAE on shards: one process, or Ray Train workers (scaling.num_workers >= 1).

    Rerunning the same command resumes from the run's latest checkpoint."""
    from .config import load_config
    from .train.launch import train as run_training

    with _named_errors():  # ConfigError is a ValueError
        resolved = load_config(config, overrides or [])
        summary = run_training(resolved, echo=typer.echo)
    typer.echo(f"trained to step {summary.get('step')} -> {summary.get('checkpoint')}")


@app.command()
def embed(
    checkpoint: str = typer.Option(..., help="A checkpoint directory, or a run directory (its latest checkpoint)."),
    source: str = typer.Option(..., help="Shards directory, h5ad, AnnData-Zarr, SOMA Experiment, or 'census'."),
    out: str = typer.Option(..., help="Output Zarr group (e.g. embeddings.zarr)."),
    workers: int = typer.Option(0, help="0: this process; N: N Ray actors (a GPU each when the cluster has them)."),
    batch_size: int = typer.Option(4096, help="Cells per forward pass."),
    chunk_rows: int = typer.Option(16_384, help="Rows per Zarr chunk and per unit of work/progress."),
    no_ema: bool = typer.Option(False, "--no-ema", help="Use the raw weights instead of the EMA weights."),
    logvar: bool = typer.Option(False, "--logvar", help="Also write posterior log-variances."),
    overwrite: bool = typer.Option(False, help="Replace an output written by another model or with other settings."),
    layer: str | None = typer.Option(None, help="Count layer of the source (as for `shard`)."),
    obs_filter: str | None = typer.Option(None, help="Cells to embed (as for `shard`)."),
    all_cells: bool = typer.Option(
        False,
        "--all-cells",
        help="Census: read every copy of a cell (drop the default "
        "is_primary_data == True that any --obs-filter is AND-ed with).",
    ),
    census_version: str | None = typer.Option(None, help="Public Census release (source 'census')."),
    census_uri: str | None = typer.Option(None, help="Local or mirrored Census copy (source 'census')."),
    organism: str = typer.Option("homo_sapiens", help="Census organism."),
    min_gene_overlap: float = typer.Option(0.5, help="Refuse a source with less of the model's genes than this."),
    gene_column: str | None = typer.Option(
        None,
        help="AnnData var column holding gene ids (default: the first of "
        "feature_id, gene_ids, gene_id, ensembl_id, else var_names).",
    ),
    wait: bool = typer.Option(False, "--wait", help="If another job is writing --out, wait for it (default: refuse)."),
) -> None:
    """Write one embedding per hierarchy level for every cell of SOURCE to a Zarr group (resumable)."""
    from .embed import EmbedSettings
    from .embed import embed as run_embed

    source_args = {
        "source": source,
        "layer": layer,
        "obs_filter": obs_filter,
        "census_version": census_version,
        "census_uri": census_uri,
        "organism": organism,
        "gene_column": gene_column,
        "all_cells": all_cells,
    }
    with _named_errors():
        settings = EmbedSettings(
            batch_size=batch_size,
            chunk_rows=chunk_rows,
            ema=not no_ema,
            logvar=logvar,
            workers=workers,
            overwrite=overwrite,
            min_gene_overlap=min_gene_overlap,
            wait=wait,
        )
        result = run_embed(checkpoint, source_args, out, settings, echo=typer.echo)
    typer.echo(
        f"embedded {result['cells']:,} cells -> {out}"
        + (f" ({result['cells_per_s']:,} cells/s)" if "cells_per_s" in result else "")
    )


@app.command("embed-release")
def embed_release(
    checkpoint: str = typer.Option(..., help="A checkpoint directory, or a run directory (its latest checkpoint)."),
    out_root: str = typer.Option(
        ...,
        help="Root of the release outputs: <out-root>/<release>/embeddings.zarr and "
        "<out-root>/index.json (a path or an fsspec URL such as s3://bucket/embeddings).",
    ),
    census_version: str | None = typer.Option(None, help="A public Census release, or 'latest' / 'stable'."),
    census_uri: str | None = typer.Option(None, help="A local or mirrored Census copy."),
    release: str | None = typer.Option(None, help="The release's name (default: the Census build date)."),
    organism: str = typer.Option("homo_sapiens", help="Census organism."),
    obs_filter: str | None = typer.Option(
        None, help="Cells to embed, AND-ed with is_primary_data == True (see --all-cells)."
    ),
    all_cells: bool = typer.Option(
        False,
        "--all-cells",
        help="Census: read every copy of a cell (drop the default "
        "is_primary_data == True that any --obs-filter is AND-ed with).",
    ),
    workers: int = typer.Option(0, help="0: this process; N: N Ray actors (a GPU each when the cluster has them)."),
    batch_size: int = typer.Option(4096, help="Cells per forward pass."),
    chunk_rows: int = typer.Option(16_384, help="Rows per Zarr chunk and per unit of work/progress."),
    logvar: bool = typer.Option(False, "--logvar", help="Also write posterior log-variances."),
    min_gene_overlap: float = typer.Option(0.5, help="Refuse a release with less of the model's genes than this."),
    index: bool = typer.Option(
        True, "--index/--no-index", help="Also build the release's nearest-neighbour index (<store>.index) for `query`."
    ),
    wait: bool = typer.Option(
        False, "--wait", help="If another job is embedding this release, wait for it (default: refuse, exit 2)."
    ),
) -> None:
    """The scheduled job: embed a Census release into <out-root>/<release>/embeddings.zarr unless a
    complete output of this model is there (safe to run nightly); resume a partial one; build its
    index for `query`; record the run in <out-root>/index.json."""
    from .embed import EmbedSettings
    from .embed.release import embed_release as run_release

    with _named_errors():
        settings = EmbedSettings(
            batch_size=batch_size,
            chunk_rows=chunk_rows,
            logvar=logvar,
            workers=workers,
            min_gene_overlap=min_gene_overlap,
            wait=wait,
        )
        entry = run_release(
            checkpoint,
            out_root,
            census_version=census_version,
            census_uri=census_uri,
            release=release,
            organism=organism,
            obs_filter=obs_filter,
            all_cells=all_cells,
            settings=settings,
            index=index,
            echo=typer.echo,
        )
    typer.echo(
        f"{entry['action']}: release {entry['release']} ({entry.get('n_cells', '?'):,} cells) -> {entry['out']}"
        if entry["action"] == "embedded"
        else f"skipped: release {entry['release']} -> {entry['out']}"
    )


@app.command()
def index(
    embeddings: str = typer.Option(..., help="An embeddings store written by `embed` (complete)."),
    out: str | None = typer.Option(None, help="Where to write the index (default: beside the store, <store>.index)."),
    shard_cells: int = typer.Option(2_000_000, help="Cells per index shard (what building holds in memory per level)."),
    target_recall: float = typer.Option(
        0.97, help="Recall@10 each level's search must reach on a sample of atlas cells."
    ),
    overwrite: bool = typer.Option(False, help="Replace an index of another store or built with other settings."),
) -> None:
    """Build a nearest-neighbour index of every level of an embeddings store (out of core; staged;
    a rerun on the same store does nothing)."""
    from .query import IndexSettings, build_index

    with _named_errors():
        settings = IndexSettings(shard_cells=shard_cells, target_recall=target_recall, overwrite=overwrite)
        manifest = build_index(embeddings, out, settings, echo=typer.echo)
    typer.echo(
        f"index of {manifest['store']['n_obs']:,} cells x {len(manifest['levels'])} levels -> "
        f"{out or embeddings.rstrip('/') + '.index'}"
    )


@app.command()
def query(
    checkpoint: str = typer.Option(..., help="The model that embedded the atlas (checkpoint or run directory)."),
    index: str = typer.Option(
        ..., "--index", help="An index built by `index`, or the embeddings store it sits beside."
    ),
    source: str = typer.Option(..., help="The query cells: h5ad, AnnData-Zarr, shards or SOMA Experiment."),
    labels: list[str] = typer.Option([], "--labels", help="An atlas obs column to transfer (repeat for several)."),
    out: str = typer.Option(..., help="q.h5ad (the query AnnData with the results) or q.parquet (the obs columns)."),
    k: int = typer.Option(15, help="Neighbours per cell and level."),
    atlas_obs: str | None = typer.Option(
        None,
        help="The atlas labels as a table (Parquet/CSV/TSV keyed by obs id) instead of the source the store records.",
    ),
    level: list[int] = typer.Option([], "--level", help="Map at this level only (repeat; default: every level)."),
    layer: str | None = typer.Option(None, help="Count layer of the query."),
    gene_column: str | None = typer.Option(None, help="AnnData var column of the query holding gene ids."),
    min_gene_overlap: float = typer.Option(0.5, help="Refuse a query with less of the model's genes than this."),
    overwrite: bool = typer.Option(False, help="Replace --out (only once the new file is written)."),
) -> None:
    """Map query cells to an embedded atlas: the k nearest atlas cells at every level, the atlas's
    labels transferred by their vote (with its share as confidence), and cells unlike the atlas flagged."""
    from .query import query as run_query

    source_args = {"source": source, "layer": layer, "gene_column": gene_column}
    with _named_errors():
        result = run_query(
            checkpoint,
            index,
            source_args,
            list(labels),
            out,
            k=k,
            atlas_obs=atlas_obs,
            levels=list(level) or None,
            min_gene_overlap=min_gene_overlap,
            overwrite=overwrite,
            echo=typer.echo,
        )
    unlike = ", ".join(f"level {level} {n:,}" for level, n in result["unlike"].items())
    typer.echo(f"mapped {result['cells']:,} cells at levels {result['levels']} -> {out} (unlike the atlas: {unlike})")


@app.command()
def evaluate(
    embeddings: str = typer.Option(..., help="An embeddings store written by `embed`."),
    labels: str = typer.Option(..., help="Comma-separated obs columns to score each level against (coarse to fine)."),
    batch_key: str | None = typer.Option(None, help="obs column whose mixing is measured (donor, assay, ...)."),
    out: str | None = typer.Option(None, help="Report directory (default: <embeddings>_report next to the store)."),
    source: str | None = typer.Option(None, help="Where the labels are (default: the source the embeddings record)."),
    census_version: str | None = typer.Option(None, help="Public Census release (source 'census')."),
    census_uri: str | None = typer.Option(None, help="Local or mirrored Census copy (source 'census')."),
    organism: str = typer.Option("homo_sapiens", help="Census organism."),
    compare: list[str] = typer.Option(
        [],
        help="NAME=STORE: another embeddings store scored on the same cells "
        "(e.g. flat=embeddings_flat.zarr); repeatable.",
    ),
    pca: bool = typer.Option(False, "--pca", help="Add the PCA baseline (50 components of the log-normalised counts)."),
    max_cells: int = typer.Option(50_000, help="Cells evaluated (a seeded random subsample beyond this)."),
    k: int = typer.Option(15, help="Neighbours of the kNN classifier."),
    seed: int = typer.Option(0, help="Subsample and clustering seed."),
    maps: bool = typer.Option(True, help="Draw a 2-D map per representation (PNG)."),
    map_method: str = typer.Option(
        "auto", help="umap (umap-learn, the `eval` extra), pca, or auto (umap if installed)."
    ),
    scib: bool = typer.Option(
        False,
        "--scib",
        help="Add the scib-metrics suite (iLISI, kBET, Leiden NMI/ARI, ...; pip install 'hvae-pipeline[eval]').",
    ),
    overwrite: bool = typer.Option(
        False, help="Replace an earlier report in --out (only once the new one is complete)."
    ),
) -> None:
    """Score every level of an embeddings store: kNN accuracy, NMI/ARI, silhouette per label,
    batch mixing, active units; a Markdown report with 2-D maps."""
    from .evaluate.report import EvaluateSettings, evaluate_embeddings

    with _named_errors(ImportError):  # ImportError: --scib or --map-method umap without the `eval` extra
        named = dict(item.split("=", 1) for item in compare if "=" in item)
        if len(named) != len(compare):
            raise ValueError(f"--compare takes NAME=STORE, got {[c for c in compare if '=' not in c]}")
        source_args = (
            None
            if source is None
            else {"source": source, "census_version": census_version, "census_uri": census_uri, "organism": organism}
        )
        settings = EvaluateSettings(
            labels=tuple(l.strip() for l in labels.split(",") if l.strip()),
            batch_key=batch_key,
            out_dir=out,
            source=source_args,
            compare=named,
            pca=pca,
            max_cells=max_cells,
            k=k,
            seed=seed,
            maps=maps,
            map_method=map_method,
            scib=scib,
            overwrite=overwrite,
        )
        summary = evaluate_embeddings(embeddings, settings, echo=typer.echo)
    typer.echo(f"report: {summary['report']}")


def _default_per_level(name: str, depth: int) -> tuple[float, ...]:
    """The spec's default per-tree-level values, extended (last value) or cut to ``depth``."""
    from .data.synthetic import SyntheticAtlasSpec

    default = SyntheticAtlasSpec.__dataclass_fields__[name].default
    return tuple(default[min(i, len(default) - 1)] for i in range(depth))


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("outputs/demo"), help="Where the atlas, model, embeddings and summary go."),
    n_cells: int = typer.Option(10_000, help="Cells in the synthetic atlas."),
    max_steps: int = typer.Option(None, help="Training steps per model (default: train.max_steps's, 6,000)."),
    flat_baseline: bool = typer.Option(True, help="Also train the flat (one-level) baseline."),
    seed: int = typer.Option(0, help="Random seed."),
    workers: int = typer.Option(2, help="Ray Train workers on the local CPUs (0: one process, no Ray)."),
) -> None:
    """Run the main job end to end on the embedded default data: a synthetic 3-level atlas ->
    shards -> Ray training (hierarchical and flat) -> embeddings per level -> evaluation."""
    from .demo import DemoSettings, run_demo

    with _named_errors():
        steps = {"max_steps": max_steps} if max_steps is not None else {}
        run_demo(
            DemoSettings(
                out_dir=out_dir, n_cells=n_cells, with_flat_baseline=flat_baseline, seed=seed, workers=workers, **steps
            ),
            echo=typer.echo,
        )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
