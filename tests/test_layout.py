"""The layout: one folder per stage, imports pointing only downward
(top: api, cli, demo -> evaluate -> embed, query -> train -> data -> config, storage, faults, progress), and ``hvae/``
pure PyTorch. A test, so that a convenient import from a layer above cannot land unnoticed."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Lower numbers are lower layers; a module may import from its own layer and below.
LAYERS = {
    "config": 0,
    "storage": 0,
    "faults": 0,
    "progress": 0,
    "lease": 0,
    "data": 1,
    "train": 2,
    "embed": 3,
    "query": 3,
    "evaluate": 4,
    "api": 5,
    "cli": 5,
    "demo": 5,
    "__main__": 5,
    "__init__": 5,
}


def _layer(module: str) -> int:
    """``pipeline.train.step`` -> the layer of ``train``."""
    parts = module.split(".")
    return LAYERS[parts[1]] if len(parts) > 1 else LAYERS["__init__"]


def _imports(path: Path, package: str) -> list[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            names.append(module)
            names += [f"{module}.{alias.name}" for alias in node.names]  # `from . import storage`
    return names


def _modules(root: str):
    for path in sorted((ROOT / root).rglob("*.py")):
        relative = path.relative_to(ROOT).with_suffix("")
        parts = list(relative.parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        yield path, ".".join(parts), ".".join(parts) if is_package else ".".join(parts[:-1])


def test_pipeline_imports_point_only_downward():
    wrong = []
    for path, module, package in _modules("pipeline"):
        for name in _imports(path, package):
            parts = name.split(".")
            if parts[0] != "pipeline" or len(parts) < 2 or parts[1] not in LAYERS:
                continue
            if _layer(name) > _layer(module):
                wrong.append(f"{module} imports {name}")
    assert not wrong, "imports from a layer above:\n" + "\n".join(sorted(set(wrong)))


def test_every_pipeline_module_is_in_a_known_layer():
    unknown = [
        module for _, module, _ in _modules("pipeline") if module != "pipeline" and module.split(".")[1] not in LAYERS
    ]
    assert not unknown, f"modules outside the layers {sorted(LAYERS)}: {unknown}"


def test_hvae_is_pure_pytorch():
    forbidden = (
        "pipeline",
        "ray",
        "zarr",
        "tiledbsoma",
        "cellxgene_census",
        "yaml",
        "argparse",
        "typer",
        "anndata",
        "pydantic",
    )
    wrong = [
        f"{module} imports {name}"
        for path, module, package in _modules("hvae")
        for name in _imports(path, package)
        if name.split(".")[0] in forbidden
    ]
    assert not wrong, wrong


def test_the_import_check_sees_a_violation(tmp_path):
    """The checker itself: an upward import in a data module is reported."""
    fake = tmp_path / "loader.py"
    fake.write_text("from ..train.step import Trainer\nfrom ..storage import join\n")
    names = _imports(fake, "pipeline.data")
    assert "pipeline.train.step" in names and _layer("pipeline.train.step") > _layer("pipeline.data.loader")
    assert _layer("pipeline.storage.join") <= _layer("pipeline.data.loader")
