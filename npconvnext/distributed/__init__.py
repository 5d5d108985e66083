"""Classify or embed many images on a Dask cluster (`pip install -e ".[dask]"` from a checkout).

    from distributed import Client
    from npconvnext.distributed import Job, ModelSpec, list_images, run

    with Client("tcp://scheduler:8786") as client:
        run(client, list_images(["/data/photos"]), "/shared/out",
            Job("classify", ModelSpec(weights="/shared/convnext_tiny.safetensors")))

One task per partition of images (`Job.partition_size`); each worker builds the model once from
the weight file or tag (`ModelSpec`, never a pickled model) and writes each partition's results
as it finishes (jobs.py has the output layout). The command: `npconvnext classify|features
... --scheduler ADDRESS|local[:N] --output OUT`.

Modules: jobs.py (partitions, output, resume; runs without Dask when given no client),
worker.py (a worker process's model and task threads), cluster.py (clients and the worker
plugin setting those threads; the one module that imports Dask). One batch through the model,
and images behind fsspec URLs, are npconvnext/batch.py's, which the single-process command uses
too. Importing this package does not import Dask.
"""

from ..batch import ModelSpec, list_images, load_model
from .jobs import Job, PartitionResult, Summary, run

__all__ = ["Job", "ModelSpec", "PartitionResult", "Summary", "list_images", "load_model", "run"]
