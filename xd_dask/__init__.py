"""xd-dask: Extreme Deconvolution Gaussian mixtures fitted to partitioned catalogues on Dask."""

__version__ = "0.1.0"

from xd_dask.model import XDModel  # noqa: E402

__all__ = ["XDModel", "__version__"]
