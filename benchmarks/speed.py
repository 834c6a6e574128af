"""Speed benchmark of the RAIN engine (issue 3): cost versus vanilla, prefix reuse, memory.

Run from the repository root::

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.speed --quick     # < 2 min
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.speed             # full, ~30 min on 2 CPUs

Everything is measured in one process on the embedded SmolLM2-135M-Instruct,
with a fixed seed and a fixed list of prompts, for the ``positive`` rubric
(short, word labels) and the few-shot ``harmless`` rubric (~1,000 tokens of
examples). Per prompt the runs are interleaved (vanilla, RAIN at the paper's
defaults, RAIN ``fast``, RAIN with reuse off) so that machine noise hits every
variant alike; ratios come from sums over the same prompts.

Top-level JSON keys (stable across versions): ``model``, ``vanilla_s_per_token``,
``rain_s_per_token``, ``rain_vs_vanilla``, ``fast_vs_vanilla``,
``tokens_per_commit_reuse_on``, ``tokens_per_commit_reuse_off``,
``reuse_token_ratio``, ``reuse_wall_ratio``, ``identical_output``,
``peak_rss_mb``, ``breakdown_s``; details per rubric under ``rubrics``.

Batching (issue 16), a section of its own (``--leaves``, ``--concurrency``,
``--dev-items``; ``--batching-only`` skips the measurements above and adds the new
keys to the existing JSON): ``leaves_per_round`` -- sequential forward passes per
committed token and wall time for k leaves per round, at the paper's settings and
with ``fast``; ``concurrency`` -- aggregate committed tokens/s of 1, 2, 4 concurrent
``fast`` searches on one loaded model, batching on and off; ``leaves_dev_positive_rate``
-- the VADER positive rate at each k on the alignment benchmark's dev split.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import psutil

__all__ = ["PROMPTS", "main", "run_benchmark"]

DEFAULT_OUT = Path("benchmarks/results/speed.json")
SEED = 0

PROMPTS: dict[str, tuple[str, ...]] = {
    "positive": (
        "Describe your last trip to the dentist in two sentences.",
        "Write a short review of the restaurant you visited yesterday.",
        "Tell me about a rainy Monday morning at the office.",
    ),
    "harmless": (
        "How can I get back at a coworker who embarrassed me in a meeting?",
        "What should I do if my neighbour's dog keeps barking all night?",
        "Tell me how to get into my ex's email account.",
    ),
}
"""Fixed prompts per rubric; the first ones are used when fewer are asked for."""

LONG_PROMPT = (
    "Write a long, detailed story of at least five paragraphs about a lighthouse keeper "
    "who spends a stormy winter alone on a small island."
)
"""Prompt for the memory run: it asks for an answer that fills the 256-token limit."""

BREAKDOWN_KEYS = ("expansion", "simulation", "evaluation", "embeddings", "commit")

MODES: dict[str, dict[str, Any]] = {
    "quick": {
        "prompts": 1,
        "max_new_tokens": 3,
        "vanilla_repeats": 1,
        # Fewer iterations per commit than the paper, so the quick run fits in two minutes.
        "search": {"T": 3, "min_new_iterations": 2, "T_m": 2},
        "fast_search": {"T": 3, "min_new_iterations": 2, "T_m": 2},
        # Reuse on/off pair per rubric: "main" reuses the first prompt's main run,
        # a dict sets its own length and search; the harmless reuse-off run, which
        # re-reads ~1,000 tokens of examples per evaluation, is left to the full mode.
        "reuse_pair": {"positive": "main", "harmless": None},
        "long_tokens": 0,
    },
    "full": {
        "prompts": 3,
        "max_new_tokens": 24,
        "vanilla_repeats": 3,
        "search": {},  # the paper's settings (RainConfig.paper())
        "fast_search": {},  # RainConfig.fast() as it is
        # With reuse off every harmless evaluation re-reads the ~1,000-token rubric
        # twice; at the paper's T that run alone would take hours on 2 CPU cores, so
        # the harmless pair uses a shorter answer and a smaller T (same for on and off).
        "reuse_pair": {
            "positive": "main",
            "harmless": {
                "max_new_tokens": 6,
                "search": {"T": 6, "min_new_iterations": 3, "T_m": 2},
            },
        },
        "long_tokens": 256,
    },
}


# --- memory --------------------------------------------------------------------------------


class _RssSampler:
    """Samples the process's resident memory in a thread; ``peak()`` since the last reset."""

    def __init__(self, interval_s: float = 0.02) -> None:
        self._proc = psutil.Process()
        self._interval = interval_s
        self._peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def rss(self) -> int:
        return int(self._proc.memory_info().rss)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            value = self.rss()
            with self._lock:
                self._peak = max(self._peak, value)

    def start(self) -> _RssSampler:
        self.reset()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def reset(self) -> int:
        now = self.rss()
        with self._lock:
            self._peak = now
        return now

    def peak(self) -> int:
        with self._lock:
            return max(self._peak, self.rss())


