"""Served judge vs in-process judge on the same GGUF, over the full bundled labelled sets.

Issue 14's target: hard verdicts >= 90 % equal and soft scores within 0.1. Starts
``llama-server`` (``RAIN_LLAMA_SERVER``, built by ``scripts/llama_server.sh``) with the
embedded SmolLM2 GGUF and judges every labelled row of each rubric with both engines.

    RAIN_LLAMA_SERVER=$(bash scripts/llama_server.sh) .venv/bin/python -m benchmarks.judge_agreement
"""

from __future__ import annotations

import json
import time
from typing import Any

from shared_core import RainEngine, load_engine
from shared_core.judge_check import labelled_set
from shared_core.models.served import ServedModel
from shared_core.models.served_launch import LlamaServer


def hard_and_soft(
    engine: RainEngine, rubric: str, rows: list[dict[str, Any]]
) -> list[tuple[float, float]]:
    """Per row: the hard verdict (mean sign over option orders) and the soft score."""
    out = []
    for row in rows:
        j = engine.self_evaluate(
            [{"role": "user", "content": row["prompt"]}], row["response"], rubric=rubric
        )
        pairs = list(zip(j.details["p_good"], j.details["p_bad"], strict=True))
        hard = sum((g > b) - (g < b) for g, b in pairs) / len(pairs)
        soft = sum((g - b) / (g + b) for g, b in pairs) / len(pairs)
        out.append((hard, soft))
    return out


def main() -> None:
    local = load_engine()
    report: dict[str, Any] = {}
    with LlamaServer(parallel=4, ctx=8192) as server:
        served = RainEngine(backend=ServedModel(server.url))
        for rubric in ("positive", "harmless", "truthful"):
            rows = labelled_set(rubric)
            t0 = time.perf_counter()
            here, there = hard_and_soft(local, rubric, rows), hard_and_soft(served, rubric, rows)
            pairs = list(zip(here, there, strict=True))
            gaps = [abs(a[1] - b[1]) for a, b in pairs]
            report[rubric] = {
                "rows": len(rows),
                "hard_equal": round(sum(a[0] == b[0] for a, b in pairs) / len(rows), 4),
                "soft_gap_max": round(max(gaps), 4),
                "soft_gap_mean": round(sum(gaps) / len(gaps), 4),
                "seconds": round(time.perf_counter() - t0, 1),
            }
    report["target_met"] = all(
        r["hard_equal"] >= 0.9 and r["soft_gap_max"] <= 0.1
        for k, r in report.items()
        if isinstance(r, dict)
    )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
