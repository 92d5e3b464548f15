"""The ``hvae-pipeline`` command line (also ``python -m pipeline``).

Subcommands arrive with their stages: ``simulate`` and ``demo`` now; ``shard``, ``train``,
``embed``, ``evaluate`` and ``embed-release`` with the data, training and inference issues.
"""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(
    name="hvae-pipeline",
    help="Out-of-core training of hierarchical VAEs on single-cell atlases.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


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
    block_size: int = typer.Option(4_096, help="Cells generated and written per block (memory ~ block x genes)."),
) -> None:
    """Write a synthetic atlas with a known cell-type tree and donor effects, streamed in blocks."""
    from .synthetic import SyntheticAtlasSpec, write_synthetic_atlas

    try:
        spec = SyntheticAtlasSpec(
            n_cells=n_cells, n_genes=n_genes, branching=_parse_ints(branching, "--branching"),
            n_donors=n_donors, seed=seed, block_size=block_size,
            effect_sd=_default_per_level("effect_sd", len(branching.split(","))),
            program_fraction=_default_per_level("program_fraction", len(branching.split(","))),
        )
        path = write_synthetic_atlas(spec, out)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    typer.echo(f"wrote {n_cells:,} cells x {n_genes:,} genes to {path}")


def _default_per_level(name: str, depth: int) -> tuple[float, ...]:
    """The spec's default per-tree-level values, extended (last value) or cut to ``depth``."""
    from .synthetic import SyntheticAtlasSpec

    default = SyntheticAtlasSpec.__dataclass_fields__[name].default
    return tuple(default[min(i, len(default) - 1)] for i in range(depth))


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("outputs/demo"), help="Where the atlas, model, embeddings and summary go."),
    n_cells: int = typer.Option(10_000, help="Cells in the synthetic atlas."),
    max_steps: int = typer.Option(3_000, help="Training steps per model."),
    flat_baseline: bool = typer.Option(True, help="Also train the flat (one-level) baseline."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Run the main job end to end on the embedded default data (a synthetic 3-level atlas)."""
    from .demo import DemoSettings, run_demo

    run_demo(DemoSettings(out_dir=out_dir, n_cells=n_cells, max_steps=max_steps,
                          with_flat_baseline=flat_baseline, seed=seed), echo=typer.echo)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