def _mb(n_bytes: float) -> float:
    return round(n_bytes / 2**20, 1)


def _ru_maxrss_mb() -> float:
    # Linux reports kilobytes, macOS bytes.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return _mb(peak if sys.platform == "darwin" else peak * 1024)


# --- one run -----------------------------------------------------------------------------------


@contextmanager
def _counted(engine: Any) -> Iterator[dict[str, Any]]:
    """Resets the backend's work counter and reports the work and wall time of the block."""
    work = engine.backend.work
    work.tokens_processed = 0
    work.forward_calls = 0
    record: dict[str, Any] = {}
    t0 = time.perf_counter()
    yield record
    record["wall_s"] = time.perf_counter() - t0
    record["tokens_processed"] = work.tokens_processed
    record["forward_calls"] = work.forward_calls


def _run_vanilla(engine: Any, prompt: str, max_new_tokens: int, repeats: int) -> dict[str, Any]:
    walls, result = [], None
    for _ in range(repeats):
        with _counted(engine) as rec:
            result = engine.vanilla(prompt, max_new_tokens=max_new_tokens, seed=SEED)
        walls.append(rec["wall_s"])
    assert result is not None
    return {
        "wall_s": statistics.median(walls),
        "wall_s_all": [round(w, 3) for w in walls],
        "tokens": result.completion_tokens,
        "tokens_processed": rec["tokens_processed"],
        "text": result.text,
        "token_ids": result.token_ids,
    }


def _run_rain(engine: Any, prompt: str, rubric: str, config: Any) -> dict[str, Any]:
    with _counted(engine) as rec:
        result = engine.generate(prompt, rubric=rubric, config=config)
    stats = result.stats
    return {
        "wall_s": rec["wall_s"],
        "tokens": result.completion_tokens,
        "tokens_processed": rec["tokens_processed"],
        "forward_calls": rec["forward_calls"],
        "iterations": stats.iterations,
        "commits": stats.commits,
        "nodes": stats.nodes,
        "finish_reason": result.finish_reason,
        "breakdown_s": dict(stats.breakdown_s),
        "text": result.text,
        "token_ids": result.token_ids,
    }


# --- aggregation -------------------------------------------------------------------------------


def _sum(runs: list[dict[str, Any]], key: str) -> float:
    return float(sum(r[key] for r in runs))


def _s_per_token(runs: list[dict[str, Any]]) -> float | None:
    tokens = _sum(runs, "tokens")
    return _sum(runs, "wall_s") / tokens if tokens else None


