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
DECODER_INPUTS = ("level0", "all_levels", "top_down")
BOTTOM_UP_PATHS = ("parallel", "serial")
# Default KL weight of the top level of a multi-level model (see kl_level_weights).
TOP_KL_WEIGHT = 0.5


@dataclass(frozen=True)
class HVAEConfig:
    """Hyper-parameters of :class:`hvae.HierarchicalVAE`.

    Levels are ordered bottom (level 0, finest, next to the data) to top (coarsest):
    ``latent_dims[0]`` is level 0 and ``latent_dims[-1]`` is the top level. A single entry
    gives the flat (one-level) baseline of the same model.
    """

    n_genes: int
    latent_dims: tuple[int, ...] = (32, 16, 8)
    hidden_dim: int = 256
    n_batches: int = 0
    batch_embedding_dim: int = 16
    likelihood: str = "nb"
    dispersion: str = "gene"
    dropout: float = 0.1
    # Collapse defences (nats per cell for each level; one value for all levels or one per level).
    free_bits: tuple[float, ...] = (1.0,)
    # Free bits per latent dimension (nats), on top of the level-wide ones: 0 turns it off.
    # A unit's first nats are free, so KL pressure cannot prune it below them. With the
    # default 0.1 level 0 keeps 1.5 nats on the synthetic atlas where, under level-wide free
    # bits alone, what it kept (0.2-0.8) depended on the seed (benchmarks/RESULTS.md).
    free_bits_per_dimension: float = 0.1
    kl_balance: bool = True
    # KL weight of each level (level 0 first; one value for all levels or one per level).
    # None: 1 for every level but the top of a multi-level model, which gets TOP_KL_WEIGHT.
    # The top is the one level priced against a fixed N(0, I) and it loses units to KL
    # pressure (a flat model keeps 6-7 of 8, the hierarchical top 4-5); at half weight it
    # keeps them and level-0 subtype kNN on the synthetic atlas goes from 0.75 to 0.85-0.88.
    kl_level_weights: tuple[float, ...] | None = None
    # Weight of the hierarchy-aware auxiliary reconstruction: x decoded from the levels
    # >= k alone (lower levels at their prior mean), k drawn per step. It is what makes the
    # upper levels carry the coarse structure; 0 turns it off (plain ELBO).
    coarse_reconstruction_weight: float = 1.0
    # Whether the coarse term trains only the encoder and top-down path (decoder detached).
    coarse_detach_decoder: bool = True
    # What the decoder reads: "all_levels" (skip paths from every level to the decoder) or
    # "level0" (the ladder design: x depends on z_0 alone and the upper levels reach it through
    # the priors), or "top_down" (NVAE: x from the final top-down state h_0 = s_0 + W z_0, so
    # upper levels reach the decoder without the lower levels' sampling noise). On the
    # synthetic atlas "level0" gave level-0 subtype kNN 0.68 against 0.75; "top_down" without
    # KL balancing 0.80 with one seed and 0.66 with another (benchmarks/RESULTS.md).
    decoder_input: str = "all_levels"
    # The bottom-up path: "parallel" (r_l = block_l(stem(x)): every level, the top included,
    # reads the data through one block) or "serial" (the ladder: r_l = block_l(r_{l-1}), the
    # top reads the deepest state). Depth costs the top active units: on the synthetic
    # atlas level-0 subtype kNN was 0.756 / 0.897 / 0.827 over seeds 0-2 with "parallel"
    # against 0.753 / 0.71 (seeds 0-1) with "serial".
    # On small real data (pancreas, pbmc3k) the previous defaults, "serial" among them, are
    # 0.005-0.037 better on the finest labels over three seeds, the path being what matters,
    # but leave level 0 under 0.6 nats (benchmarks/RESULTS.md).
    bottom_up: str = "parallel"
    # Soft clamp for every log-variance: c * tanh(x / c).
    log_scale_clamp: float = 6.0
    # Counts are normalised to this total before log1p for the encoder input.
    input_target_sum: float = 1e4
    validate_inputs: bool = True

    def __post_init__(self) -> None:
        def fail(name: str, message: str) -> None:
            raise ValueError(f"HVAEConfig.{name}: {message} (got {getattr(self, name)!r})")

        # Lists from YAML/JSON become tuples so the config stays hashable and frozen.
        for name in ("latent_dims", "free_bits", "kl_level_weights"):
            value = getattr(self, name)
            if value is None and name == "kl_level_weights":
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = (value,)
            if not isinstance(value, (list, tuple)):
                fail(name, "must be a sequence")
            object.__setattr__(self, name, tuple(value))

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
        if not (0.0 <= self.dropout < 1.0):
            fail("dropout", "must be in [0, 1)")
        if len(self.free_bits) not in (1, len(self.latent_dims)):
            fail("free_bits", f"needs 1 or {len(self.latent_dims)} values (one per level)")
        if not all(_is_number(b) and b >= 0 for b in self.free_bits):
            fail("free_bits", "values must be numbers >= 0")
        if not _is_number(self.free_bits_per_dimension) or self.free_bits_per_dimension < 0:
            fail("free_bits_per_dimension", "must be a number >= 0")
        if self.kl_level_weights is not None:
            if len(self.kl_level_weights) not in (1, len(self.latent_dims)):
                fail("kl_level_weights", f"needs 1 or {len(self.latent_dims)} values (one per level)")
            if not all(_is_number(w) and w > 0 for w in self.kl_level_weights):
                fail("kl_level_weights", "values must be numbers > 0")
        if not _is_number(self.coarse_reconstruction_weight) or self.coarse_reconstruction_weight < 0:
            fail("coarse_reconstruction_weight", "must be a number >= 0")
        if not _is_number(self.log_scale_clamp) or self.log_scale_clamp <= 0:
            fail("log_scale_clamp", "must be a number > 0")
        if not _is_number(self.input_target_sum) or self.input_target_sum <= 0:
            fail("input_target_sum", "must be a number > 0")
        if not isinstance(self.kl_balance, bool):
            fail("kl_balance", "must be true or false")
        if self.decoder_input not in DECODER_INPUTS:
            fail("decoder_input", f"must be one of {DECODER_INPUTS}")
        if self.bottom_up not in BOTTOM_UP_PATHS:
            fail("bottom_up", f"must be one of {BOTTOM_UP_PATHS}")
        if not isinstance(self.coarse_detach_decoder, bool):
            fail("coarse_detach_decoder", "must be true or false")
        if not isinstance(self.validate_inputs, bool):
            fail("validate_inputs", "must be true or false")

    @property
    def n_levels(self) -> int:
        return len(self.latent_dims)

    def free_bits_per_level(self) -> tuple[float, ...]:
        return _per_level(self.free_bits, self.n_levels)

    def kl_weights_per_level(self) -> tuple[float, ...]:
        if self.kl_level_weights is None:
            return (1.0,) * (self.n_levels - 1) + ((TOP_KL_WEIGHT,) if self.n_levels > 1 else (1.0,))
        return _per_level(self.kl_level_weights, self.n_levels)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["latent_dims"] = list(self.latent_dims)
        out["free_bits"] = list(self.free_bits)
        out["kl_level_weights"] = None if self.kl_level_weights is None else list(self.kl_level_weights)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "HVAEConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"HVAEConfig: unknown key(s) {unknown}; known keys are {sorted(known)}")
        return cls(**values)

    def replace(self, **changes: Any) -> "HVAEConfig":
        return dataclasses.replace(self, **changes)


def _per_level(values: tuple[float, ...], n_levels: int) -> tuple[float, ...]:
    return values * n_levels if len(values) == 1 else values


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


__all__ = ["HVAEConfig", "LIKELIHOODS", "DISPERSIONS", "DECODER_INPUTS"]
