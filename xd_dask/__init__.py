"""xd-dask: Extreme Deconvolution Gaussian mixtures fitted to partitioned catalogues on Dask.

``XDModel`` (a fitted mixture: save, load, sample, score, posterior), ``XDGMM`` (the in-memory
scikit-learn estimator) and ``pack`` (rows and their noise covariances as one array, for
scikit-learn's model selection) are importable from here.
"""

__version__ = "0.1.0"

from xd_dask.model import XDModel  # noqa: E402

__all__ = ["XDGMM", "XDModel", "__version__", "pack"]


def __getattr__(name: str):  # the estimator loads the fitting code: only when asked for
    if name in ("XDGMM", "pack"):
        from xd_dask import estimator  # noqa: PLC0415

        return getattr(estimator, name)
    raise AttributeError(f"module 'xd_dask' has no attribute {name!r}")
