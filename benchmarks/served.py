"""Served benchmark: RAIN through a model server against RAIN in process.

    python -m benchmarks.served [--base-url URL] [--prompts N] [--max-new-tokens N]

Without ``--base-url`` it starts ``$RAIN_LLAMA_SERVER`` (scripts/llama_server.sh) with the
embedded SmolLM2 GGUF and ``--parallel 8``. It reports, as JSON on stdout and in
``benchmarks/results/served.json``:

- in-process vs served wall time of RAIN and vanilla on the same model and prompts
  (in-process only when no ``--base-url``: the same GGUF, de-quantized by transformers);
- the RAIN/vanilla time ratio through the server and in process;
- HTTP requests and prompt tokens per committed token, and the share of prompt tokens
  the server read from its prefix cache (llama.cpp ``timings.cache_n``);
- aggregate committed tokens/s with 1, 4 and 8 concurrent searches on one server, with
  the prompt tokens the server computed per committed token and (local server) its CPU
  time; the server's flags and the machine's load average are recorded with them.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

PROMPTS = [
    "Write one sentence about a rainy day.",
    "Describe your favourite meal in one sentence.",
    "Say something about the sea.",
    "Write one sentence about trains.",
    "Describe a quiet morning.",
    "Write one sentence about autumn.",
    "Say something about music.",
    "Describe a city at night.",
]
OUT = Path(__file__).resolve().parent / "results" / "served.json"


def _config(max_new_tokens: int) -> dict[str, Any]:
    return {
        "num_candidates": 2,
        "T": 4,
        "min_new_iterations": 2,
        "T_m": 2,
        "max_new_tokens": max_new_tokens,
        "simulation_max_tokens": 4,
        "similarity_update": False,
        "dynamic_addition": False,
    }


WARMUP_PROMPT = "Say hello."
"""Not one of :data:`PROMPTS`: a warm-up caches what every call shares (the judge's rubric
preamble, the server's slots; in process, the rubric preamble and the kernels), not the
timed prompts themselves."""


def _warm_up(engine: Any, config: dict[str, Any]) -> float:
    """One untimed RAIN call and one vanilla call, as the speed benchmark warms up: a
    server in use, like a loaded model, has computed its rubric preamble already."""
    t0 = time.perf_counter()
    engine.generate(WARMUP_PROMPT, config={**config, "max_new_tokens": 2})
    engine.vanilla(WARMUP_PROMPT, config={**config, "max_new_tokens": 2})
    return round(time.perf_counter() - t0, 2)


def _run_set(engine: Any, prompts: list[str], config: dict[str, Any]) -> dict[str, Any]:
    """Vanilla, then RAIN, on the same prompts, after a warm-up on another prompt.

    Vanilla goes first: a server keeps the prompts it has read (llama.cpp
    ``cache_prompt``), so a vanilla call after RAIN's on the same prompt would find its
    prompt read already, which a user's new prompt never is (in process, nothing but
    the rubric preamble is kept between calls). RAIN's first request then finds its
    prompt read by vanilla: ``rain_prompt_tokens_cached_from_vanilla`` says how many
    prompt tokens that saved it (at most the prompt, once per call).
    """
    warmup_s = _warm_up(engine, config)
    traffic = getattr(engine.backend, "traffic", None)  # served backends only
    t0 = time.perf_counter()
    for p in prompts:
        engine.vanilla(p, config=config)
    vanilla_s = time.perf_counter() - t0
    before = traffic.to_dict() if traffic is not None else {}
    t0 = time.perf_counter()
    tokens = 0
    for p in prompts:
        tokens += engine.generate(p, config=config).completion_tokens
    rain_s = time.perf_counter() - t0
    out: dict[str, Any] = {
        "rain_s": round(rain_s, 2),
        "vanilla_s": round(vanilla_s, 2),
        "rain_over_vanilla": round(rain_s / vanilla_s, 2) if vanilla_s else None,
        "committed_tokens": tokens,
        "warmup_s": warmup_s,
    }
    if traffic is not None:
        # The timed RAIN calls only (not the warm-up, not vanilla).
        rain = _since(traffic, before)
        committed = max(1, tokens)
        prompt, cached = rain["prompt_tokens"], rain["cached_tokens"]
        out["http_requests_per_committed_token"] = round(rain["requests"] / committed, 1)
        out["prompt_tokens_per_committed_token"] = round(prompt / committed, 1)
        out["cached_prompt_share"] = round(cached / prompt, 3) if prompt else None
        # The prompts' own length: the most the vanilla calls before can have saved.
        out["rain_prompt_tokens_cached_from_vanilla"] = sum(
            len(engine.prompt_ids(p)) for p in prompts
        )
    return out


def _since(traffic: Any, before: dict[str, int]) -> dict[str, int]:
    """The server traffic since ``before`` (a ``Traffic.to_dict()``)."""
    return {k: v - before[k] for k, v in traffic.to_dict().items()}


def _cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of a local process (Linux ``/proc``), else None."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _concurrent(
    engine: Any, k: int, config: dict[str, Any], server_pid: int | None = None
) -> dict[str, Any]:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(k)]
    traffic = engine.backend.traffic
    before = traffic.to_dict()
    cpu0 = _cpu_seconds(server_pid)
    counts: list[int] = [0] * k
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            counts[i] = engine.generate(prompts[i], config=config, seed=i).completion_tokens
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(k)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    cpu1 = _cpu_seconds(server_pid)
    if errors:
        raise errors[0]
    work = _since(traffic, before)
    prompt, cached = work["prompt_tokens"], work["cached_tokens"]
    committed = max(1, sum(counts))
    out: dict[str, Any] = {
        "searches": k,
        "wall_s": round(wall, 2),
        "committed_tokens": sum(counts),
        "tokens_per_s": round(sum(counts) / wall, 3),
        "http_requests": work["requests"],
        # Prompt tokens the server computed (not read from its cache): the work that
        # grows when concurrent searches take each other's slots.
        "prompt_tokens_processed_per_committed_token": round((prompt - cached) / committed, 1),
    }
    if cpu0 is not None and cpu1 is not None:
        # The server's CPU time over the wall time: near 1 with -t 1, it is compute-bound.
        out["server_cpu_s"] = round(cpu1 - cpu0, 2)
        out["server_busy"] = round((cpu1 - cpu0) / wall, 2)
        out["server_cpu_s_per_committed_token"] = round((cpu1 - cpu0) / committed, 3)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from shared_core import RainEngine, load_engine
    from shared_core.models.served import ServedModel
    from shared_core.models.served_launch import LlamaServer

    parser = argparse.ArgumentParser(prog="python -m benchmarks.served")
    parser.add_argument("--base-url", help="an external server (default: start llama-server)")
    parser.add_argument("--model", help="the served model name (with --base-url)")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    config = _config(args.max_new_tokens)
    prompts = PROMPTS[: args.prompts]
    server = None
    if args.base_url is None:
        server = LlamaServer(parallel=8, ctx=8192 * 2).start()
    url = args.base_url or server.url  # type: ignore[union-attr]
    report: dict[str, Any] = {"base_url": url, "config": config, "prompts": len(prompts)}
    if server is not None:
        report["server_flags"] = server.flags()
    # The conditions the figures were taken in: cores, and the load from other work.
    report["machine"] = {"cpus": os.cpu_count(), "load_avg_1m_at_start": os.getloadavg()[0]}
    try:
        backend = ServedModel(url, args.model)
        served = RainEngine(backend=backend, rubric="positive", config=config)
        report["model"] = backend.name
        report["served"] = _run_set(served, prompts, config)
        if server is not None:
            local = load_engine()
            report["in_process"] = _run_set(local, prompts, config)
            report["served_over_in_process_rain_time"] = round(
                report["served"]["rain_s"] / report["in_process"]["rain_s"], 2
            )
        pid = server.proc.pid if server is not None and server.proc is not None else None
        conc = [_concurrent(served, k, config, pid) for k in (1, 4, 8)]
        report["label_top_n"] = getattr(backend.dialect, "label_top_n", None)
        report["concurrency"] = conc
        report["throughput_8_over_1"] = round(conc[2]["tokens_per_s"] / conc[0]["tokens_per_s"], 2)
        report["machine"]["load_avg_1m_at_end"] = os.getloadavg()[0]
        backend.close()
    finally:
        if server is not None:
            server.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
