"""The fitted XD model: the mixture's parameters (:class:`xd_dask.params.Params`), feature names,
metadata, save/load.

Its methods (log-density, responsibilities, posteriors) pass the parameters whole to the kernels
(:mod:`xd_dask.kernels`), so the background component always takes part."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib import format as npformat

from xd_dask import kernels
from xd_dask.npz import read_npy_header
from xd_dask.params import ARRAY_NAMES, Params
from xd_dask.utils import atomic_path, bounded_zip

FORMAT_NAME = "xd-dask-model"
FORMAT_VERSION = 1


class ModelFileError(ValueError):
    """A model file is missing, truncated, corrupt or not an xd-dask model."""


#: Largest JSON texts a model file may declare (numpy stores 4 bytes per character).
MAX_HEADER_BYTES = 1 << 20
MAX_METADATA_BYTES = 16 << 20
#: Deepest nesting of lists/objects accepted in the header and the metadata.
MAX_JSON_DEPTH = 32


def _json_depth(obj: Any) -> int:
    """Nesting depth of a parsed JSON value (iterative: no recursion limit)."""
    depth, stack = 0, [(obj, 1)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, dict | list):
            depth = max(depth, d)
            if d > MAX_JSON_DEPTH:
                return d
            stack.extend((v, d + 1) for v in (node.values() if isinstance(node, dict) else node))
    return depth


def _is_int(v: Any, lo: int = 1) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


class _Members:
    """The ``.npy`` members of an ``.npz`` zip, each checked from its header before reading."""

    def __init__(self, path: Path, zf: zipfile.ZipFile) -> None:
        self.path, self.zf = path, zf
        self.infos = {i.filename: i for i in zf.infolist()}

    def __contains__(self, key: str) -> bool:
        return f"{key}.npy" in self.infos

    def read(self, key: str, kind: str, shape: tuple[int, ...] | None, max_bytes: int = 0):
        """The array ``key`` of dtype kind ``kind`` ("f" float, "U" text) and ``shape``
        (None: any 0-d text up to ``max_bytes``); ModelFileError before reading otherwise."""
        info = self.infos.get(f"{key}.npy")
        if info is None:
            raise ModelFileError(f"{self.path}: not an xd-dask model file (no {key})")
        where = f"{self.path}: array {key!r}"
        if info.compress_type != zipfile.ZIP_STORED:
            raise ModelFileError(f"{where} is compressed; xd-dask writes uncompressed .npz files")
        with self.zf.open(info) as fh:
            got_shape, fortran, dtype, offset = read_npy_header(fh, where, ModelFileError)
        if dtype.hasobject or dtype.kind != kind or (kind == "f" and dtype.itemsize not in (4, 8)):
            raise ModelFileError(f"{where} has dtype {dtype}; expected {_KINDS[kind]}")
        want = () if shape is None else shape
        if tuple(got_shape) != want:
            raise ModelFileError(f"{where} has shape {tuple(got_shape)}; expected {want}")
        if max_bytes and dtype.itemsize > max_bytes:
            raise ModelFileError(f"{where} declares {dtype.itemsize} bytes (at most {max_bytes})")
        nbytes = int(np.prod(want, dtype=np.int64)) * dtype.itemsize
        if info.file_size != offset + nbytes:
            raise ModelFileError(
                f"{where} declares shape {want} and dtype {dtype} ({nbytes} bytes) but holds "
                f"{info.file_size - offset} bytes"
            )
        with self.zf.open(info) as fh:
            return npformat.read_array(fh, allow_pickle=False)

    def json(self, key: str, max_bytes: int) -> dict[str, Any]:
        """A JSON object stored as a 0-d text array; bounded size and nesting."""
        text = str(self.read(key, "U", None, max_bytes)[()])
        try:
            obj = json.loads(text)
        except RecursionError:
            raise ModelFileError(f"{self.path}: {key} JSON is nested too deeply") from None
        except ValueError as exc:
            raise ModelFileError(f"{self.path}: {key} is not valid JSON ({exc})") from None
        if not isinstance(obj, dict):
            raise ModelFileError(
                f"{self.path}: {key} must be a JSON object, not {type(obj).__name__}"
            )
        if _json_depth(obj) > MAX_JSON_DEPTH:
            raise ModelFileError(
                f"{self.path}: {key} JSON is nested deeper than {MAX_JSON_DEPTH} levels"
            )
        return obj


_KINDS = {"f": "floating point (float32 or float64)", "U": "text"}


def _check_header(path: Path, header: dict[str, Any]) -> tuple[int, int]:
    """(K, D) from a parsed model header; ModelFileError naming the bad field."""
    if header.get("format") != FORMAT_NAME:
        raise ModelFileError(f"{path}: not an xd-dask model file")
    version = header.get("format_version", 0)
    if not _is_int(version, 0):
        raise ModelFileError(f"{path}: format_version must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: model format version {version} is newer than this xd-dask understands "
            f"({FORMAT_VERSION}); upgrade xd-dask"
        )
    K, D = header.get("n_components"), header.get("n_features")
    if not (_is_int(K) and _is_int(D)):
        raise ModelFileError(
            f"{path}: n_components and n_features must be positive integers, got {K!r}, {D!r}"
        )
    names = header.get("feature_names")
    if names is not None and (
        not isinstance(names, list) or len(names) != D or not all(isinstance(n, str) for n in names)
    ):
        raise ModelFileError(f"{path}: feature_names must be a list of {D} strings")
    return K, D


def _read_model_file(path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, np.ndarray]]:
    """(header, metadata, arrays) of a model file, every member checked before it is read."""
    with bounded_zip(path, max_entries=16) as zf:  # a model file has at most 8 members
        z = _Members(path, zf)
        if "header" not in z:
            raise ModelFileError(f"{path}: not an xd-dask model file (no header)")
        header = z.json("header", MAX_HEADER_BYTES)
        K, D = _check_header(path, header)
        shapes = dict(zip(ARRAY_NAMES, [(K,), (K, D), (K, D, D), (), (D,), (D,)], strict=True))
        arrays = {k: z.read(k, "f", shape) for k, shape in shapes.items() if k in z}
        metadata = z.json("metadata", MAX_METADATA_BYTES) if "metadata" in z else {}
    return header, metadata, arrays


class XDModel:
    """A Gaussian mixture over the true (deconvolved) values v, as fitted by XD.

    Parameters
    ----------
    params : the mixture (:class:`xd_dask.params.Params`: weights (K,) positive and summing to
        1 - the background's weight, means (K, D), covariances (K, D, D) symmetric positive
        definite, and an optional uniform background component over a box in feature space,
        DESIGN.md 4d). Checked and kept as float64 copies; a background of weight 0 is dropped.
    feature_names : sequence of D names, optional (default f0, f1, ...).
    metadata : JSON-serialisable dict (fit history, units, versions, counts), optional.
    """

    def __init__(
        self,
        params: Params,
        feature_names: Sequence[str] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(params, Params):
            raise TypeError(f"params must be an xd_dask.params.Params, got {type(params).__name__}")
        if params.background is not None and params.background.weight <= 0.0:
            params = params.replace(background=None)
        self.params = params.validated()
        D = self.params.n_features
        names = (
            [f"f{i}" for i in range(D)]
            if feature_names is None
            else [str(f) for f in feature_names]
        )
        if len(names) != D:
            raise ValueError(f"{len(names)} feature names for {D} features")
        self.feature_names = names
        self.metadata: dict[str, Any] = dict(metadata or {})
        try:
            json.dumps(self.metadata)
        except TypeError as exc:
            raise ValueError(f"metadata must be JSON-serialisable: {exc}") from None

    @property
    def weights(self) -> np.ndarray:
        return self.params.weights

    @property
    def means(self) -> np.ndarray:
        return self.params.means

    @property
    def covariances(self) -> np.ndarray:
        return self.params.covariances

    @property
    def background(self):
        """The background component (:class:`xd_dask.params.Background`) or None."""
        return self.params.background

    # ------------------------------------------------------------------ shape
    @property
    def n_components(self) -> int:
        return self.params.n_components

    @property
    def n_features(self) -> int:
        return self.params.n_features

    def __repr__(self) -> str:
        return f"XDModel(n_components={self.n_components}, features={self.feature_names})"

    # ------------------------------------------------------------------ I/O
    def save(self, path: str | Path) -> Path:
        """Write the model to one self-describing ``.npz`` file, atomically."""
        path = Path(path)
        header = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "n_components": self.n_components,
            "n_features": self.n_features,
            "feature_names": self.feature_names,
        }
        metadata = np.array(json.dumps(self.metadata))
        if metadata.dtype.itemsize > MAX_METADATA_BYTES or (
            _json_depth(self.metadata) > MAX_JSON_DEPTH
        ):
            raise ValueError(
                f"metadata too large or too deeply nested to save ({metadata.dtype.itemsize} "
                f"bytes, at most {MAX_METADATA_BYTES}; at most {MAX_JSON_DEPTH} levels)"
            )
        with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as fh:
            np.savez(
                fh,
                header=np.array(json.dumps(header)),
                metadata=metadata,
                **self.params.to_arrays(),
            )
        return path

    @classmethod
    def load(cls, path: str | Path) -> XDModel:
        """Read a model written by :meth:`save`; raise ModelFileError on anything else.

        Everything is checked before an array is read (:func:`_read_model_file`): the header's
        JSON (types, version, nesting), and each array's dtype and shape from its ``.npy`` header
        in the zip directory against the header's K and D and the member's real size. A crafted
        file is refused after reading a few kilobytes, whatever sizes it declares.
        """
        path = Path(path)
        if not path.is_file():
            raise ModelFileError(f"{path}: no such model file")
        try:
            header, metadata, arrays = _read_model_file(path)
        except ModelFileError:
            raise
        except (zipfile.BadZipFile, OSError, EOFError, KeyError, ValueError) as exc:
            raise ModelFileError(f"{path}: corrupt or truncated model file ({exc})") from None
        try:
            return cls(Params.from_arrays(arrays), header.get("feature_names"), metadata)
        except ValueError as exc:
            raise ModelFileError(f"{path}: invalid model parameters: {exc}") from None

    # ------------------------------------------------------------------ maths
    def log_density(self, X: Any, X_cov: Any, **kw: Any) -> Any:
        """(n,) log-likelihood of noisy rows: log [sum_j alpha_j N(x_i | m_j, V_j + S_i)
        (+ the background)]; keywords as in :func:`xd_dask.kernels.row_log_likelihood`."""
        return kernels.row_log_likelihood(X, X_cov, self.params, **kw)

    def responsibilities(self, X: Any, X_cov: Any, **kw: Any) -> Any:
        """(n, K) posterior probability of each component for each noisy row."""
        return kernels.responsibilities(X, X_cov, self.params, **kw)

    def posterior(self, X: Any, X_cov: Any, **kw: Any):
        """Deconvolved posterior of each row's true value: a mixture over the components.

        Returns its moment-matched mean (n, D) and covariance (n, D, D) (float64); with
        ``summary=True`` a :class:`xd_dask.kernels.PosteriorSummary` (most probable component and
        its responsibility, ``top_k`` components' own posteriors, the background's
        responsibility when the model has a background component). Keywords as in
        :func:`xd_dask.kernels.posterior`.
        """
        return kernels.posterior(X, X_cov, self.params, **kw)

    def sample(
        self, n: int, random_state: Any = None, X_cov: Any = None, return_labels: bool = False
    ):
        """Draw ``n`` true values v from the mixture; with ``X_cov`` (n, D, D) add noise N(0, S_i).

        Returns (n, D), and the component labels (n,) when ``return_labels``; with a background
        component, its rows are uniform over the box and labelled ``n_components``.
        """
        rng = np.random.default_rng(random_state)
        n = int(n)
        if n < 0:
            raise ValueError("n must be >= 0")
        K = self.n_components
        if self.background is None:
            labels = rng.choice(K, size=n, p=self.weights)
        else:
            p = np.append(self.weights, self.background.weight)
            labels = rng.choice(K + 1, size=n, p=p / p.sum())
        L = np.linalg.cholesky(self.covariances)  # (K, D, D)
        z = rng.standard_normal((n, self.n_features))
        gauss = labels < K
        lab = np.where(gauss, labels, 0)
        v = self.means[lab] + np.einsum("nij,nj->ni", L[lab], z)
        if self.background is not None and not gauss.all():
            lo, hi = np.asarray(self.background.lo), np.asarray(self.background.hi)
            v[~gauss] = lo + (hi - lo) * rng.random(((~gauss).sum(), self.n_features))
        if X_cov is not None:
            S = np.asarray(X_cov, dtype=np.float64)
            if S.shape != (n, self.n_features, self.n_features):
                raise ValueError(f"X_cov must have shape {(n, self.n_features, self.n_features)}")
            # Symmetric square root (S may be singular: zero noise on some fields is allowed).
            evals, evecs = np.linalg.eigh(S)
            root = evecs * np.sqrt(np.clip(evals, 0.0, None))[:, None, :]
            v = v + np.einsum("nij,nj->ni", root, rng.standard_normal((n, self.n_features)))
        return (v, labels) if return_labels else v
