"""Typed pipeline configuration: YAML files plus dotted ``key=value`` overrides.

Sections ``data``, ``model``, ``train``, ``scaling``, ``run``, ``checkpoint``. Every section
forbids unknown keys and checks types when loaded, so ``trian.max_steps`` or
``train.max_steps=abc`` fail with the key named. pydantic does the validation: it reports
every bad key at once with its dotted location, which is what we would otherwise write by hand.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from hvae import HVAEConfig


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    path: str = Field(description="Shard directory written by `hvae-pipeline shard` (local path or URL).")
    batch_key: str | None = Field(None, description="Categorical obs column used as the batch covariate.")
    validation_shards: int = Field(0, ge=0, description="Shards held out for validation (the last ones).")
    block_rows: int = Field(2048, ge=1)
    window_blocks: int = Field(8, ge=1)
    segment_rows: int = Field(16, ge=1)
    loader_workers: int = Field(0, ge=0, description="DataLoader worker processes per training worker.")
    prefetch: int = Field(2, ge=1)


# HVAEConfig fields the data decides (the gene list and the batch categories) or the pipeline
# sets itself: not in the YAML ``model:`` section.
NOT_CONFIGURABLE = ("n_genes", "n_batches", "validate_inputs")


class _ModelSection(_Section):
    def hvae_config(self, n_genes: int, n_batches: int) -> HVAEConfig:
        """The model's own config for data with ``n_genes`` genes and ``n_batches`` batches."""
        return HVAEConfig(n_genes=n_genes, n_batches=n_batches, **self.model_dump())

    @model_validator(mode="after")
    def _check(self):
        try:
            modules = self.model_dump()["gene_modules"]  # partitions built from the data: one entry per gene
            self.hvae_config(n_genes=len(modules[0]) if modules else 1, n_batches=1)
        except ValueError as error:
            raise ValueError(str(error).removeprefix("HVAEConfig.")) from None
        return self


def _model_section() -> type[_Section]:
    """The YAML ``model:`` section, derived from ``hvae.HVAEConfig`` (one source of truth: its
    fields, types and defaults). Values are checked by ``HVAEConfig`` itself when the config is
    loaded, so a bad value (``model.dropout=1.5``) fails before anything is written."""
    hints = typing.get_type_hints(HVAEConfig)
    fields = {
        field.name: (hints[field.name], Field(field.default, description=field.metadata.get("help")))
        for field in dataclasses.fields(HVAEConfig)
        if field.name not in NOT_CONFIGURABLE
    }
    return create_model(
        "ModelConfig", __base__=_ModelSection, __doc__="hvae.HVAEConfig minus what the data decides.", **fields
    )


ModelConfig = _model_section()


class TrainConfig(_Section):
    max_steps: int = Field(
        6000,
        ge=1,
        description=(
            "Training steps. The gene-module levels need 6,000 steps of 256 cells on the 10k-cell synthetic atlas: "
            "at 3,000 level 0 has not yet resolved the subtypes (benchmarks/RESULTS.md)."
        ),
    )
    batch_size: int = Field(512, ge=1, description="Cells per step on each worker.")
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-6, ge=0)
    precision: Literal["bf16", "fp16", "fp32"] = "fp32"
    grad_clip: float = Field(10.0, gt=0)
    ema_decay: float = Field(0.995, ge=0, lt=1)
    kl_warmup_steps: int | None = Field(
        None,
        ge=0,
        description=(
            "Steps over which the KL weight rises from 0 to 1 (KL balancing acts meanwhile); None: the first third "
            "of max_steps. A short warm-up leaves the levels under-used: on the wide synthetic atlas 1,000 of 3,000 "
            "steps gave cell-type kNN 0.59, 3,000 of 3,000 0.79 (benchmarks/RESULTS.md)."
        ),
    )

    @property
    def warmup_steps(self) -> int:
        """``kl_warmup_steps``, resolved."""
        return self.max_steps // 3 if self.kl_warmup_steps is None else self.kl_warmup_steps

    seed: int = 0
    log_every: int = Field(50, ge=1)
    validate_every: int = Field(250, ge=1, description="Steps between validations on the held-out cells.")
    validation_cells: int = Field(4096, ge=1, description="Held-out cells a validation reads (at most).")
    validation_fraction: float = Field(
        0.1,
        ge=0,
        lt=1,
        description=(
            "In-memory fits (notebook API, benchmarks): the share of cells held out for validation and early "
            "stopping; shard runs hold out data.validation_shards instead."
        ),
    )
    early_stopping: bool = Field(
        True,
        description=(
            "Stop once the held-out -ELBO has risen early_stopping_tolerance above its best, keeping the best "
            "EMA weights (needs held-out cells: data.validation_shards, or validation_fraction in memory)."
        ),
    )
    early_stopping_tolerance: float = Field(
        0.03,
        gt=0,
        description=(
            "The rise (a fraction of the best held-out -ELBO) that stops training. Small data overfit fast (pancreas: "
            "+3% 500 steps after its best); on the 10k-cell synthetic atlas the held-out -ELBO drifts up 1.3% over the "
            "2,000 steps after its best while level-0 subtype kNN climbs 0.92 -> 0.97, so a 1% rule would stop it at the "
            "wrong place (benchmarks/RESULTS.md)."
        ),
    )
    progress: bool = True
    compile: bool = Field(False, description="torch.compile the model's forward and loss (first steps compile).")