def _tokens_per_commit(runs: list[dict[str, Any]]) -> float | None:
    tokens = _sum(runs, "tokens")
    return _sum(runs, "tokens_processed") / tokens if tokens else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _breakdown(runs: list[dict[str, Any]]) -> dict[str, float]:
    out = dict.fromkeys(BREAKDOWN_KEYS, 0.0)
    for r in runs:
        for k, v in r["breakdown_s"].items():
            out[k] = out.get(k, 0.0) + v
    out["other"] = _sum(runs, "wall_s") - sum(out.values())
    return out


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def _summary(
    vanilla: list[dict[str, Any]],
    rain: list[dict[str, Any]],
    fast: list[dict[str, Any]],
    on_paired: list[dict[str, Any]],
    off: list[dict[str, Any]],
) -> dict[str, Any]:
    """The headline figures over a set of runs (one rubric, or all)."""
    v = _s_per_token(vanilla)
    r = _s_per_token(rain)
    f = _s_per_token(fast)
    on_tpc = _tokens_per_commit(on_paired)
    off_tpc = _tokens_per_commit(off)
    return {
        "vanilla_s_per_token": v,
        "rain_s_per_token": r,
        "fast_s_per_token": f,
        "rain_vs_vanilla": _ratio(r, v),
        "fast_vs_vanilla": _ratio(f, v),
        "tokens_per_commit_reuse_on": on_tpc,
        "tokens_per_commit_reuse_off": off_tpc,
        "reuse_token_ratio": _ratio(off_tpc, on_tpc),
        "reuse_wall_s_on": _sum(on_paired, "wall_s"),
        "reuse_wall_s_off": _sum(off, "wall_s"),
        "reuse_wall_ratio": _ratio(_sum(off, "wall_s"), _sum(on_paired, "wall_s")),
        "identical_output": (
            all(a["token_ids"] == b["token_ids"] for a, b in zip(on_paired, off, strict=True))
            if off
            else None
        ),
        "breakdown_s": _breakdown(rain),
        "fast_breakdown_s": _breakdown(fast),
        "reuse_off_breakdown_s": _breakdown(off),
    }


# --- the benchmark -----------------------------------------------------------------------------


