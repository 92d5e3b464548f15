"""pipeline: everything around the model: data sources, synthetic atlases, training,
evaluation and the ``hvae-pipeline`` command line."""
