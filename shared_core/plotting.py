"""A picture of the search: per commit, the candidates' values and visits.

matplotlib is imported inside :func:`plot_trace` (it is a ``dev`` extra), so
the engine itself never needs it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared_core.errors import RainError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_trace", "trace_of"]

_CHOSEN = "#2b8a3e"  # the committed candidate
_GREEDY = "#e8590c"  # greedy's choice, when the search overrode it
_OTHER = "#868e96"
_LABEL_CHARS = 14
_MAX_MARKER = 400.0  # points², for the most visited candidate


def trace_of(result_or_trace: Any) -> list[dict[str, Any]]:
    """The per-commit trace of a ``RainResult``, of its ``to_dict()``, or a trace itself."""
    trace = getattr(result_or_trace, "trace", None)
    if trace is None and isinstance(result_or_trace, Mapping):
        inner = result_or_trace.get("rain", result_or_trace)  # the CLI's --compare JSON
        trace = inner.get("trace") if isinstance(inner, Mapping) else None
    if trace is None and isinstance(result_or_trace, Sequence):
        trace = result_or_trace
    if trace is None or isinstance(trace, str | bytes):
        raise RainError(
            "plot_trace needs a RainResult, its to_dict(), or its .trace "
            f"(a list of commit dicts); got {type(result_or_trace).__name__}"
        )
    return [dict(c) for c in trace]


def plot_trace(
    result_or_trace: Any,
    path: str | Path | None = None,
    *,
    title: str | None = None,
    max_commits: int = 40,
) -> Figure:
    """Draw what the search did at each commit and return the figure.

    Top panel: every candidate token set of the root when the commit was
    decided, at its value *v* (the mean self-evaluation of its subtree, in
    [-1, 1]); marker area is proportional to its visit count *n*. The committed
    candidate is green; greedy's choice is orange where the search overrode it.
    Bottom panel: search iterations spent per commit; red bars are commits that
    differ from greedy decoding. ``path`` saves the image (format from the
    suffix). At most ``max_commits`` commits are drawn (the first ones).
    """
    trace = trace_of(result_or_trace)
    if not trace:
        raise RainError("the trace is empty: nothing was committed, so there is nothing to plot")
    trace = trace[:max_commits]
    if importlib.util.find_spec("matplotlib") is None:
        raise RainError(
            "plot_trace needs matplotlib: pip install matplotlib (or the package's dev extra)"
        )
    figsize = (max(6.0, 0.45 * len(trace) + 2.0), 6.0)
    if path is not None:  # no pyplot: nothing global is kept alive, no GUI backend needed
        from matplotlib.figure import Figure as _Figure

        fig = _Figure(figsize=figsize, layout="constrained")
    else:  # pyplot, so that notebooks display it inline
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=figsize, layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))

    max_n = max((float(c.get("n", 0.0)) for k in trace for c in k.get("candidates", ())), default=1)
    max_n = max(max_n, 1.0)
    chosen_v: list[float] = []
    for x, commit in enumerate(trace):
        picked = _chosen_index(commit)
        for j, cand in enumerate(commit.get("candidates", ())):
            n = float(cand.get("n", 0.0))
            size = 12.0 + _MAX_MARKER * n / max_n
            if j == picked:
                color, zorder = _CHOSEN, 3
            elif cand.get("greedy") and not commit.get("greedy_agrees", True):
                color, zorder = _GREEDY, 2
            else:
                color, zorder = _OTHER, 1
            alpha = 0.9 if n > 0 else 0.25
            top.scatter(x, float(cand.get("v", 0.0)), s=size, c=color, alpha=alpha, zorder=zorder)
        chosen_v.append(float(commit.get("value", 0.0)))
    xs = list(range(len(trace)))
    top.plot(xs, chosen_v, color=_CHOSEN, linewidth=1.0, alpha=0.6, zorder=0)
    top.axhline(0.0, color="black", linewidth=0.5, alpha=0.4)
    top.set_ylim(-1.15, 1.15)
    top.set_ylabel("value v (self-evaluation)")
    top.scatter([], [], c=_CHOSEN, label="committed")
    top.scatter([], [], c=_GREEDY, label="greedy (overridden)")
    top.scatter([], [], c=_OTHER, label="other candidates")
    top.legend(loc="lower left", fontsize="small", title="area ∝ visits n")

    iterations = [int(c.get("iterations", 0)) for c in trace]
    colors = ["#c92a2a" if c.get("differs_from_greedy") else "#4c6ef5" for c in trace]
    bottom.bar(xs, iterations, color=colors)
    bottom.set_ylabel("iterations")
    bottom.set_xticks(xs, [_label(c) for c in trace], rotation=60, ha="right", fontsize="small")
    bottom.set_xlabel("committed token set (red: differs from greedy)")

    overrides = sum(1 for c in trace if c.get("differs_from_greedy"))
    fig.suptitle(
        title
        or f"RAIN search: {len(trace)} commits, {sum(iterations)} iterations, "
        f"{overrides} differ from greedy"
    )
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def _chosen_index(commit: Mapping[str, Any]) -> int | None:
    """Which candidate was committed: same token ids (else same text)."""
    ids = commit.get("token_ids")
    cands = list(commit.get("candidates", ()))
    for j, cand in enumerate(cands):
        if ids is not None and cand.get("token_ids") == ids:
            return j
    for j, cand in enumerate(cands):
        if cand.get("text") == commit.get("text"):
            return j
    return None


def _label(commit: Mapping[str, Any]) -> str:
    text = str(commit.get("text", ""))
    if not text:  # the commit's text can be held back (stop strings); show a candidate's
        picked = _chosen_index(commit)
        if picked is not None:
            text = str(commit["candidates"][picked].get("text", ""))
    text = text.replace("\n", "⏎")
    return text if len(text) <= _LABEL_CHARS else text[: _LABEL_CHARS - 1] + "…"
