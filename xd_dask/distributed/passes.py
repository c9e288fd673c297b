"""One distributed pass: map a task over partitions, tree-reduce on the cluster, gather the root.

Task keys are tuples ``("xd-<name>-<token>", ...)``, so the dashboard groups them as ``xd-estep``,
``xd-reduce``, ``xd-kmeans``, ... (the hex token keeps keys of different fits and retries apart).
Only the root of the reduction tree comes back to the client; its size (recorded in
``max_gathered_bytes``) depends on K and D, never on the number of rows.

Groups (``group_size``, persisted partitions only): a pass over every partition runs one task per
run of ``group_size`` consecutive partitions (``xd-<name>`` tasks over lists of blocks, combined in
partition order), placed with all its blocks on one worker. The reduction tree then starts from
the groups, so a result depends on (partitions, group size, fan-in), never on the cluster. Stratum
waves touch every partition for a small share of its rows: grouping cuts their tasks from one per
partition to a few per worker. Small shared objects (below :data:`INLINE_BYTES` for all tasks of
a pass) travel inside the tasks instead of being scattered first; when at most ``fan_in`` groups
remain, the client gathers and combines them itself (the root task would do the same, in the same
order), at most fan_in results of O(K D^2).

Every task has the signature of :mod:`xd_dask.distributed.tasks`: ``task(source, opts, params,
request)``; the parameters travel once per pass (scattered when large), the request (a small
frozen object) inside each task. :class:`PassStatistics` is the fit loop's statistics source
made of such passes (``xd-estep``, and ``xd-diagnose`` for the rows a warning names).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import pickle
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from distributed import Client, Future, span, wait
from distributed.scheduler import KilledWorker

from xd_dask.config import key
from xd_dask.distributed.manifest import Manifest
from xd_dask.distributed.plugins import ensure_worker_setup
from xd_dask.distributed.tasks import (
    Diagnose,
    Partial,
    Rows,
    TaskOptions,
    combine,
    diagnose,
    estep,
    read_block,
)
from xd_dask.optim import Batch, BatchStats
from xd_dask.params import Params
from xd_dask.utils import get_logger

log = get_logger(__name__)

__all__ = ["PassRunner", "PassStatistics", "shared_reads", "tree_reduce"]

#: Errors that mean "the cluster lost work", not "the data are bad": the pass is run again.
RETRYABLE = (KilledWorker, concurrent.futures.CancelledError)
#: Up to this many workers the parameters are sent to every worker by the client (no fetch on
#: the first task, a copy survives any single worker). Above it they go to one worker and the
#: others fetch them from their peers, so the client uploads one copy whatever the cluster size.
BROADCAST_MAX_WORKERS = 16
#: Shared objects whose pickled size times the number of tasks of a pass is below this travel
#: inside the tasks (no scatter round trip before the pass).
INLINE_BYTES = 1 << 20

#: The longest a message from the client to the scheduler waits to be batched with others
#: (:func:`low_latency`; Dask's client batches for 10 ms).
CLIENT_SEND_INTERVAL = 0.002

#: After a failed pass, wait at most this long for its running tasks to end (see _settle).
SETTLE_SECONDS = 300.0
#: Persisted blocks and pass results shared between runners (None: no sharing), see shared_reads.
_SHARED: dict[tuple, Any] | None = None


def low_latency(client: Client) -> None:
    """Let the client's messages to the scheduler wait at most :data:`CLIENT_SEND_INTERVAL`
    to be batched (Dask's client: 10 ms, made for graphs of thousands of tasks). A fit sends a
    few tasks per pass and waits for them, so a pass's second submission waited for the first's
    interval to end: online EM's waves on a 16,000-row, 24-file catalogue took 25-30 ms each at
    10 ms, 21-24 ms at 2 ms, 22-26 ms at 1 ms (the same fit to every digit). Sets the attribute
    of Dask's batched stream; a client without one (another Dask) is left as it is."""
    comm = getattr(client, "scheduler_comm", None)
    interval = getattr(comm, "interval", None)
    if isinstance(interval, float) and interval > CLIENT_SEND_INTERVAL:
        comm.interval = CLIENT_SEND_INTERVAL


@contextlib.contextmanager
def shared_reads() -> Iterator[dict[tuple, Any]]:
    """Within the block, pass runners over the same catalogue listing (manifest fingerprint) and
    task options share one set of persisted partitions and the results of
    :meth:`PassRunner.run_shared` passes (``xd-dask select`` fits every K over the same blocks
    and the same k-means sample). On leaving, the shared blocks are released."""
    global _SHARED
    prev, _SHARED = _SHARED, {}
    try:
        yield _SHARED
    finally:
        _SHARED = prev


def _digest(obj: Any) -> str | None:
    try:
        return hashlib.sha256(pickle.dumps(obj, protocol=5)).hexdigest()
    except Exception:  # noqa: BLE001 - not picklable: never shared
        return None


def map_combine(func: Callable[..., Partial], sources: Sequence[Any], *args: Any) -> Partial:
    """``combine(func(s, *args) for s in sources)`` in order: one task over a group of blocks
    (or ``func.stacked(sources, *args)``, a task function's own way over a group, e.g.
    :func:`xd_dask.distributed.tasks.estep_stacked`)."""
    stacked = getattr(func, "stacked", None)
    if stacked is not None:
        return stacked(sources, *args)
    return combine(*(func(src, *args) for src in sources))


def tree_reduce(
    client: Client,
    futures: Sequence[Future],
    fan_in: int,
    key_name: str,
    label: tuple = (),
    combine_fn: Callable[..., Any] = combine,
) -> Future:
    """Reduce ``futures`` with ``combine_fn`` in a tree of fan-in ``fan_in`` on the cluster.

    Neighbours are combined left to right at every level, so the result does not depend on
    where or when tasks run. Depth is ceil(log_fan_in(len(futures))).
    """
    if fan_in < 2:
        raise ValueError("fan_in must be >= 2")
    if not futures:
        raise ValueError("nothing to reduce")
    level = list(futures)
    depth = 0
    while len(level) > 1:
        nxt = []
        for g, i in enumerate(range(0, len(level), fan_in)):
            group = level[i : i + fan_in]
            if len(group) == 1:
                nxt.append(group[0])
            else:
                nxt.append(client.submit(combine_fn, *group, key=(key_name, *label, depth, g)))
        level = nxt
        depth += 1
    return level[0]


def _nbytes(obj: Any) -> int:
    return len(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


class PassRunner:
    """Runs map + tree-reduce passes of one fit on a client, with retries on lost workers.

    Parameters
    ----------
    client : distributed.Client
    manifest : the partitions.
    opts : how workers read and process partitions.
    fan_in : reduction fan-in (``fit.fan_in``).
    persist : keep each partition's validated arrays in worker memory after the first read
        (``xd-read`` tasks, recomputed from the file if a worker dies).
    max_retries : passes re-run after a worker loss that Dask could not absorb itself
        (``fit.max_retries``).
    group_size : with ``persist``, passes over every partition run one task per run of this many
        consecutive partitions (module docstring); None: one task per partition.
    """

    def __init__(
        self,
        client: Client,
        manifest: Manifest,
        opts: TaskOptions,
        *,
        fan_in: int = key("fit.fan_in").default,
        persist: bool = False,
        max_retries: int = key("fit.max_retries").default,
        group_size: int | None = None,
    ) -> None:
        for name, value in (("fit.fan_in", fan_in), ("fit.max_retries", max_retries)):
            err = key(name).validate(value)
            if err:
                raise ValueError(f"{name} {err}")
        if group_size is not None and int(group_size) < 1:
            raise ValueError("group_size must be >= 1")
        self.client = client
        self.manifest = manifest
        self.opts = opts
        self.fan_in = int(fan_in)
        self.persist = bool(persist)
        self.max_retries = int(max_retries)
        self.group_size = None if group_size is None or not persist else int(group_size)
        self.token = uuid.uuid4().hex[:12]
        self.max_gathered_bytes = 0
        self.n_retries = 0
        self._blocks: list[Future] | None = None
        self._home: dict[int, list[str]] = {}
        self._generation = 0
        self._n_workers = len(client.nthreads())
        ensure_worker_setup(client)
        low_latency(client)

    # ------------------------------------------------------------------ sources
    def sources(self, pids: Sequence[int] | None = None) -> list[Any]:
        """Task sources for the partitions ``pids`` (all by default): Partition or block future."""
        pids = range(len(self.manifest)) if pids is None else pids
        if not self.persist:
            return [self.manifest[p] for p in pids]
        skey = self._share_key("blocks")
        if self._blocks is None and skey is not None and skey in _SHARED:
            self._blocks = _SHARED[skey]
        if self._blocks is None:
            name = f"xd-read-{self.token}"
            self._generation += 1
            home = self._placement()
            self._blocks = [
                self.client.submit(
                    read_block,
                    part,
                    self.opts,
                    key=(name, self._generation, part.pid),
                    workers=home.get(part.pid),
                    allow_other_workers=True,
                )
                for part in self.manifest
            ]
            if skey is not None:
                _SHARED[skey] = self._blocks
        return [self._blocks[p] for p in pids]

    def _share_key(self, *what: Any) -> tuple | None:
        """Key of this runner's data in :func:`shared_reads` (None: not sharing)."""
        if _SHARED is None:
            return None
        opts = _digest(self.opts)
        if opts is None:
            return None
        return (self.manifest.fingerprint, opts, self.persist, self.group_size, *what)

    def run_shared(self, name: str, label: tuple, func: Callable[..., Partial], request: Any):
        """:meth:`run` without parameters, or the result of the same pass (name, label,
        function, request) run earlier inside :func:`shared_reads` over the same catalogue and
        options."""
        digest = _digest(request)
        skey = (
            None
            if digest is None
            else self._share_key(
                "pass", name, label, getattr(func, "__qualname__", repr(func)), digest
            )
        )
        if skey is not None and skey in _SHARED:
            return _SHARED[skey]
        res = self.run(name, label, func, request)
        if skey is not None:
            _SHARED[skey] = res
        return res

    def groups(self) -> list[list[int]]:
        """Runs of consecutive partitions that one grouped task covers (all singletons without
        grouping)."""
        g = self.group_size or 1
        pids = list(range(len(self.manifest)))
        return [pids[i : i + g] for i in range(0, len(pids), g)]

    def _placement(self) -> dict[int, list[str]]:
        """Home worker of each persisted partition: rows balanced per worker thread.

        Later passes run where the blocks live (data locality), so an unbalanced first read
        would make every iteration wait for the busiest worker. Largest groups of partitions
        (single partitions without grouping) first, each to the worker with the fewest rows per
        thread so far (LPT). A worker that dies loses its blocks to lineage:
        ``allow_other_workers`` lets them be re-read anywhere.
        """
        nthreads = self.client.nthreads()
        if not nthreads:
            return {}
        load = {w: 0.0 for w in sorted(nthreads)}
        home: dict[int, list[str]] = {}
        rows = [sum(self.manifest[p].n_rows for p in g) for g in self.groups()]
        for gi in sorted(range(len(rows)), key=lambda i: (-rows[i], i)):
            w = min(load, key=lambda a: ((load[a] + rows[gi]) / nthreads[a], a))
            load[w] += rows[gi]
            for pid in self.groups()[gi]:
                home[pid] = [w]
        self._home = home
        return home

    def release(self) -> None:
        """Drop persisted partitions from worker memory."""
        self._blocks = None

    # ------------------------------------------------------------------ passes
    def _share(self, obj: Any, n_tasks: int) -> Any:
        """``obj`` itself when small for ``n_tasks`` tasks (:data:`INLINE_BYTES`), else a future
        of it scattered to every worker (to one on clusters above BROADCAST_MAX_WORKERS)."""
        if _nbytes(obj) * max(n_tasks, 1) <= INLINE_BYTES:
            return obj
        broadcast = self._n_workers <= BROADCAST_MAX_WORKERS
        return self.client.scatter(obj, broadcast=broadcast, hash=False)

    def _gather(self, future: Future | list[Future]) -> Any:
        result = self.client.gather(future) if isinstance(future, list) else future.result()
        size = _nbytes(result)
        self.max_gathered_bytes = max(self.max_gathered_bytes, size)
        return result

    def run(
        self,
        name: str,
        label: tuple,
        func: Callable[..., Partial],
        request: Any,
        *,
        params: Params | None = None,
        pids: Sequence[int] | None = None,
    ) -> Partial:
        """Map ``func(source, opts, params, request)`` over partitions; reduce.

        ``params`` are sent once per pass (inside the tasks when small, else scattered: to every
        worker on clusters of up to ``BROADCAST_MAX_WORKERS``, else to one worker, the others
        fetch them); ``request`` is small and travels inside each task. ``label`` (e.g.
        ``(iteration,)``) becomes part of the keys. Returns the reduced :class:`Partial`.
        """
        grouped = self.group_size is not None and pids is None
        pids = list(range(len(self.manifest)) if pids is None else pids)
        span_name = f"xd-{name}-" + "-".join(str(x) for x in label)
        for attempt in range(self.max_retries + 1):
            futures: list[Future] = []
            try:
                with span(span_name):
                    key = (f"xd-{name}-{self.token}", *label, attempt)
                    self._submit(futures, key, func, request, params, pids, grouped)
                    if grouped and 1 < len(futures) <= self.fan_in:
                        # the root would combine these in this order: do it here, one hop less
                        return combine(*self._gather(futures))
                    root = tree_reduce(
                        self.client,
                        futures,
                        self.fan_in,
                        f"xd-reduce-{self.token}",
                        (name, *label, attempt),
                    )
                    return self._gather(root)
            except RETRYABLE as exc:
                if attempt >= self.max_retries:
                    self._settle(futures)
                    raise
                self.n_retries += 1
                log.warning(
                    "pass %s lost work on the cluster (%s: %s); running it again (%d/%d)",
                    span_name,
                    type(exc).__name__,
                    exc,
                    attempt + 1,
                    self.max_retries,
                )
                if self.persist:
                    self._blocks = None  # re-read partitions whose blocks may be lost
                    if _SHARED is not None:
                        _SHARED.pop(self._share_key("blocks"), None)
                time.sleep(0.5)
                self._n_workers = len(self.client.nthreads())
            except BaseException:
                self._settle(futures)
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _submit(
        self,
        futures: list[Future],
        key: tuple,
        func: Callable[..., Partial],
        request: Any,
        params: Params | None,
        pids: list[int],
        grouped: bool,
    ) -> None:
        """Submit one attempt of a pass, appending to ``futures`` as it goes (so that a failure
        part-way leaves :meth:`_settle` every task already submitted): one task per group of
        partitions (``grouped``), else one per partition of ``pids``; keys ``(*key, first
        partition)``."""
        n_tasks = len(self.groups()) if grouped else len(pids)
        params_f = None if params is None else self._share(params, n_tasks)
        srcs = self.sources(pids)
        if grouped:
            for g in self.groups():
                futures.append(
                    self.client.submit(
                        map_combine,
                        func,
                        [srcs[p] for p in g],
                        self.opts,
                        params_f,
                        request,
                        key=(*key, g[0]),
                        workers=self._home.get(g[0]),
                        allow_other_workers=True,
                    )
                )
            return
        for pid, src in zip(pids, srcs, strict=True):
            futures.append(
                self.client.submit(func, src, self.opts, params_f, request, key=(*key, pid))
            )

    def _settle(self, futures: Sequence[Future]) -> None:
        """After a failed pass: let its tasks that are running end (each writes at most its own
        partition's file) before the caller removes what they write into, then cancel them; a
        pass that failed leaves no task writing behind (bounded by :data:`SETTLE_SECONDS`)."""
        if not futures:
            return
        with contextlib.suppress(Exception):
            wait(futures, timeout=SETTLE_SECONDS)
        with contextlib.suppress(Exception):
            self.client.cancel(list(futures))


def _counts(part: Partial) -> dict:
    return {"read": part.n_read, "used": part.n_used, "dropped": dict(part.dropped)}


class PassStatistics:
    """The loop's statistics source for a catalogue: one ``xd-estep`` pass (map over the batch's
    partitions + tree-reduce) per batch, through the fit's :class:`PassRunner`.

    subsample : online EM, (fraction, seed): keep a seeded fraction of each partition's rows.
    seed : the hash strata of stratified waves derive from it (and the epoch).
    """

    def __init__(
        self, runner: PassRunner, subsample: tuple[float, int] | None = None, seed: int = 0
    ) -> None:
        self.runner = runner
        self.subsample = subsample
        self.seed = int(seed)
        self.n_units = len(runner.manifest)
        self._diagnoses = 0

    def __call__(self, params: Params, batch: Batch) -> BatchStats:
        sub = None
        if self.subsample is not None:
            sub = (self.subsample[0], self.subsample[1], batch.drawn)
        stratum = None
        if batch.stratum is not None:
            stratum = (*batch.stratum, self.seed, batch.drawn)
        part = self.runner.run(
            "estep", batch.label, estep, Rows(sub, stratum), params=params, pids=batch.units
        )
        return BatchStats(part.payload, _counts(part), {"task_seconds": part.seconds})

    def worst_rows(self, before: Params, after: Params | None, m: int) -> list[dict]:
        """One ``xd-diagnose`` pass: the m rows (file, row, id) that lost most (``after``
        None: the m least likely rows at ``before``)."""
        self._diagnoses += 1
        part = self.runner.run(
            "diagnose", (self._diagnoses,), diagnose, Diagnose(after, int(m)), params=before
        )
        return list(part.payload.rows)

    def rows_of(self, params: Params, component: int, m: int) -> list[dict]:
        """One ``xd-diagnose`` pass: the m rows most responsible to ``component``."""
        self._diagnoses += 1
        req = Diagnose(None, int(m), int(component))
        part = self.runner.run("diagnose", (self._diagnoses,), diagnose, req, params=params)
        return list(part.payload.rows)
