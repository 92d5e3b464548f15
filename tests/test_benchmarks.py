"""The model-quality benchmark runs end to end (a few steps): it must not rot between the
sessions that run it in full."""

import importlib.util
from pathlib import Path

from conftest import shared_file

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hierarchy_quality_prints_every_representation(capsys):
    shared_file("mouse_pancreas_sub1000_raw.h5ad")
    hierarchy_quality = _load("hierarchy_quality")
    result = hierarchy_quality.run("pancreas", steps=20, batch_size=64, seed=0, latent_dims=(8, 4, 2))
    names = [row["representation"] for row in result["rows"]]
    assert names == ["HVAE level 2", "HVAE level 1", "HVAE level 0", "flat VAE 8-d", "flat VAE 2-d", "PCA (50 comps)"]
    table = capsys.readouterr().out
    assert "| flat VAE 2-d | 2 |" in table and "kNN cell_type_fine" in table
    for row in result["rows"]:
        assert 0.0 <= row["cell_type_fine"] <= 1.0
