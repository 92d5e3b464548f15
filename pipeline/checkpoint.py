"""Checkpoint directories: everything needed to rebuild the model, and to resume training.

A checkpoint directory (``<run>/checkpoint_<step>/``) holds::

    model.pt            {"hvae_config", "model", "ema"}: enough alone to rebuild the model
    trainer.pt          optimizer, grad scaler, step counters (resuming only)
    config.yaml         the resolved pipeline config of the run
    train_state.json    step, epoch, loader position, world size, time
    genes.json          feature_ids (model gene order) and their hash
    batches.json        batch key and batch categories (embedding row order)

``<run>/latest`` names the newest complete checkpoint; ``find_checkpoint`` follows it. A run
directory may be a local path or an object-storage URL (``s3://...``): ``fetch_checkpoint`` gives
a local copy of a remote checkpoint (cached per node).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from hvae import HVAEConfig, HierarchicalVAE

from . import storage
from .data.shard_format import feature_hash

LATEST = "latest"


def save_checkpoint(directory: str | Path, trainer, hvae_config: HVAEConfig, config_yaml: str, train_state: dict,
                    feature_ids: list[str], batch_key: str | None, batch_categories: list[str]) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = trainer.state_dict()
    torch.save({"hvae_config": hvae_config.to_dict(), "model": state["model"], "ema": state["ema"]}, directory / "model.pt")
    torch.save({k: state[k] for k in ("optimizer", "scaler", "step", "skipped_steps")}, directory / "trainer.pt")
    (directory / "config.yaml").write_text(config_yaml)
    (directory / "train_state.json").write_text(json.dumps({**train_state, "saved": time.time()}, indent=1))
    (directory / "genes.json").write_text(json.dumps({"feature_ids": list(feature_ids), "feature_ids_hash": feature_hash(feature_ids)}))
    (directory / "batches.json").write_text(json.dumps({"batch_key": batch_key, "categories": list(batch_categories)}))
    return directory


# Model fields added after checkpoints were first written, with the behaviour those older
# checkpoints were trained with (which is no longer the default): a key a checkpoint lacks
# takes this value, not today's default, so an old model is rebuilt as it was trained.
PRE_FIELD_BEHAVIOUR = {"bottom_up": "serial", "free_bits_per_dimension": 0.0}


def read_checkpoint(directory: str | Path) -> dict:
    """All parts of a checkpoint directory (tensors on the CPU), with a clear error if incomplete."""
    directory = Path(directory)
    missing = [n for n in ("model.pt", "trainer.pt", "train_state.json", "genes.json", "batches.json") if not (directory / n).exists()]
    if missing:
        raise FileNotFoundError(f"checkpoint {directory} is incomplete: missing {missing}")
    model = torch.load(directory / "model.pt", map_location="cpu", weights_only=False)
    return {
        "hvae_config": HVAEConfig.from_dict({**PRE_FIELD_BEHAVIOUR, **model["hvae_config"]}),
        "model": model["model"], "ema": model["ema"],
        "trainer": torch.load(directory / "trainer.pt", map_location="cpu", weights_only=False),
        "train_state": read_train_state(directory),
        "genes": json.loads((directory / "genes.json").read_text()),
        "batches": json.loads((directory / "batches.json").read_text()),
        "path": str(directory),
    }


def read_train_state(directory: str | Path) -> dict:
    """``train_state.json`` alone (step, epoch, loader position), without loading any tensor."""
    path = storage.join(directory, "train_state.json")
    if not storage.exists(path):
        raise FileNotFoundError(f"checkpoint {directory} is incomplete: missing ['train_state.json']")
    return json.loads(storage.read_text(path))


def load_model(directory: str | Path, ema: bool = True) -> tuple[HierarchicalVAE, dict]:
    """The model of a checkpoint (EMA weights by default) in eval mode, and the checkpoint parts."""
    parts = read_checkpoint(directory)
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
    """A checkpoint directory itself, or a run directory's latest checkpoint (None if it has none).
    Local paths give a Path, URLs the checkpoint's URL."""
    if storage.is_url(path):
        return _find_remote(str(path).rstrip("/"))
    path = Path(path)
    if (path / "model.pt").exists():
        return path
    pointer = path / LATEST
    if pointer.exists():
        target = path / pointer.read_text().strip()
        if (target / "model.pt").exists():
            return target
    candidates = sorted(p for p in path.glob("checkpoint_*") if (p / "train_state.json").exists())
    return candidates[-1] if candidates else None


def _find_remote(url: str) -> str | None:
    names = storage.listdir(url)
    if "model.pt" in names:
        return url
    if LATEST in names:
        target = storage.join(url, storage.read_text(storage.join(url, LATEST)).strip())
        if storage.exists(storage.join(target, "train_state.json")):  # uploaded last: the copy is complete
            return target
    candidates = [n for n in names if n.startswith("checkpoint_") and storage.exists(storage.join(url, n, "train_state.json"))]
    return storage.join(url, candidates[-1]) if candidates else None


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
            if storage.is_url(run_dir):
                storage.remove_tree(storage.join(run_dir, old))
            else:
                shutil.rmtree(Path(run_dir) / old, ignore_errors=True)
