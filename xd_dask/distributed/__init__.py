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

from importlib import import_module

#: Public name -> the submodule that defines it. Loaded on first use (PEP 562), so that a worker
#: unpickling a task, or the CLI importing the checkpoint reader, does not import scikit-learn
#: (the estimator) or every fitting module: ~1.4 s per process on a 2-core machine.
_EXPORTS = {
    "ChunkStatistics": "arrays",
    "CheckpointError": "checkpoint",
    "load_checkpoint": "checkpoint",
    "GPUUnavailableError": "cluster",
    "connect": "cluster",
    "worker_threads": "cluster",
    "FitConfig": "config",
    "DaskXDGMM": "estimator",
    "ConvergenceWarning": "fit",
    "fit_catalog": "fit",
    "resume_fit": "fit",
    "Manifest": "manifest",
    "ManifestError": "manifest",
    "Partition": "manifest",
    "build_manifest": "manifest",
    "ScoreResult": "score",
    "posterior_catalog": "score",
    "score_catalog": "score",
    "PartitionError": "tasks",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'xd_dask.distributed' has no attribute {name!r}")
    return getattr(import_module(f"xd_dask.distributed.{module}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = sorted(_EXPORTS)
