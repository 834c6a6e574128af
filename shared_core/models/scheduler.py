"""Cross-request batching for the in-process transformers backend.

A forward pass of a small model costs far less than proportionally to the rows
it carries (SmolLM2-135M, one CPU thread, one decode step: ~60 ms for 1 row,
~100 ms for 4). Concurrent searches on one loaded model, and the several
requests of one batched protocol call (the search's ``leaves_per_round``),
therefore hand their forward passes to one :class:`BatchScheduler`, which
merges the passes that are due at the same time into one, as a serving engine
batches requests:

- every backend call that makes forward passes runs as a *stream*
  (:meth:`BatchScheduler.stream`); the several requests of one ``sample`` call
  run as parallel streams (:meth:`BatchScheduler.map`);
- a stream's forward pass (:meth:`BatchScheduler.forward`) waits until every
  open stream has one due (or ``max_wait_s`` passed), and the last one to
  arrive runs them all as one pass (:func:`merge_forward`);
- the waiting happens on a :class:`threading.Condition` over the backend's own
  lock, which ``wait`` releases completely, so the other streams can reach
  their next pass while one waits.

Each request keeps its own KV cache, of its own length. The merged pass pads
the cached keys/values of the shorter ones (padding columns are masked out of
attention), gives each row its own position ids, and appends each request's new
keys/values back to its own cache: to the model every request reads exactly its
own tokens. A pass that has a request to itself runs exactly as without the
scheduler. Merged rows are not bit-identical to a pass alone (the matrix
kernels sum in a different order for another batch shape): log-probs differ by
about 1e-5 (measured, see the README's Speed section). Switch merging off with
``TransformersBackend(..., batching=False)`` or ``RAIN_BATCHING=0``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, TypeVar

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from shared_core.models.protocol import WorkCounter

__all__ = ["BATCHING_ENV", "BatchScheduler", "batching_default", "merge_forward"]

BATCHING_ENV = "RAIN_BATCHING"
"""Environment variable: ``0``/``off``/``false`` turns cross-request batching off."""

T = TypeVar("T")
R = TypeVar("R")


def batching_default() -> bool:
    """Batching unless :data:`BATCHING_ENV` says otherwise."""
    value = os.environ.get(BATCHING_ENV, "1").strip().lower()
    if value in ("0", "off", "false", "no"):
        return False
    if value in ("1", "on", "true", "yes", ""):
        return True
    raise ValueError(f"{BATCHING_ENV}={value!r}: use 1/on or 0/off")


@dataclass(eq=False)
class _Job:
    """One caller's forward pass: its rows, its cache (updated in place) and its ``keep``."""

    input_ids: torch.Tensor  # [rows, q]
    cache: DynamicCache | None
    keep: int | torch.Tensor
    result: Any = None
    error: BaseException | None = None
    done: bool = False
    past: int = field(init=False)

    def __post_init__(self) -> None:
        self.past = self.cache.get_seq_length() if self.cache is not None else 0

    def kept_positions(self) -> torch.Tensor:
        """The input positions whose logits the caller asked for (``logits_to_keep``)."""
        q = int(self.input_ids.shape[1])
        if isinstance(self.keep, torch.Tensor):
            return self.keep.to(torch.long)
        k = int(self.keep)
        return torch.arange(q) if k == 0 or k >= q else torch.arange(q - k, q)


def _run_alone(model: Any, job: _Job) -> Any:
    with torch.inference_mode():
        return model(
            input_ids=job.input_ids,
            cache=job.cache,
            use_cache=job.cache is not None,
            logits_to_keep=job.keep,
        )


def _mergeable(job: _Job) -> bool:
    if job.cache is None:
        return False  # reuse off: the from-scratch reference always runs alone
    # Plain full-attention layers only (a sliding-window layer drops old positions).
    return all(type(layer) is DynamicLayer for layer in job.cache.layers)


def _layers(cache: DynamicCache) -> list[Any]:
    """The cache's layers (``_mergeable`` checked they are plain :class:`DynamicLayer`)."""
    return list(cache.layers)