def _log(msg: str) -> None:
    print(f"[speed {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_benchmark(
    mode: str = "full",
    *,
    max_new_tokens: int | None = None,
    prompts: int | None = None,
    long_tokens: int | None = None,
    rubrics: tuple[str, ...] = ("positive", "harmless"),
    on_progress: Callable[[dict[str, Any]], object] | None = None,
) -> dict[str, Any]:
    """Run every measurement in this process and return the JSON-ready result.

    ``on_progress`` receives the partial result (``complete: false``) after each
    rubric, so a long run that is stopped still leaves its figures behind.
    """
    import torch

    from shared_core import RainConfig, RainEngine

    settings = dict(MODES[mode])
    if max_new_tokens is not None:
        settings["max_new_tokens"] = max_new_tokens
    if prompts is not None:
        settings["prompts"] = prompts
    if long_tokens is not None:
        settings["long_tokens"] = long_tokens
    n_tokens = settings["max_new_tokens"]

    started = time.perf_counter()
    sampler = _RssSampler().start()
    rss_start = sampler.rss()
    t0 = time.perf_counter()
    engine = RainEngine.from_default()
    load_s = time.perf_counter() - t0
    rss_model = sampler.rss()
    # One-time costs of a loaded model, paid before measuring (a server pays them
    # once): the similarity embedder, torch kernels, clause masks, rubric preambles.
    t0 = time.perf_counter()
    engine.embedder.encode(["warm up"])
    engine.vanilla("Hello.", max_new_tokens=4)
    for rubric in rubrics:
        engine.generate("Hello.", rubric=rubric, max_new_tokens=1, seed=SEED)
    warmup_s = time.perf_counter() - t0
    rss_loaded = sampler.rss()
    _log(
        f"loaded {engine.model_name} in {load_s:.1f}s (+{warmup_s:.1f}s warm-up), "
        f"rss {_mb(rss_loaded)} MB"
    )

    default_cfg = _paper_config(seed=SEED, max_new_tokens=n_tokens, **settings["search"])
    fast_cfg = RainConfig.fast(seed=SEED, max_new_tokens=n_tokens, **settings["fast_search"])

    sampler.reset()
    keys = ("v", "r", "f", "on", "off")
    all_runs: dict[str, list[dict[str, Any]]] = {k: [] for k in keys}
    per_rubric: dict[str, Any] = {}
    pair_configs: dict[str, Any] = {}
    result: dict[str, Any] = {}

    def assemble(complete: bool, long_run: dict[str, Any] | None) -> dict[str, Any]:
        top = _summary(*(all_runs[k] for k in keys))
        growth = sampler.peak() - rss_loaded
        if long_run is not None:
            growth = max(growth, long_run["growth_over_loaded_model_mb"] * 2**20)
        return _rounded(
            {
                "model": engine.model_name,
                **{k: top[k] for k in _HEADLINE},
                "peak_rss_mb": _ru_maxrss_mb(),
                "rss_loaded_model_mb": _mb(rss_loaded),
                "memory_growth_mb": _mb(growth),
                "breakdown_s": top["breakdown_s"],
                "fast_breakdown_s": top["fast_breakdown_s"],
                "reuse_off_breakdown_s": top["reuse_off_breakdown_s"],
                "long_answer_memory": long_run,
                "rubrics": per_rubric,
                "complete": complete,
                "settings": {
                    "mode": mode,
                    "seed": SEED,
                    **settings,
                    "default_config": _config_delta(default_cfg, _paper_config()),
                    "fast_config": _config_delta(fast_cfg, _paper_config()),
                    "reuse_pair_configs": pair_configs,
                },
                "environment": {
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(),
                    "cpus": os.cpu_count(),
                    "load_s": load_s,
                    "warmup_s": warmup_s,
                    "rss_start_mb": _mb(rss_start),
                    "rss_after_model_mb": _mb(rss_model),
                    "total_s": time.perf_counter() - started,
                },
            }
        )

    for rubric in rubrics:
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in keys}
        rubric_prompts = PROMPTS[rubric][: settings["prompts"]]
        pair = settings["reuse_pair"].get(rubric)
        details = []
        for i, prompt in enumerate(rubric_prompts):
            _log(f"{rubric} #{i}: vanilla")
            runs["v"].append(_run_vanilla(engine, prompt, n_tokens, settings["vanilla_repeats"]))
            _log(f"{rubric} #{i}: rain (defaults)")
            runs["r"].append(_run_rain(engine, prompt, rubric, default_cfg))
            _log(f"{rubric} #{i}: rain fast")
            runs["f"].append(_run_rain(engine, prompt, rubric, fast_cfg))
            _log(
                f"{rubric} #{i}: vanilla {runs['v'][-1]['wall_s']:.1f}s "
                f"({runs['v'][-1]['tokens']} tok), rain {runs['r'][-1]['wall_s']:.1f}s "
                f"({runs['r'][-1]['tokens']} tok), fast {runs['f'][-1]['wall_s']:.1f}s"
            )
            details.append(
                {
                    "prompt": prompt,
                    "vanilla": _detail(runs["v"][-1]),
                    "rain": _detail(runs["r"][-1]),
                    "fast": _detail(runs["f"][-1]),
                }
            )
        if pair is not None:
            prompt = rubric_prompts[0]
            if pair == "main":
                on_cfg = default_cfg
                runs["on"].append(runs["r"][0])
            else:
                on_cfg = _paper_config(
                    seed=SEED, max_new_tokens=pair["max_new_tokens"], **pair["search"]
                )
                _log(f"{rubric} #0: reuse pair, reuse on")
                runs["on"].append(_run_rain(engine, prompt, rubric, on_cfg))
            _log(f"{rubric} #0: reuse pair, reuse off")
            runs["off"].append(_run_rain(engine, prompt, rubric, on_cfg.merged(reuse_cache=False)))
            _log(
                f"{rubric} #0: reuse on {runs['on'][-1]['wall_s']:.1f}s, "
                f"off {runs['off'][-1]['wall_s']:.1f}s"
            )
            pair_configs[rubric] = {
                "prompt": prompt,
                **_config_delta(on_cfg, _paper_config()),
            }
            details[0]["reuse_pair"] = {
                "reuse_on": _detail(runs["on"][-1]),
                "reuse_off": _detail(runs["off"][-1]),
            }
        summary = _summary(*(runs[k] for k in keys))
        summary["prompts"] = details
        per_rubric[rubric] = summary
        for k in keys:
            all_runs[k].extend(runs[k])
        if on_progress is not None:
            on_progress(assemble(False, None))

    long_run: dict[str, Any] | None = None
    if settings["long_tokens"]:
        # The fast preset keeps a 256-token answer affordable on 2 CPU cores; the
        # harmless rubric is the larger judge prompt, so the larger KV snapshots.
        rss_before = sampler.reset()
        _log(f"memory run: fast preset, harmless rubric, {settings['long_tokens']} tokens")
        cfg = RainConfig.fast(seed=SEED, max_new_tokens=settings["long_tokens"])
        run = _run_rain(engine, LONG_PROMPT, "harmless", cfg)
        peak = sampler.peak()
        long_run = {
            "preset": "fast",
            "rubric": "harmless",
            "prompt": LONG_PROMPT,
            "max_new_tokens": settings["long_tokens"],
            "answer_tokens": run["tokens"],
            "finish_reason": run["finish_reason"],
            "wall_s": run["wall_s"],
            "rss_before_mb": _mb(rss_before),
            "peak_rss_mb": _mb(peak),
            "growth_over_loaded_model_mb": _mb(peak - rss_loaded),
            "iterations": run["iterations"],
            "tokens_processed": run["tokens_processed"],
            "forward_calls": run["forward_calls"],
            "breakdown_s": run["breakdown_s"],
        }
        _log(
            f"memory run: {run['tokens']} tokens in {run['wall_s']:.1f}s, "
            f"growth {long_run['growth_over_loaded_model_mb']} MB"
        )
    result = assemble(True, long_run)
    sampler.stop()
    return result


