import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):  # the suite's two workers share two cores: one thread each
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # and the processes the tests start
    torch.set_num_threads(1)

# The longest tests first, so that under `-n 2` none is left to run alone at the end.
FIRST = ("test_quality.py",)


def pytest_collection_modifyitems(config, items):
    items.sort(
        key=lambda item: item.nodeid.split("::")[0].rsplit("/", 1)[-1] not in FIRST
    )  # stable: the rest keep their order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none here)")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


import tarfile  # noqa: E402
from pathlib import Path  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_file(name: str) -> Path:
    """A real-data fixture from ../shared/data: skipped where it is absent, except under CI
    (``CI=true``), where a missing fixture fails instead of silently skipping 20 tests."""
    path = SHARED_DATA / name
    if not path.exists():
        message = f"{path} is absent (the real-data fixtures live in ../shared/data)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message + "; CI=true requires them")
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def census_uri(tmp_path_factory) -> str:
    """The Census-shaped pbmc3k release, unpacked once per session."""
    archive = shared_file("census_shaped_pbmc3k_soma.tar.gz")
    root = tmp_path_factory.mktemp("census")
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    return str(root / "soma")


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory):
    """A small synthetic atlas written as 5 shards, plus the atlas itself for ground truth."""
    from pipeline.data import ShardSettings, write_shards
    from pipeline.data.sources import SyntheticSource
    from pipeline.data.synthetic import SyntheticAtlas, SyntheticAtlasSpec

    atlas = SyntheticAtlas(SyntheticAtlasSpec(n_cells=5_003, n_genes=300, n_donors=6, seed=3))
    out = tmp_path_factory.mktemp("shards") / "synthetic"
    write_shards(
        SyntheticSource(atlas), str(out), ShardSettings(shard_size=1_000, seed=0, block_size=1_500, progress=False)
    )
    return str(out), atlas