class ScalingConfig(_Section):
    num_workers: int = Field(0, ge=0, description="0: one process, no Ray. >= 1: Ray Train workers.")
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = None


class RunConfig(_Section):
    name: str = "hvae"
    storage_path: str = "runs"
    max_failures: int = Field(0, ge=-1)
    wait: bool = Field(
        False, description="If another job is training into this run directory, wait for it (default: refuse)."
    )

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not value or "/" in value or value in (".", ".."):
            raise ValueError("must be a plain directory name (no '/')")
        return value


class CheckpointConfig(_Section):
    every_steps: int = Field(500, ge=1)
    keep: int = Field(3, ge=1, description="Checkpoints kept (the latest ones).")


class PipelineConfig(_Section):
    data: DataConfig
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    run: RunConfig = RunConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()

    @property
    def run_dir(self) -> str:
        return f"{self.run.storage_path.rstrip('/')}/{self.run.name}"

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


class ConfigError(ValueError):
    """A config file or override that does not validate; the message names every bad key."""


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), base: dict | None = None
) -> PipelineConfig:
    """Read YAML (or start from ``base``), apply ``section.key=value`` overrides, validate."""
    values: dict[str, Any] = dict(base or {})
    source = "config"
    if path is not None:
        source = str(path)
        if not Path(path).exists():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise ConfigError(
                f"config file {path} is not YAML ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''})"
            ) from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        values = _merge(values, loaded)
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {override!r} is not of the form section.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as error:
            raise ConfigError(
                f"override {override!r}: the value {raw!r} is not YAML ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''})"
            ) from None
        _set_dotted(values, key.strip(), value, override)
    try:
        return PipelineConfig.model_validate(values)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            location = ".".join(str(part) for part in item["loc"])
            message = "unknown key" + _did_you_mean(item["loc"]) if item["type"] == "extra_forbidden" else item["msg"]
            given = "" if item["type"] in ("missing", "extra_forbidden") else f" (got {item.get('input')!r})"
            if item["type"] == "value_error":  # a whole-section check (HVAEConfig's): it names the key and value
                field, _, message = message.removeprefix("Value error, ").partition(": ")
                location, given = f"{location}.{field}", ""
            problems.append(f"{location}: {message}{given}")
        raise ConfigError(f"{source}: " + "; ".join(problems)) from None


def _did_you_mean(location: tuple) -> str:
    """' (did you mean train.max_steps?)' for a misspelt key, from the section's fields."""
    import difflib

    section = PipelineConfig
    for part in location[:-1]:
        field = section.model_fields.get(str(part))
        section = getattr(field, "annotation", None) if field else None
        if not (isinstance(section, type) and issubclass(section, BaseModel)):
            return ""
    close = difflib.get_close_matches(str(location[-1]), list(section.model_fields), n=1, cutoff=0.6)
    return (
        f" (did you mean {'.'.join(str(p) for p in location[:-1]) + '.' if len(location) > 1 else ''}{close[0]}?)"
        if close
        else ""
    )


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = (
            _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged


def _set_dotted(values: dict, key: str, value: Any, override: str) -> None:
    parts = key.split(".")
    node = values
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
        node = child
    node[parts[-1]] = value
