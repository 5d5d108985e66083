"""Classify or embed many images on a Dask cluster (`pip install "npconvnext[dask]"`).

    from distributed import Client
    from npconvnext.distributed import Job, ModelSpec, list_images, run

    with Client("tcp://scheduler:8786") as client:
        run(client, list_images(["/data/photos"]), "/shared/out",
            Job("classify", ModelSpec(weights="/shared/convnext_tiny.safetensors")))

One task per partition of images (`Job.partition_size`); each worker builds the model once from
the weight file or tag (`ModelSpec`, never a pickled model) and writes each partition's results
as it finishes (jobs.py has the output layout). The command: `npconvnext classify|features
... --scheduler ADDRESS|local[:N] --output OUT`.

Modules: batch.py (one batch through the model; the single-process command uses it too),
jobs.py (partitions, output, resume; runs without Dask when given no client), cluster.py
(clients and worker threads; imports Dask), remote.py (images behind fsspec URLs).
Importing this package does not import Dask.
"""

from .batch import ModelSpec, list_images, load_model
from .jobs import Job, PartitionResult, Summary, run

__all__ = ["Job", "ModelSpec", "PartitionResult", "Summary", "list_images", "load_model", "run"]
