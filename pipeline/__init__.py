"""pipeline: everything around the model: data sources, shards and the loader, training,
embedding, evaluation, the ``hvae-pipeline`` command line, and the notebook API:

    from pipeline import HVAEModel
"""


def __getattr__(name: str):
    if name == "HVAEModel":  # imported on first use: `python -m pipeline` does not pay for torch up front
        from .api import HVAEModel

        return HVAEModel
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


__all__ = ["HVAEModel"]