def _padded(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """``[rows, heads, n, dim]`` right-padded with zeros to ``length`` positions."""
    missing = length - int(tensor.shape[2])
    return tensor if missing == 0 else torch.nn.functional.pad(tensor, (0, 0, 0, missing))


def merge_forward(model: Any, jobs: Sequence[_Job], pad_id: int = 0) -> list[Any]:
    """Run several callers' forward passes as one; returns each caller's output.

    Each job continues its own cache (``[rows, heads, past, dim]`` per layer, its own
    ``past``) with its own ``[rows, q]`` input. The merged cache holds every job's
    past right-padded to the longest, then the new positions; a 2-D attention mask
    hides the padding columns and explicit position ids give each row its own
    positions (the cached keys already carry theirs: RoPE is applied before caching),
    so a row attends to exactly its own tokens. Afterwards each job's new keys and
    values are appended to its own cache, as a pass of its own would have done.
    """
    if len(jobs) == 1:
        return [_run_alone(model, jobs[0])]
    past = max(j.past for j in jobs)
    width = max(int(j.input_ids.shape[1]) for j in jobs)
    rows = [int(j.input_ids.shape[0]) for j in jobs]
    total = sum(rows)
    ids = torch.full((total, width), pad_id, dtype=torch.long)
    mask = torch.zeros((total, past + width), dtype=torch.long)
    positions = torch.empty((total, width), dtype=torch.long)
    start = 0
    for job, n in zip(jobs, rows, strict=True):
        q = int(job.input_ids.shape[1])
        ids[start : start + n, :q] = job.input_ids
        mask[start : start + n, : job.past] = 1
        # Every new column is visible: the causal mask keeps a row's real tokens from
        # the padding after them, and padded queries' outputs are dropped.
        mask[start : start + n, past:] = 1
        positions[start : start + n] = job.past + torch.arange(width)
        start += n
    layers = []
    reference = next(j for j in jobs if j.past > 0) if past > 0 else None
    if reference is not None:
        assert reference.cache is not None
        job_layers = [_layers(j.cache) if j.cache is not None else [] for j in jobs]
        for i, like_layer in enumerate(_layers(reference.cache)):
            keys, values = [], []
            for job, n, own in zip(jobs, rows, job_layers, strict=True):
                if job.past > 0:
                    keys.append(_padded(own[i].keys, past))
                    values.append(_padded(own[i].values, past))
                else:
                    like = like_layer.keys
                    blank = like.new_zeros((n, like.shape[1], past, like.shape[3]))
                    keys.append(blank)
                    values.append(blank)
            layers.append((torch.cat(keys), torch.cat(values)))
    cache = (
        DynamicCache(ddp_cache_data=layers, config=model.config)
        if layers
        else DynamicCache(config=model.config)
    )
    kept = [j.kept_positions() for j in jobs]
    union = torch.unique(torch.cat(kept))
    with torch.inference_mode():
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=union,
        )
    results = []
    start = 0
    for job, n, positions_kept in zip(jobs, rows, kept, strict=True):
        q = int(job.input_ids.shape[1])
        assert job.cache is not None
        for layer, own in zip(_layers(cache), _layers(job.cache), strict=True):
            own.update(
                layer.keys[start : start + n, :, past : past + q],
                layer.values[start : start + n, :, past : past + q],
            )
        columns = torch.searchsorted(union, positions_kept)
        results.append(SimpleNamespace(logits=out.logits[start : start + n][:, columns]))
        start += n
    return results


