"""Distributed fitting on Dask: partition manifests, batch and online EM, k-means, checkpoints.

Layering: this package sits between the job runner / CLI (above) and ``xd_dask.io``,
``xd_dask.em`` and ``xd_dask.kernels`` (below). The client holds parameters and statistics only;
workers read partitions and run the kernels; results are tree-reduced on the cluster.

Public API
----------
connect(scheduler_address=None, scheduler_file=None, n_workers=None, threads_per_worker=1,
        gpu=False) -> (Client, cluster or None)
FitConfig(...)                                  configuration of a fit (JSON via to_dict/from_dict)
fit_catalog(config, client, progress_callback=None) -> XDModel
resume_fit(checkpoint_dir, client, progress_callback=None) -> XDModel
score_catalog(model, manifest, schema, client, out_dir=None, ...) -> ScoreResult
posterior_catalog(model, manifest, schema, client, out_dir, ...) -> list of files
build_manifest(source, max_rows_per_partition=None) -> Manifest
DaskXDGMM(n_components, ...).fit(X, X_cov, client=None)   XD on dask arrays X (n, D), X_cov
                                                (n, D, D); the statistics of ChunkStatistics
"""

from xd_dask.distributed.arrays import ChunkStatistics
from xd_dask.distributed.checkpoint import CheckpointError, load_checkpoint
from xd_dask.distributed.cluster import GPUUnavailableError, connect, worker_threads
from xd_dask.distributed.config import FitConfig
from xd_dask.distributed.estimator import DaskXDGMM
from xd_dask.distributed.fit import ConvergenceWarning, fit_catalog, resume_fit
from xd_dask.distributed.manifest import Manifest, ManifestError, Partition, build_manifest
from xd_dask.distributed.score import ScoreResult, posterior_catalog, score_catalog
from xd_dask.distributed.tasks import PartitionError

__all__ = [
    "CheckpointError",
    "ChunkStatistics",
    "ConvergenceWarning",
    "DaskXDGMM",
    "FitConfig",
    "GPUUnavailableError",
    "Manifest",
    "ManifestError",
    "Partition",
    "PartitionError",
    "ScoreResult",
    "build_manifest",
    "connect",
    "fit_catalog",
    "load_checkpoint",
    "posterior_catalog",
    "resume_fit",
    "score_catalog",
    "worker_threads",
]
