"""The engine, ChatRain and RainLLM run end to end with ``torch`` and ``transformers`` blocked.

A fresh interpreter installs an import hook that refuses torch, transformers and
sentence-transformers, then runs RAIN on the scripted backend (the model
protocol in plain Python) with the real self-evaluation judge, vanilla decoding,
and both adapters, sync, streaming and async. The script fails on any import of
a blocked package; the test checks what it printed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys

    BLOCKED = ("torch", "transformers", "sentence_transformers")

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Block())

    import shared_core
    from shared_core import RainEngine, ScriptedLM
    from shared_core.models.scripted import choice_table

    imported_torch_with_core = "torch" in sys.modules
    answers = choice_table({"bad.": 0.7, "good.": 0.3})

    def next_fn(context):
        if "</response>" in context:  # the judge's prompt: "yes" for a good response
            response = context.rsplit("<response>\\n", 1)[-1].split("\\n</response>", 1)[0]
            return {" y": 1.0} if response.startswith("g") else {" n": 1.0}
        return answers(context)

    rubric = {
        "name": "good-words",
        "instruction": "Judge the reply.",
        "question": "Is the reply good?",
        "good": {"label": "yes", "text": "The reply is good."},
        "bad": {"label": "no", "text": "The reply is bad."},
    }
    config = {  # the paper's search: its 1-token sets at the root always hold "good"
        "preset": "paper", "num_candidates": 3, "T": 8, "min_new_iterations": 4, "T_m": 3,
        "max_new_tokens": 8,
        "similarity_update": False, "dynamic_addition": False,
    }
    lm = ScriptedLM(next_fn)
    engine = RainEngine(backend=lm, rubric=rubric, config=config)
    out = {}
    result = engine.generate("say something")
    out["rain"] = [result.text, result.finish_reason, result.stats.overrides]
    out["stream"] = "".join(c.text for c in engine.stream("say something"))
    out["vanilla"] = engine.vanilla("say something").text
    out["judge"] = [
        engine.self_evaluate("say something", "good."),
        engine.self_evaluate("say something", "bad."),
    ]
    out["judge"] = [j.score for j in out["judge"]]

    from langchain_rain import ChatRain

    chat = ChatRain(engine=engine, rubric=rubric, rain_config=config)
    out["chat"] = chat.invoke("say something").content
    out["chat_stream"] = "".join(str(c.content) for c in chat.stream("say something"))
    out["chat_async"] = asyncio.run(chat.ainvoke("say something")).content

    from llama_index.core.llms import ChatMessage
    from llama_index_rain import RainLLM

    llm = RainLLM(engine=engine, rubric=rubric, config=config)
    out["llm"] = llm.complete("say something").text
    out["llm_chat"] = llm.chat([ChatMessage(role="user", content="say something")]).message.content
    out["llm_stream"] = "".join(r.delta for r in llm.stream_complete("say something"))

    out["pins_left"] = len(lm.pinned_prefixes())  # the rubric's preamble, kept per model
    out["torch_with_core"] = imported_torch_with_core
    out["blocked_loaded"] = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print("RESULT " + json.dumps(out))
    """
)


def test_engine_and_adapters_run_with_torch_and_transformers_blocked() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    out = json.loads(line[len("RESULT ") :])
    assert out["torch_with_core"] is False and out["blocked_loaded"] == []
    # The model prefers "bad." 70/30; the judge says "no" to it: RAIN rewinds.
    assert out["vanilla"] == "bad."
    assert out["rain"][:2] == ["good.", "stop"] and out["rain"][2] >= 1
    assert out["stream"] == "good."
    assert out["judge"] == [1.0, -1.0]
    assert out["chat"] == out["chat_stream"] == out["chat_async"] == "good."
    assert out["llm"] == out["llm_chat"] == out["llm_stream"] == "good."
    assert out["pins_left"] == 1, "every request released its cached prefixes"
