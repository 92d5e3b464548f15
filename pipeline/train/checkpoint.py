"""Checkpoint directories: everything needed to rebuild the model, and to resume training.

A checkpoint directory (``<run>/checkpoint_<step>/``) holds::

    model.pt            {"format_version", "hvae_config", "model", "ema", "genes", "batches"}:
                        enough alone to rebuild the model and embed with it (an inference-only
                        checkpoint is this file alone)
    trainer.pt          optimizer, grad scaler, step counters (resuming only)
    config.yaml         the resolved pipeline config of the run
    train_state.json    step, epoch, loader position, world size, time (written last)
    genes.json          feature_ids (model gene order), their hash and symbols, for people and tools
    batches.json        batch key and batch categories (embedding row order), likewise

``<run>/latest`` names the newest complete checkpoint; ``find_checkpoint`` follows it. A run
directory may be a local path or an object-storage URL (``s3://...``): ``fetch_checkpoint`` gives
a local copy of a remote checkpoint (cached per node).

``model.pt`` carries a format version. A checkpoint of another version is refused with both
versions named, never rebuilt as a model it was not trained as.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from hvae import HVAEConfig, HierarchicalVAE

from .. import faults, storage
from ..data.shard_format import feature_hash

LATEST = "latest"
# 4: HVAEConfig.readout_weight (the read-out's weights and running moments in model.pt). A
#    format-2 or 3 model.pt has none: it is read as trained, with the read-out off.
# 3: HVAEConfig.molecule_thinning (training thins what the encoder reads). The weights and the
#    encoder are as in 2, so a format-2 model.pt is read as the model it was trained as.
# 2: the model of issue 15 (one bottom-up path, decoder on every level, no pre-field defaults);
#    genes and batches inside model.pt. 1 (no "format_version" key): the models before it.
CHECKPOINT_FORMAT = 4
# The earlier formats still read, each with what its config meant for the fields added since.
EARLIER_FORMAT_CONFIG = {2: {"molecule_thinning": 0.0, "readout_weight": 0.0}, 3: {"readout_weight": 0.0}}
READABLE_FORMATS = (*sorted(EARLIER_FORMAT_CONFIG), CHECKPOINT_FORMAT)


def save_checkpoint(
    directory: str | Path,
    trainer,
    hvae_config: HVAEConfig,
    config_yaml: str | None,
    train_state: dict | None,
    feature_ids: list[str],
    batch_key: str | None,
    batch_categories: list[str],
    feature_names: list[str] | None = None,
    extra_trainer_state: dict | None = None,
    setup: dict | None = None,
) -> Path:
    """Write a checkpoint. ``trainer`` is a ``Trainer`` (everything, resumable) or a bare model
    (``model.pt`` alone: weights as both the model and its EMA, for inference). ``setup``: how the
    cells were read (the notebook API's AnnData setup: layer, gene id column, gene selection),
    kept in ``model.pt`` and ``setup.json`` so that a loaded model reads new cells the same way."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    genes = {"feature_ids": list(feature_ids), "feature_ids_hash": feature_hash(feature_ids)}
    if feature_names is not None:
        genes["feature_names"] = [str(n) for n in feature_names]
    batches = {"batch_key": batch_key, "categories": list(batch_categories)}
    if isinstance(trainer, torch.nn.Module):
        weights = trainer.state_dict()
        state = {"model": weights, "ema": {f"module.{k}": v for k, v in weights.items()}}
    else:
        state = trainer.state_dict()
    torch.save(
        {
            "format_version": CHECKPOINT_FORMAT,
            "hvae_config": hvae_config.to_dict(),
            "model": state["model"],
            "ema": state["ema"],
            "genes": genes,
            "batches": batches,
            "setup": setup,
        },
        directory / "model.pt",
    )
    faults.point("checkpoint.model")
    (directory / "genes.json").write_text(json.dumps(genes))
    (directory / "batches.json").write_text(json.dumps(batches))
    if setup is not None:
        (directory / "setup.json").write_text(json.dumps(setup, indent=1))
    if "optimizer" in state:
        torch.save(
            {**{k: state[k] for k in ("optimizer", "scaler", "step", "skipped_steps")}, **(extra_trainer_state or {})},
            directory / "trainer.pt",
        )
        faults.point("checkpoint.trainer")
    if config_yaml is not None:
        (directory / "config.yaml").write_text(config_yaml)
    if train_state is not None:
        (directory / "train_state.json").write_text(json.dumps({**train_state, "saved": time.time()}, indent=1))
    return directory


class CheckpointFormatError(ValueError):
    """A readable checkpoint of another format: not damage, so no fallback to an older one."""


def read_model_file(directory: str | Path) -> dict:
    """``model.pt`` of a checkpoint: config, weights, genes and batches, with clear errors for a
    missing, corrupt or other-version file."""
    path = Path(directory) / "model.pt"
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {directory} is incomplete: missing ['model.pt']")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated or not a torch file
        raise ValueError(f"{path} is corrupt or truncated ({type(error).__name__}: {error})") from None
    version = saved.get("format_version", 1) if isinstance(saved, dict) else None
    if version not in READABLE_FORMATS:
        raise CheckpointFormatError(
            f"{path} has checkpoint format {version}; this version of hvae-pipeline reads formats "
            f"{', '.join(map(str, READABLE_FORMATS))} (its model differs): train a new model, or embed with the "
            "release that wrote it"
        )
    # A config saved before module_levels or kl_capacity existed built no modules and held no
    # ceilings (their defaults now depend on the depth).
    values = {"module_levels": [], "kl_capacity": [], **EARLIER_FORMAT_CONFIG.get(version, {}), **saved["hvae_config"]}
    return {
        "hvae_config": HVAEConfig.from_dict(values),
        "model": saved["model"],
        "ema": saved["ema"],
        "genes": saved["genes"],
        "batches": saved["batches"],
        "setup": saved.get("setup"),
        "path": str(directory),
    }


def read_checkpoint(directory: str | Path) -> dict:
    """All parts of a resumable checkpoint directory (tensors on the CPU), with a clear error if
    incomplete."""
    directory = Path(directory)
    missing = [n for n in ("model.pt", "trainer.pt", "train_state.json") if not (directory / n).exists()]
    if missing:
        raise FileNotFoundError(f"checkpoint {directory} is incomplete: missing {missing}")
    parts = read_model_file(directory)
    try:
        parts["trainer"] = torch.load(directory / "trainer.pt", map_location="cpu", weights_only=False)
    except Exception as error:
        raise ValueError(
            f"{directory / 'trainer.pt'} is corrupt or truncated ({type(error).__name__}: {error})"
        ) from None
    parts["train_state"] = read_train_state(directory)
    return parts


def read_train_state(directory: str | Path) -> dict:
    """``train_state.json`` alone (step, epoch, loader position), without loading any tensor."""
    path = storage.join(directory, "train_state.json")
    if not storage.exists(path):
        raise FileNotFoundError(f"checkpoint {directory} is incomplete: missing ['train_state.json']")
    return json.loads(storage.read_text(path))


def load_model(directory: str | Path, ema: bool = True) -> tuple[HierarchicalVAE, dict]:
    """The model of a checkpoint (EMA weights by default) in eval mode, and its parts (config,
    genes, batches). Needs ``model.pt`` only."""
    parts = read_model_file(directory)
    model = HierarchicalVAE(parts["hvae_config"])
    if ema:
        weights = {k.removeprefix("module."): v for k, v in parts["ema"].items() if k.startswith("module.")}
    else:
        weights = parts["model"]
    model.load_state_dict(weights)
    return model.eval(), parts


def check_genes(parts: dict, feature_ids: list[str], where: str) -> None:
    """Refuse to continue a checkpoint on data with another gene list."""
    expected = parts["genes"]["feature_ids_hash"]
    if feature_hash(feature_ids) != expected:
        mine = set(parts["genes"]["feature_ids"])
        overlap = sum(1 for g in feature_ids if g in mine)
        raise ValueError(
            f"checkpoint {parts['path']} was trained on {len(mine)} genes ({expected}) but {where} has "
            f"{len(feature_ids)} genes ({feature_hash(feature_ids)}; {overlap} shared): re-shard the data with "
            f"--genes <the checkpoint's genes.json list> or start a new run"
        )


def check_model_config(parts: dict, config: HVAEConfig) -> None:
    """Refuse to continue a checkpoint with a model configured otherwise: its weights would load
    into another architecture or train under another loss without a word. (The gene list and the
    batch categories, which decide n_genes and n_batches, have their own checks.)"""
    saved, wanted = parts["hvae_config"].to_dict(), config.to_dict()
    differ = [k for k in wanted if k not in ("n_genes", "n_batches") and saved[k] != wanted[k]]
    if differ:
        raise ValueError(
            f"checkpoint {parts['path']} was trained with another model: "
            + "; ".join(f"model.{k} is {saved[k]!r} there, {wanted[k]!r} in the config" for k in differ)
            + ". Set these in the config to continue this run, or start a new run (run.name)"
        )


def write_latest(run_dir: str | Path, checkpoint_name: str) -> None:
    storage.write_text(storage.join(run_dir, LATEST), checkpoint_name + "\n")


def find_checkpoint(path: str | Path) -> Path | str | None:
    """A checkpoint directory itself (it holds ``model.pt``), or a run directory's latest complete
    checkpoint (None if it has none). Local paths give a Path, URLs the checkpoint's URL.

    One rule for local and remote runs: a checkpoint is complete once ``train_state.json`` is
    there (uploads write it last; local checkpoints appear by an atomic rename)."""
    path = str(path).rstrip("/") if storage.is_url(path) else str(path)
    names = storage.listdir(path)
    found = None
    if "model.pt" in names:
        found = path
    elif LATEST in names and _complete(
        target := storage.join(path, storage.read_text(storage.join(path, LATEST)).strip())
    ):
        found = target
    elif candidates := [n for n in names if n.startswith("checkpoint_") and _complete(storage.join(path, n))]:
        found = storage.join(path, candidates[-1])
    return None if found is None else found if storage.is_url(found) else Path(found)


def _complete(checkpoint: str) -> bool:
    return storage.exists(storage.join(checkpoint, "train_state.json"))


def resumable_checkpoint(run_dir: str | Path, echo=print) -> Path | str | None:
    """The newest complete checkpoint of a run that also reads back (None if the run has none).
    A damaged one (a truncated ``model.pt`` or ``trainer.pt``) is passed over for the previous
    complete one, saying so; when every checkpoint is damaged the error names them."""
    newest = find_checkpoint(run_dir)
    if newest is None:
        return None
    names = sorted(
        (
            n
            for n in storage.listdir(run_dir)
            if n.startswith("checkpoint_") and _complete(storage.join(str(run_dir), n))
        ),
        reverse=True,
    )
    candidates = [newest] + [storage.join(str(run_dir), n) for n in names if n != storage.basename(str(newest))]
    damaged = []
    for candidate in candidates:
        try:
            read_checkpoint(fetch_checkpoint(candidate)[0])
        except CheckpointFormatError:
            raise
        except (ValueError, FileNotFoundError, OSError) as error:
            damaged.append(f"{storage.basename(str(candidate))}: {error}")
            echo(
                f"warning: {storage.basename(str(candidate))} cannot be read back ({error}); "
                "falling back to the previous complete checkpoint"
            )
            continue
        return candidate if storage.is_url(str(candidate)) else Path(candidate)
    raise ValueError(
        f"every checkpoint of {run_dir} is damaged ({'; '.join(damaged)[:600]}); move the run directory "
        "away or set another run.name to start again"
    )


def fetch_checkpoint(path: str | Path) -> tuple[Path, str] | None:
    """(a local checkpoint directory, where it came from) for a checkpoint or run directory, local
    or remote; a remote checkpoint is downloaded once per node (``storage.cached_copy``)."""
    found = find_checkpoint(path)
    if found is None:
        return None
    if storage.is_url(found):
        return storage.cached_copy(str(found)), str(found)
    return Path(found).resolve(), str(Path(found).resolve())


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (never the one ``latest`` names)."""
    latest_file = storage.join(run_dir, LATEST)
    latest = storage.read_text(latest_file).strip() if storage.exists(latest_file) else None
    checkpoints = [n for n in storage.listdir(run_dir) if n.startswith("checkpoint_")]
    for old in checkpoints[:-keep]:
        if old != latest:
            storage.remove_tree(storage.join(run_dir, old))
