"""Kernel implementations keyed by (kernel, backend), and the choice of backend.

A backend declares which array namespaces it takes (``"numpy"``, ``"cupy"``) and whether it
takes projections ``R`` (a kernel may narrow that: the compiled statistics take R, the compiled
posterior does not); it registers one implementation per kernel it has. The driver
(:mod:`xd_dask.kernels.driver`) asks :func:`resolve` for a backend and :func:`implementation`
for the function, so adding a backend is one :func:`register_backend` call and one
:func:`register` per kernel, with no edit to the driver.

Every implementation takes ONE missingness pattern as a :class:`xd_dask.kernels.driver.Block`
and returns that pattern's result (what the kernel's :class:`~xd_dask.kernels.driver.Kernel`
folds into the call's output):

``"stats"``      ``(n_j, a, C, ll, W, n_bg)`` (see :func:`xd_dask.kernels.compute_stats`)
``"logdens"``    (n, K) float64 log alpha_j + log N_ij
``"moves"``      :class:`xd_dask.kernels.moves.MoveSums` (split-and-merge criteria's sums)
``"posterior"``  None: writes ``block.out`` at the pattern's rows

An implementation that compiles on first use may carry ``fn.readiness(block) -> (key,
seconds)``: the seconds it needs before it can run (0 when loaded); with ``backend="auto"``
the driver then weighs them against the reference's measured cost (kernels whose
:class:`~xd_dask.kernels.driver.Kernel` has ``cost_choice``).

The backend is always named by the caller (``"auto"`` or a registered name): the kernels read
no environment. Which backend a fit uses is configuration (``fit.backend``, environment
variable ``XD_DASK_FIT__BACKEND``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from xd_dask.kernels._common import array_namespace, unpack_lower

__all__ = [
    "Backend",
    "backend_choices",
    "backend_names",
    "implementation",
    "noise_for",
    "register",
    "register_backend",
    "resolve",
]


@dataclass(frozen=True)
class Backend:
    """A backend: its name, the array namespaces it takes and whether it takes projections."""

    name: str
    namespaces: frozenset[str]
    projections: bool
    packed: bool = False  # takes noise covariances as packed lower triangles (n, d (d + 1) / 2)

    def accepts(self, namespace: str, has_R: bool) -> bool:
        return namespace in self.namespaces and (self.projections or not has_R)


_BACKENDS: dict[str, Backend] = {}  # in order of preference for "auto"
_IMPLS: dict[tuple[str, str], Callable[[], Callable[..., Any]]] = {}
_LOADED: dict[tuple[str, str], Callable[..., Any]] = {}
_NO_R: set[tuple[str, str]] = set()  # (kernel, backend) pairs that take no projections


def register_backend(
    name: str, *, namespaces: tuple[str, ...], projections: bool, packed: bool = False
) -> None:
    """Declare a backend (later declarations are preferred less by ``"auto"``); ``packed``: its
    kernels take the noise covariances as packed lower triangles as well as (n, d, d)."""
    _BACKENDS[name] = Backend(name, frozenset(namespaces), projections, packed)


def noise_for(backend: str, S: Any) -> Any:
    """A pattern's noise covariances as ``backend`` takes them: packed (n, d (d + 1) / 2) input
    is unpacked to (n, d, d) for a backend that does not declare ``packed``."""
    if S.ndim == 2 and not _BACKENDS[backend].packed:
        return unpack_lower(S)
    return S


def register(
    kernel: str,
    backend: str,
    loader: Callable[[], Callable[..., Any]],
    *,
    projections: bool | None = None,
) -> None:
    """Register ``loader() -> implementation`` of ``kernel`` for ``backend`` (loaded on first
    use, so a backend's heavy imports and compilation happen only when it runs).
    ``projections=False`` narrows a backend that takes projections for this kernel."""
    if backend not in _BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; call register_backend first")
    _IMPLS[(kernel, backend)] = loader
    _LOADED.pop((kernel, backend), None)
    if projections is False:
        _NO_R.add((kernel, backend))
    else:
        _NO_R.discard((kernel, backend))


def _accepts(kernel: str, backend: str, namespace: str, has_R: bool) -> bool:
    """Whether ``backend``'s ``kernel`` takes inputs of ``namespace`` (and projections)."""
    ok = _BACKENDS[backend].accepts(namespace, has_R)
    return ok and not (has_R and (kernel, backend) in _NO_R)


def backend_names() -> tuple[str, ...]:
    """Names accepted by ``backend=`` (besides ``"auto"``)."""
    return tuple(_BACKENDS)


def backend_choices() -> tuple[str, ...]:
    """The values ``fit.backend`` accepts: "auto" and every registered backend."""
    return ("auto", *backend_names())


def implementation(kernel: str, backend: str) -> Callable[..., Any]:
    """The registered function of ``kernel`` for ``backend``."""
    key = (kernel, backend)
    fn = _LOADED.get(key)
    if fn is None:
        if key not in _IMPLS:
            raise ValueError(f"backend {backend!r} has no {kernel!r} kernel")
        fn = _LOADED[key] = _IMPLS[key]()
    return fn


def resolve(kernel: str, backend: str, X: Any, R: Any) -> str:
    """The backend that runs ``kernel`` on these inputs.

    ``"auto"`` picks the first registered backend that takes the inputs' namespace and
    projections and has the kernel. A named backend that cannot take the inputs is an error.
    """
    names = backend_choices()
    if backend not in names:
        raise ValueError(f"backend must be one of {names}, got {backend!r}")
    namespace = "numpy" if array_namespace(X) is np else "cupy"
    has_R = R is not None
    if backend != "auto":
        if not _accepts(kernel, backend, namespace, has_R):
            what = "projections R" if has_R and namespace == "numpy" else f"{namespace} inputs"
            raise ValueError(f"the {backend} backend does not take {what}")
        if (kernel, backend) not in _IMPLS:
            raise ValueError(f"backend {backend!r} has no {kernel!r} kernel")
        return backend
    for name in _BACKENDS:
        if _accepts(kernel, name, namespace, has_R) and (kernel, name) in _IMPLS:
            return name
    raise ValueError(f"no backend runs the {kernel!r} kernel on {namespace} inputs")
