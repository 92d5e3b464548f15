"""The model's own configuration: frozen, validated, and stored in every checkpoint.

The model is rebuilt from ``HVAEConfig.from_dict(checkpoint["model_config"])`` alone, so
every field here is a plain JSON value (ints, floats, strings, tuples of ints).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

LIKELIHOODS = ("nb", "zinb")
DISPERSIONS = ("gene", "gene-batch")


@dataclass(frozen=True)
class HVAEConfig:
    """Hyper-parameters of :class:`hvae.HierarchicalVAE`.

    Levels are ordered bottom (level 0, finest, next to the data) to top (coarsest):
    ``latent_dims[0]`` is level 0 and ``latent_dims[-1]`` is the top level. A single entry
    gives the flat (one-level) baseline of the same model. What the model exports for level l
    is what levels l..top predict through the read-out (``representation_dims``); see
    ``HierarchicalVAE.encode``.
    """

    n_genes: int
    latent_dims: tuple[int, ...] = (32, 16, 8)
    hidden_dim: int = 256
    n_batches: int = 0
    batch_embedding_dim: int = 16
    likelihood: str = "nb"
    dispersion: str = "gene"
    dropout: float = 0.1
    # Free bits per latent unit (nats): a unit's first nats are free, so KL pressure cannot
    # prune it below them. Without them level 0 kept 0.2-0.8 nats on the synthetic atlas and
    # 0.5 on pbmc3k, with 4 of 8 top units (benchmarks/RESULTS.md); 0 turns them off.
    free_bits_per_dimension: float = 0.1
    kl_balance: bool = True
    # The KL weight of the top level of a hierarchy (the lower levels and a flat model weigh 1).
    # The top is the one level priced against a fixed N(0, I) and it lost units to KL
    # pressure; at half weight it keeps them (benchmarks/RESULTS.md). The -ELBO reported stays
    # the unweighted bound.
    top_kl_weight: float = 0.5
    # Weight of the hierarchy-aware auxiliary reconstruction: x decoded from the levels
    # >= k alone (lower levels at their prior mean), k drawn per step. Without gene modules it is
    # what makes the upper levels carry the coarse structure (the top of pbmc3k fell from 0.85 to
    # 0.69 kNN on the fine types without it); with them it pulls the finer detail back into the
    # upper levels, so the default is 0 (benchmarks/RESULTS.md, "Gene modules").
    coarse_reconstruction_weight: float = 0.0
    # Whether the coarse term trains only the encoder and top-down path (decoder detached).
    coarse_detach_decoder: bool = True
    # Soft clamp for every log-variance: c * tanh(x / c).
    log_scale_clamp: float = 6.0
    # Counts are normalised to this total before log1p for the encoder input.
    input_target_sum: float = 1e4
    # Molecule thinning in training: the encoder reads each cell with a binomial share of its
    # molecules, the share drawn per cell and step from U(1 - molecule_thinning, 1), while the
    # likelihood scores every molecule (a denoising encoder). A code cannot then rest on one
    # draw of a cell's sampling noise (benchmarks/RESULTS.md, "Molecule thinning").
    # Evaluation and `encode` read every molecule; 0 turns it off.
    molecule_thinning: float = 0.5
    # Weight of the read-out: a linear map of the whole code predicts every gene's standardised
    # log expression (each gene counting alike, as in PCA), beside a per-batch gain and shift of
    # each gene. The NB likelihood alone lets a few abundant genes decide the code:
    # level 0 of pbmc3k stayed below PCA on the fine types (benchmarks/RESULTS.md, "Linear
    # read-out"). The -ELBO reported leaves it out; 0 turns it off.
    readout_weight: float = 1.0
    # A ceiling on each level's KL (nats per cell, level 0 first; 0: no ceiling on that level; an
    # empty tuple: none), held by a Lagrange multiplier per level that rises while the level's KL
    # is above its ceiling and falls back to 0 below it (``capacity_rate`` nats^-1 a step). A level
    # that can hold only a few nats keeps what earns it the most per nat. None (the default): by
    # depth, 2 nats at the top, one more at each level below, none at level 0 ((0, 3, 2) for three
    # levels; ``by_depth``).
    kl_capacity: tuple[float, ...] | None = None
    # The KL weight (price of a nat) of each level, level 0 first; empty: 1 at every level but the
    # top, ``top_kl_weight`` there.
    kl_weights: tuple[float, ...] = ()
    # Levels below the top whose conditional prior p(z_l | levels above) keeps unit variance (its
    # mean still set by the levels above): a nat there costs what it costs in a flat model, not
    # more where the learned prior is narrow. A screen, off by default (benchmarks/RESULTS.md,
    # "A unit-variance prior at level 0").
    unit_prior_levels: tuple[int, ...] = ()
    capacity_rate: float = 0.01
    # Resolution in gene space: gene partitions into modules, one per level from the top down
    # (the top's first, then level L-2's, ...; each the module number of every gene). A level
    # given one decodes only each cell's counts pooled over its modules (a coarse target), and
    # neither the gene decoder nor the read-out reads its sample: what it knows reaches the genes
    # through the priors of the levels below. Empty: every level feeds the decoder.
    gene_modules: tuple[tuple[int, ...], ...] = ()
    # How ``hvae.fit_gene_modules`` builds ``gene_modules`` from a sample of the data when they
    # are not given: (modules, principal components) per coarse level, the top first (hvae.modules).
    # None (the default): by depth, 24 modules on 10 components at the top and twice both at each
    # level below but level 0 ((24, 10), (48, 20) for three levels; (12, 5) for two; ``by_depth``);
    # (): none, every level decodes the genes (the levels then nest: benchmarks/RESULTS.md).
    module_levels: tuple[tuple[int, int], ...] | None = None
    validate_inputs: bool = True

    def __post_init__(self) -> None:
        def fail(name: str, message: str) -> None:
            raise ValueError(f"HVAEConfig.{name}: {message} (got {getattr(self, name)!r})")

        # A list from YAML/JSON becomes a tuple so the config stays hashable and frozen.
        if isinstance(self.latent_dims, int) and not isinstance(self.latent_dims, bool):
            object.__setattr__(self, "latent_dims", (self.latent_dims,))
        if not isinstance(self.latent_dims, (list, tuple)):
            fail("latent_dims", "must be a sequence")
        object.__setattr__(self, "latent_dims", tuple(self.latent_dims))

        if not _is_int(self.n_genes) or self.n_genes < 1:
            fail("n_genes", "must be a positive integer")
        if len(self.latent_dims) < 1 or not all(_is_int(d) and d >= 1 for d in self.latent_dims):
            fail("latent_dims", "must be one or more positive integers (level 0 first)")
        if not _is_int(self.hidden_dim) or self.hidden_dim < 1:
            fail("hidden_dim", "must be a positive integer")
        if not _is_int(self.n_batches) or self.n_batches < 0:
            fail("n_batches", "must be an integer >= 0 (0: no batch covariate)")
        if not _is_int(self.batch_embedding_dim) or self.batch_embedding_dim < 1:
            fail("batch_embedding_dim", "must be a positive integer")
        if self.likelihood not in LIKELIHOODS:
            fail("likelihood", f"must be one of {LIKELIHOODS}")
        if self.dispersion not in DISPERSIONS:
            fail("dispersion", f"must be one of {DISPERSIONS}")
        if self.dispersion == "gene-batch" and self.n_batches == 0:
            fail("dispersion", "'gene-batch' needs n_batches > 0")
        if not _is_number(self.dropout) or not (0.0 <= self.dropout < 1.0):
            fail("dropout", "must be in [0, 1)")
        if not _is_number(self.free_bits_per_dimension) or self.free_bits_per_dimension < 0:
            fail("free_bits_per_dimension", "must be a number >= 0")
        if not _is_number(self.top_kl_weight) or self.top_kl_weight <= 0:
            fail("top_kl_weight", "must be a number > 0")
        if not _is_number(self.coarse_reconstruction_weight) or self.coarse_reconstruction_weight < 0:
            fail("coarse_reconstruction_weight", "must be a number >= 0")
        if not _is_number(self.molecule_thinning) or not (0.0 <= self.molecule_thinning < 1.0):
            fail(
                "molecule_thinning",
                "must be in [0, 1) (the largest share of a cell's molecules the encoder may miss in training; 0: none)",
            )
        if not _is_number(self.readout_weight) or self.readout_weight < 0:
            fail("readout_weight", "must be a number >= 0 (0: no read-out)")
        # Settings left to the depth (None) are resolved here and remembered, so that a copy of
        # another depth (``replace(latent_dims=...)``) resolves them again.
        object.__setattr__(
            self,
            "_by_depth",
            frozenset(name for name in ("kl_capacity", "module_levels") if getattr(self, name) is None),
        )
        for name, value in by_depth(self.n_levels).items():
            if getattr(self, name) is None:
                # Partitions given as they are leave nothing to build.
                object.__setattr__(self, name, () if name == "module_levels" and self.gene_modules else value)
        if isinstance(self.kl_capacity, (int, float)) and not isinstance(self.kl_capacity, bool):
            fail("kl_capacity", "must be a sequence of nats, one per level (level 0 first)")
        object.__setattr__(self, "kl_capacity", tuple(self.kl_capacity))
        if self.kl_capacity and (
            len(self.kl_capacity) != len(self.latent_dims)
            or not all(_is_number(c) and c >= 0 for c in self.kl_capacity)
        ):
            fail(
                "kl_capacity",
                f"must be empty or {len(self.latent_dims)} numbers >= 0 (nats per cell, level 0 "
                "first; 0: no ceiling on that level)",
            )
        object.__setattr__(self, "unit_prior_levels", tuple(self.unit_prior_levels))
        if not all(_is_int(level) and 0 <= level < len(self.latent_dims) - 1 for level in self.unit_prior_levels):
            below = f"0 to {len(self.latent_dims) - 2}" if len(self.latent_dims) > 1 else "a flat model has none"
            fail("unit_prior_levels", f"must be levels below the top ({below})")
        if isinstance(self.kl_weights, (int, float)) and not isinstance(self.kl_weights, bool):
            fail("kl_weights", "must be a sequence, one weight per level (level 0 first)")
        object.__setattr__(self, "kl_weights", tuple(self.kl_weights))
        if self.kl_weights and (
            len(self.kl_weights) != len(self.latent_dims) or not all(_is_number(w) and w > 0 for w in self.kl_weights)
        ):
            fail("kl_weights", f"must be empty or {len(self.latent_dims)} numbers > 0 (level 0 first)")
        if self.gene_modules and all(_is_int(m) for m in self.gene_modules):  # one partition: the top's
            object.__setattr__(self, "gene_modules", (tuple(self.gene_modules),))
        object.__setattr__(self, "gene_modules", tuple(tuple(p) for p in self.gene_modules))
        if len(self.gene_modules) > self.n_levels - 1 or not all(
            len(p) == self.n_genes and all(_is_int(m) and m >= 0 for m in p) for p in self.gene_modules
        ):
            fail(
                "gene_modules",
                f"must be empty or at most {self.n_levels - 1} partitions (the top's first), each one "
                f"module number >= 0 per gene ({self.n_genes})",
            )
        object.__setattr__(self, "module_levels", tuple(tuple(spec) for spec in self.module_levels))
        if len(self.module_levels) > self.n_levels - 1 or not all(
            len(spec) == 2 and all(_is_int(v) and v >= 1 for v in spec) and spec[0] >= 2 for spec in self.module_levels
        ):
            fail(
                "module_levels",
                f"must be empty or at most {self.n_levels - 1} pairs [modules >= 2, principal "
                "components >= 1] (the top's first)",
            )
        if self.module_levels and self.gene_modules and len(self.module_levels) != len(self.gene_modules):
            fail(
                "module_levels",
                f"names {len(self.module_levels)} coarse levels but gene_modules has "
                f"{len(self.gene_modules)} partitions",
            )
        if not _is_number(self.capacity_rate) or self.capacity_rate <= 0:
            fail("capacity_rate", "must be a number > 0")
        if not _is_number(self.log_scale_clamp) or self.log_scale_clamp <= 0:
            fail("log_scale_clamp", "must be a number > 0")
        if not _is_number(self.input_target_sum) or self.input_target_sum <= 0:
            fail("input_target_sum", "must be a number > 0")
        for name in ("kl_balance", "coarse_detach_decoder", "validate_inputs"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "must be true or false")

    @property
    def n_levels(self) -> int:
        return len(self.latent_dims)

    @property
    def representation_dims(self) -> tuple[int, ...]:
        """Width of what is exported for each level: the whole code's width with the read-out
        (what levels l..top predict, in the read-out's coordinates), else the code from level l up."""
        if self.readout_weight > 0:
            return (sum(self.direct_dims),) * self.n_levels
        return tuple(sum(self.latent_dims[level:]) for level in range(self.n_levels))

    @property
    def direct_dims(self) -> tuple[int, ...]:
        """The latent widths the decoder and the read-out read: those of the levels that decode
        no gene modules (level 0 up)."""
        return self.latent_dims[: self.n_levels - max(len(self.gene_modules), len(self.module_levels))]

    def kl_weights_per_level(self) -> tuple[float, ...]:
        if self.kl_weights:
            return tuple(float(w) for w in self.kl_weights)
        if self.n_levels == 1:
            return (1.0,)
        return (1.0,) * (self.n_levels - 1) + (float(self.top_kl_weight),)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["latent_dims"] = list(self.latent_dims)
        out["kl_capacity"] = list(self.kl_capacity)
        out["kl_weights"] = list(self.kl_weights)
        out["gene_modules"] = [list(p) for p in self.gene_modules]
        out["module_levels"] = [list(spec) for spec in self.module_levels]
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "HVAEConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"HVAEConfig: unknown key(s) {unknown}; known keys are {sorted(known)}")
        return cls(**values)

    def replace(self, **changes: Any) -> "HVAEConfig":
        """A copy with ``changes``; the settings this config left to its depth follow a new depth."""
        if "latent_dims" in changes:
            for name in self._by_depth:
                changes.setdefault(name, None)
        return dataclasses.replace(self, **changes)


def by_depth(n_levels: int) -> dict[str, tuple]:
    """The defaults that depend on the number of levels: the coarse levels' gene modules (the top's
    first: 24 modules on 10 principal components, twice both at each level below) and the KL
    ceilings (level 0 first: none at level 0, 2 nats at the top, one more at each level below it).
    Measured on three levels (benchmarks/RESULTS.md, "Gene modules"); at four on the real data it
    holds but for the top's lineage silhouette on pbmc3k (0.003 short). With two levels the top is
    the one coarse level, with no level 1 to take the middle grain: on 24 modules it held the
    lineages no tighter than level 0, on 12 modules of 5 components it does ("A 2-level top on 12
    modules"). A flat model has neither."""
    coarse = n_levels - 1
    if coarse == 0:
        return {"module_levels": (), "kl_capacity": ()}
    modules = ((12, 5),) if coarse == 1 else tuple((24 * 2**i, 10 * 2**i) for i in range(coarse))
    return {"module_levels": modules, "kl_capacity": (0.0, *(2.0 + coarse - level for level in range(1, n_levels)))}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


__all__ = ["HVAEConfig", "LIKELIHOODS", "DISPERSIONS", "by_depth"]