class BatchScheduler:
    """Merges the forward passes of concurrent streams on one model into shared passes.

    ``lock`` is the backend's lock: :meth:`forward` is called with it held, and
    waiting for the other streams releases it (``Condition.wait`` releases an
    ``RLock`` however deeply it is held).
    """

    def __init__(
        self,
        model: Any,
        lock: threading.RLock,
        work: WorkCounter,
        *,
        enabled: bool | None = None,
        pad_id: int = 0,
        max_wait_s: float = 0.05,
        max_rows: int = 64,
        max_padding: float = 1.5,
    ) -> None:
        self.model = model
        self.work = work
        self.enabled = batching_default() if enabled is None else bool(enabled)
        self.pad_id = pad_id
        self.max_wait_s = max_wait_s
        """How long a due pass waits for a stream that is busy elsewhere (e.g. compiling
        a grammar) before it runs without it: a bound on the delay, never a deadlock."""
        self.max_rows = max_rows
        """Rows above this run in another pass (bounds the merged pass's memory)."""
        self.max_padding = max_padding
        """A pass may compute at most this many positions per real one (padding)."""
        self._cond = threading.Condition(lock)
        self._pending: list[_Job] = []
        self._streams = 0
        self._local = threading.local()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def _depth(self) -> int:
        """How deep the current thread is in streams (0: in none)."""
        return int(getattr(self._local, "depth", 0))

    # --- streams ------------------------------------------------------------------------
    @contextmanager
    def stream(self, *, counted: bool = False) -> Iterator[None]:
        """Marks the block as a stream: the passes due meanwhile wait for its next one.

        ``counted``: the stream was already counted by :meth:`map` (so that no item's
        first pass runs before its siblings have started).
        """
        if not self.enabled or self._depth():
            self._local.depth = self._depth() + 1
            try:
                yield
            finally:
                self._local.depth -= 1
            return
        if not counted:
            with self._cond:
                self._streams += 1
        self._local.depth = 1
        try:
            yield
        finally:
            self._local.depth = 0
            with self._cond:
                self._streams -= 1
                self._cond.notify_all()  # a waiting pass may now have every stream due

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """``[fn(item) for item in items]``, each item a stream of its own (in parallel).

        Every item runs to its end before this returns, even when one raises (the
        first error is re-raised then): no work of the call outlives it.
        """
        if not self.enabled or len(items) <= 1:
            with self.stream():
                return [fn(item) for item in items]

        def run(item: T) -> R:
            with self.stream(counted=True):
                return fn(item)

        # The caller waits outside any stream: the items are the streams, all counted
        # before any starts.
        suspended = self._depth()
        with self._cond:
            self._streams += len(items) - (1 if suspended else 0)
        self._local.depth = 0
        try:
            futures: list[Future[R]] = [self._executor().submit(run, item) for item in items]
            errors = [f.exception() for f in futures]
        finally:
            if suspended:
                self._enter(suspended)
        for error in errors:
            if error is not None:
                raise error
        return [f.result() for f in futures]

    def _enter(self, depth: int) -> None:
        with self._cond:
            self._streams += 1
        self._local.depth = depth

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="rain-batch")
            return self._pool

    def close(self) -> None:
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    # --- forward passes --------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, cache: DynamicCache | None, keep: Any) -> Any:
        """One caller's forward pass, run in a shared pass with the others due.

        Called with the backend's lock held. Returns what ``model(...)`` returns
        for this caller alone (its ``.logits``); ``cache`` is updated in place.
        """
        job = _Job(input_ids, cache, keep)
        if not self.enabled or not _mergeable(job):
            self._count([job])
            return _run_alone(self.model, job)
        alone = not self._depth()
        with self._cond:
            if alone:
                self._streams += 1  # a pass outside any stream counts for itself
            self._pending.append(job)
            deadline = time.monotonic() + self.max_wait_s
            try:
                while not job.done:
                    left = deadline - time.monotonic()
                    if len(self._pending) >= self._streams or left <= 0:
                        self._run_pending()
                    else:
                        self._cond.wait(left)
            finally:
                if alone:
                    self._streams -= 1
                    self._cond.notify_all()
        if job.error is not None:
            raise job.error
        return job.result

    def _run_pending(self) -> None:
        """Run every pending job (held: the lock), in as few passes as pay off."""
        jobs, self._pending = self._pending, []
        try:
            for group in self._groups(jobs):
                self._count(group)
                for job, result in zip(
                    group, merge_forward(self.model, group, self.pad_id), strict=True
                ):
                    job.result = result
        except BaseException as exc:  # every waiter must wake, with the error
            for job in jobs:
                if job.result is None:
                    job.error = exc
        finally:
            for job in jobs:
                job.done = True
            self._cond.notify_all()

    def _groups(self, jobs: list[_Job]) -> list[list[_Job]]:
        """Jobs in passes: similar new lengths together, at most ``max_rows`` rows each.

        A merged pass pads every row to the longest new part: a one-token decode step
        beside a judge prompt's 30-token tail would cost 30 positions. So jobs go by
        new length, and a pass takes the next one only while its padded positions stay
        within ``max_padding`` times the real ones.
        """
        groups: list[list[_Job]] = []
        rows = real = 0
        width = 0
        for job in sorted(jobs, key=lambda j: int(j.input_ids.shape[1])):
            n, q = (int(d) for d in job.input_ids.shape)
            wider = max(width, q)
            fits = groups and rows + n <= self.max_rows
            if fits and (rows + n) * wider <= self.max_padding * (real + n * q):
                groups[-1].append(job)
                rows, real, width = rows + n, real + n * q, wider
                continue
            groups.append([job])
            rows, real, width = n, n * q, q
        return groups

    def _count(self, group: Sequence[_Job]) -> None:
        self.work.forward_calls += 1
        self.work.tokens_processed += sum(int(j.input_ids.numel()) for j in group)
        if len(group) > 1:
            extra = self.work.extra
            extra["merged_passes"] = extra.get("merged_passes", 0) + 1
            extra["merged_requests"] = extra.get("merged_requests", 0) + len(group)