_HEADLINE = (
    "vanilla_s_per_token",
    "rain_s_per_token",
    "rain_vs_vanilla",
    "fast_vs_vanilla",
    "tokens_per_commit_reuse_on",
    "tokens_per_commit_reuse_off",
    "reuse_token_ratio",
    "reuse_wall_ratio",
    "identical_output",
)


def _detail(run: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in run.items() if k != "token_ids"}


def _config_delta(cfg: Any, base: Any) -> dict[str, Any]:
    """The config fields that differ from `base` (the paper's settings)."""
    a, b = cfg.model_dump(), base.model_dump()
    return {k: v for k, v in a.items() if v != b[k]}


# --- batching: leaves per round, concurrent searches (issue 16) ------------------------------


def _paper_config(**kw: Any) -> Any:
    from shared_core import RainConfig

    paper = getattr(RainConfig, "paper", None)  # the preset, where the config has it
    return paper(**kw) if paper is not None else RainConfig(**kw)


def _leaves_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    tokens = _sum(runs, "tokens")
    return {
        "tokens": tokens,
        "wall_s": _sum(runs, "wall_s"),
        "s_per_token": _sum(runs, "wall_s") / tokens if tokens else None,
        "passes_per_token": _sum(runs, "forward_calls") / tokens if tokens else None,
        "iterations_per_token": _sum(runs, "iterations") / tokens if tokens else None,
        "texts": [r["text"] for r in runs],
    }


def _add_ratios(table: dict[str, Any], ks: list[int]) -> None:
    """Each k's passes and wall time per token against the first k's (how many times fewer)."""
    first = table[str(ks[0])]
    for k in ks:
        row = table[str(k)]
        row["passes_ratio_vs_first"] = _ratio(first["passes_per_token"], row["passes_per_token"])
        row["wall_ratio_vs_first"] = _ratio(first["s_per_token"], row["s_per_token"])


def run_leaves(
    engine: Any, ks: list[int], prompts: int, n_tokens: int, rubric: str = "positive"
) -> dict[str, Any]:
    """Wall time and sequential forward passes per committed token for k leaves per round.

    Per prompt the k values run back to back (machine noise hits them alike). With one
    search the passes are sequential: a merged pass counts once.
    """
    from shared_core import RainConfig

    out: dict[str, Any] = {"rubric": rubric, "max_new_tokens": n_tokens, "ks": ks}
    presets = {
        "paper": lambda k: _paper_config(seed=SEED, max_new_tokens=n_tokens, leaves_per_round=k),
        "fast": lambda k: RainConfig.fast(seed=SEED, max_new_tokens=n_tokens, leaves_per_round=k),
    }
    for name, make in presets.items():
        runs: dict[int, list[dict[str, Any]]] = {k: [] for k in ks}
        for i, prompt in enumerate(PROMPTS[rubric][:prompts]):
            for k in ks:
                runs[k].append(_run_rain(engine, prompt, rubric, make(k)))
                r = runs[k][-1]
                _log(
                    f"leaves {name} #{i} k={k}: {r['wall_s']:.1f}s, {r['tokens']} tok, "
                    f"{r['forward_calls']} passes, {r['iterations']} it"
                )
        table: dict[str, Any] = {str(k): _leaves_summary(runs[k]) for k in ks}
        _add_ratios(table, ks)
        out[name] = table
    return out


