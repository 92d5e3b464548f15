"""Stream any ``Source`` into a new TileDB-SOMA Experiment (obs, ms['RNA'].var, X['raw']).

Used to write the synthetic atlas as SOMA for tests and benchmarks; X is written one block at
a time, so memory is bounded by the block, as in ``shard``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from .sources import Source


def _arrow_frame(frame: pd.DataFrame) -> pa.Table:
    frame = frame.copy()
    for column in frame.columns:
        if isinstance(frame[column].dtype, pd.CategoricalDtype) or frame[column].dtype == object:
            frame[column] = frame[column].astype(str)
    return pa.Table.from_pandas(frame, preserve_index=False)


def write_soma(source: Source, uri: str, measurement: str = "RNA", layer: str = "raw", block_size: int = 16_384) -> str:
    """Write ``source`` as a SOMA Experiment at ``uri``; returns the URI."""
    import tiledbsoma

    obs = source.read_obs().drop(columns=["source_row"], errors="ignore")
    obs.insert(0, "obs_id", obs.index.astype(str))
    obs.insert(0, "soma_joinid", np.arange(len(obs), dtype=np.int64))
    var = pd.DataFrame(
        {"soma_joinid": np.arange(len(source.var), dtype=np.int64), "feature_id": source.feature_ids.astype(str)}
    )
    if "feature_name" in source.var.columns:
        var["feature_name"] = source.var["feature_name"].astype(str).to_numpy()
    obs_table, var_table = _arrow_frame(obs), _arrow_frame(var)
    with tiledbsoma.Experiment.create(uri) as experiment:
        frame = experiment.add_new_dataframe(
            "obs", schema=obs_table.schema, index_column_names=["soma_joinid"], domain=[(0, max(len(obs) - 1, 0))]
        )
        frame.write(obs_table)
        ms = experiment.add_new_collection("ms")
        rna = ms.add_new_collection(measurement, tiledbsoma.Measurement)
        var_frame = rna.add_new_dataframe(
            "var", schema=var_table.schema, index_column_names=["soma_joinid"], domain=[(0, max(len(var) - 1, 0))]
        )
        var_frame.write(var_table)
        x = rna.add_new_collection("X")
        matrix = x.add_new_sparse_ndarray(layer, type=pa.float32(), shape=(len(obs), len(var)))
        for offset, block in source.iter_blocks(block_size):
            coo = block.tocoo()
            matrix.write(
                pa.Table.from_pydict(
                    {
                        "soma_dim_0": (coo.row + offset).astype(np.int64),
                        "soma_dim_1": coo.col.astype(np.int64),
                        "soma_data": coo.data.astype(np.float32),
                    }
                )
            )
    return uri