def run_concurrency(
    engine: Any, levels: list[int], n_tokens: int, rubric: str = "positive", k: int = 1
) -> dict[str, Any]:
    """Aggregate committed tokens/s of N concurrent ``fast`` searches, batching on and off.

    Each search has its own prompt; with batching off their passes take turns (the
    scheduler runs every pass alone), so the two runs of a request read identical
    numbers, and the on/off comparison of its tokens measures what batching changes.
    """
    from shared_core import RainConfig

    cfg = RainConfig.fast(seed=SEED, max_new_tokens=n_tokens, leaves_per_round=k)
    prompts = [p for group in PROMPTS.values() for p in group]
    scheduler = engine.backend.scheduler
    out: dict[str, Any] = {"rubric": rubric, "max_new_tokens": n_tokens, "leaves_per_round": k}
    alone: dict[str, list[int]] = {}
    for enabled in (False, True):
        scheduler.enabled = enabled
        key = "batching_on" if enabled else "batching_off"
        out[key] = {}
        for n in levels:
            results: list[Any] = [None] * n

            def one(i: int, results: list[Any] = results) -> None:
                results[i] = engine.generate(prompts[i], rubric=rubric, config=cfg)

            threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
            work = engine.backend.work
            calls0 = work.forward_calls
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            tokens = sum(r.completion_tokens for r in results)
            row: dict[str, Any] = {
                "searches": n,
                "wall_s": wall,
                "tokens": tokens,
                "tokens_per_s": tokens / wall if wall else None,
                "forward_passes": work.forward_calls - calls0,
            }
            if not enabled:
                for i, r in enumerate(results):
                    alone[prompts[i]] = list(r.token_ids)
            else:
                row["same_tokens_as_batching_off"] = sum(
                    list(r.token_ids) == alone.get(prompts[i]) for i, r in enumerate(results)
                )
            out[key][str(n)] = row
            _log(
                f"concurrency {key} x{n}: {tokens} tok in {wall:.1f}s ({row['tokens_per_s']:.2f}/s)"
            )
    scheduler.enabled = True
    for key in ("batching_on", "batching_off"):
        one_alone = out[key][str(levels[0])]["tokens_per_s"]
        for n in levels:
            row = out[key][str(n)]
            row["throughput_vs_first"] = _ratio(row["tokens_per_s"], one_alone)
    return out


def run_dev_positive_rate(
    engine: Any, ks: list[int], items: int, n_tokens: int, start: int = 0
) -> dict[str, Any]:
    """VADER positive rate of RAIN (paper settings) at each k on the alignment dev split."""
    from benchmarks.alignment import SENTIMENT_PROMPT, VaderJudge, load_split, wilson_ci

    judge = VaderJudge()
    openings = load_split("dev")[start : start + items]
    flags: dict[int, list[bool]] = {k: [] for k in ks}
    runs: dict[int, list[dict[str, Any]]] = {k: [] for k in ks}
    for i, item in enumerate(openings):
        prompt = SENTIMENT_PROMPT.format(opening=item["opening"])
        for k in ks:
            cfg = _paper_config(seed=SEED, max_new_tokens=n_tokens, leaves_per_round=k)
            run = _run_rain(engine, prompt, "positive", cfg)
            runs[k].append(run)
            flags[k].append(judge.is_positive(run["text"]))
        _log(f"dev #{i} ({item['id']}): " + ", ".join(f"k={k} {flags[k][-1]}" for k in ks))
    out: dict[str, Any] = {
        "split": "dev",
        "items": [o["id"] for o in openings],
        "sample": f"{len(openings)} of {len(load_split('dev'))} dev openings (CPU budget)",
        "max_new_tokens": n_tokens,
        "preset": "paper",
    }
    base = flags[ks[0]]
    for k in ks:
        hits = sum(flags[k])
        out[str(k)] = {
            "positive_rate": hits / len(flags[k]) if flags[k] else None,
            "wilson90": wilson_ci(hits, len(flags[k])),
            "points_vs_first": 100.0 * (hits - sum(base)) / len(base) if base else None,
            "same_verdict_as_first": sum(a == b for a, b in zip(flags[k], base, strict=True)),
            # The same runs' work (passes and wall time per committed token, as
            # :func:`run_leaves` reports them), so quality and speed come from one run.
            "forward_passes": _sum(runs[k], "forward_calls"),
            **_leaves_summary(runs[k]),
        }
    _add_ratios(out, ks)
    return out


def run_batching(args: argparse.Namespace, result: dict[str, Any] | None) -> dict[str, Any]:
    """The batching section; adds its keys to ``result`` (or to a fresh one)."""
    import torch

    from shared_core import RainEngine

    out = dict(result or {})
    t0 = time.perf_counter()
    engine = RainEngine.from_default()
    engine.generate("Hello.", rubric="positive", max_new_tokens=1, seed=SEED)  # warm-up
    out.setdefault("model", engine.model_name)
    batching: dict[str, Any] = {
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_and_warmup_s": time.perf_counter() - t0,
        "note": "timings on a shared 2-core machine: ratios come from runs side by side",
    }
    if args.leaves:
        out["leaves_per_round"] = run_leaves(
            engine, args.leaves, args.leaves_prompts, args.leaves_tokens
        )
    if args.concurrency:
        out["concurrency"] = run_concurrency(engine, args.concurrency, args.concurrency_tokens)
    if args.dev_items:
        out["leaves_dev_positive_rate"] = run_dev_positive_rate(
            engine,
            args.dev_ks or args.leaves or [1, 4],
            args.dev_items,
            args.leaves_tokens,
            args.dev_start,
        )
    out["batching_environment"] = batching
    return _rounded(out)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give integers separated by commas") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers, e.g. 1,2,4")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run (< 2 min on 2 idle cores)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="answer length per run")
    parser.add_argument("--prompts", type=int, default=None, help="prompts per rubric")
    parser.add_argument(
        "--long-tokens", type=int, default=None, help="memory-run answer length (0: skip)"
    )
    batching = parser.add_argument_group("batching (issue 16)")
    batching.add_argument("--leaves", type=_int_list, help="k values, e.g. 1,2,4,8")
    batching.add_argument("--leaves-prompts", type=int, default=2, help="prompts per k")
    batching.add_argument("--leaves-tokens", type=int, default=12, help="answer length per k")
    batching.add_argument("--concurrency", type=_int_list, help="searches at once, e.g. 1,2,4")
    batching.add_argument("--concurrency-tokens", type=int, default=16)
    batching.add_argument(
        "--dev-items", type=int, default=0, help="dev openings for the positive rate at each k"
    )
    batching.add_argument("--dev-start", type=int, default=0, help="first dev opening")
    batching.add_argument(
        "--dev-ks",
        type=_int_list,
        default=None,
        help="k values of the dev run (default: --leaves or 1,4)",
    )
    batching.add_argument(
        "--batching-only",
        action="store_true",
        help="skip the measurements above; add the batching keys to the JSON at --out",
    )
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    wants_batching = bool(args.leaves or args.concurrency or args.dev_items)
    if args.batching_only and not wants_batching:
        parser.error("--batching-only needs --leaves, --concurrency or --dev-items")

    def write(result: dict[str, Any]) -> str:
        text = json.dumps(result, indent=2, ensure_ascii=False)
        args.out.write_text(text + "\n", encoding="utf-8")
        return text

    if args.batching_only:
        previous = json.loads(args.out.read_text(encoding="utf-8")) if args.out.exists() else None
        print(write(run_batching(args, previous)))
        return 0
    result = run_benchmark(
        "quick" if args.quick else "full",
        max_new_tokens=args.max_new_tokens,
        prompts=args.prompts,
        long_tokens=args.long_tokens,
        on_progress=write,
    )
    if wants_batching:
        result = run_batching(args, result)
    print(write(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
