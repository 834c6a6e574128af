"""``rain``: answer one prompt with RAIN from the command line.

    rain "Write one sentence about a rainy day." --rubric positive --fast --compare

The answer goes to stdout; a progress bar and a one-line summary go to stderr.
``--trace-json FILE`` writes the full result (stats and per-commit trace),
``--plot FILE`` draws the search (needs matplotlib). Bad input exits with
status 2 and a one-line message; Ctrl-C cancels the search cleanly (130).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from shared_core.config import RainConfig
from shared_core.engine import RainEngine, RainResult, load_engine
from shared_core.errors import RainError
from shared_core.rubric import PRESETS, RubricSpec, get_rubric
from shared_core.search import RainCancelled
from shared_core.settings import CLI, resolve

__all__ = ["EngineFactory", "build_parser", "main"]

EngineFactory = Callable[[str | None, str | None], RainEngine]
"""``(model, gguf_file) -> RainEngine``; tests pass one that builds a tiny model."""

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # the shell's convention for SIGINT

_POLL_S = 0.1


class _UsageError(Exception):
    """Bad command-line input: reported in one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rain",
        description=(
            "Answer a prompt with RAIN (Rewindable Auto-regressive INference): the model "
            "searches over its own continuations and keeps those its self-evaluation "
            "prefers under the rubric."
        ),
        epilog=(
            "The embedded SmolLM2-135M-Instruct judges sentiment ('positive') well but "
            "not harm; use --model with a larger instruct model for 'harmless'/'truthful'."
        ),
    )
    parser.add_argument("prompt", help="the user's prompt; '-' reads it from stdin")
    parser.add_argument(
        "--rubric",
        default="positive",
        help=f"a preset ({', '.join(sorted(PRESETS))}) or a JSON file holding a rubric "
        "dict (default: positive)",
    )
    parser.add_argument("--system", help="an optional system message")
    parser.add_argument(
        "--model",
        help="a Hugging Face model id (already cached) or a local folder; "
        "default: the embedded SmolLM2-135M-Instruct",
    )
    parser.add_argument("--gguf-file", help="GGUF file name inside --model's folder or repo")
    parser.add_argument(
        "--base-url",
        help="a served model (llama-server, vLLM, SGLang) at this URL; --model is then its "
        "served name (default: the one it serves)",
    )
    parser.add_argument("--api-key", help="the server's API key (with --base-url)")
    parser.add_argument("--dialect", choices=["llamacpp", "vllm", "sglang"],
                        help="the server's API (default: detected)")
    parser.add_argument(
        "--fast", action="store_true", help="the latency preset (RainConfig.fast())"
    )
    parser.add_argument(
        "--best-of",
        type=_positive_int,
        metavar="N",
        help="no search: sample N answers and keep the one the rubric's self-evaluation "
        "scores highest (the best-of-N baseline; RainConfig.best_of)",
    )
    parser.add_argument("--max-new-tokens", type=_positive_int, metavar="N")
    parser.add_argument("--seed", type=int, help="seed of every random draw (default 0)")
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any RainConfig field, e.g. --set T=20 --set similarity_update=false "
        "(VALUE is read as JSON, else as a string)",
    )
    parser.add_argument(
        "--compare", action="store_true", help="also answer with vanilla (greedy) decoding"
    )
    parser.add_argument(
        "--trace-json",
        metavar="FILE",
        help="write the result with its per-commit trace as JSON ('-': stdout)",
    )
    parser.add_argument("--plot", metavar="FILE", help="save a picture of the search (PNG, SVG)")
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bar and no summary on stderr"
    )
    return parser


def main(
    argv: Sequence[str] | None = None,
    *,
    engine_factory: EngineFactory | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
) -> int:
    """Run the command line; returns the exit status (the console script exits with it)."""
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["judge-check"]:  # a subcommand; any other first word is a prompt
        from shared_core.judge_check import main as judge_check_main

        return judge_check_main(argv[1:], stdout=out, stderr=err)
    args = build_parser().parse_args(argv)  # argparse exits 2 on malformed options
    try:
        return _run(args, engine_factory or _load, out, err)
    except _UsageError as exc:
        err.write(f"rain: error: {exc}\n")
        return EXIT_USAGE
    except RainError as exc:  # invalid config, rubric, prompt, or a model that won't load
        err.write(f"rain: error: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:  # interrupted outside the search (e.g. while loading)
        err.write("rain: interrupted\n")
        return EXIT_INTERRUPTED


def _run(args: argparse.Namespace, factory: EngineFactory, out: IO[str], err: IO[str]) -> int:
    if args.gguf_file is not None and args.model is None:
        raise _UsageError("--gguf-file needs --model (the folder or repo that holds the file)")
    prompt = _read_prompt(args.prompt)
    rubric = _read_rubric(args.rubric)
    config = _read_config(args)
    for name in ("trace_json", "plot"):
        _check_writable(getattr(args, name), f"--{name.replace('_', '-')}")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise _UsageError("--plot needs matplotlib: pip install matplotlib (or the dev extra)")
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    messages.append({"role": "user", "content": prompt})

    if not args.quiet:
        err.write(f"rain: loading {args.model or 'the embedded SmolLM2-135M-Instruct'} ...\n")
    if args.base_url:
        if args.gguf_file:
            raise _UsageError("--gguf-file is for a local model; drop it with --base-url")
        from shared_core.judge_check import served_engine

        engine = served_engine(
            args.base_url, args.model, api_key=args.api_key, dialect=args.dialect
        )
    elif args.api_key or args.dialect:
        raise _UsageError("--api-key and --dialect are for a served model; add --base-url")
    else:
        engine = factory(args.model, args.gguf_file)
    engine.prompt_ids(messages)  # validate the prompt (length, roles) before any work

    vanilla: RainResult | None = None
    if args.compare:
        vanilla = engine.vanilla(messages, config=config)
    result = _generate(engine, messages, rubric, config, quiet=args.quiet, err=err)
    if result is None:
        return EXIT_INTERRUPTED

    payload: dict[str, Any] = result.to_dict()
    if vanilla is not None:
        judged = engine.self_evaluate(messages, vanilla.text, rubric=rubric)
        payload = {"rain": payload, "vanilla": vanilla.to_dict()}
        payload["vanilla"]["self_evaluation"] = judged.score
    json_to_stdout = args.trace_json == "-"
    if args.trace_json and not json_to_stdout:
        Path(args.trace_json).write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    if args.plot:
        from shared_core.plotting import plot_trace

        plot_trace(result, path=args.plot)

    if json_to_stdout:
        out.write(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    elif vanilla is not None:
        vscore = payload["vanilla"]["self_evaluation"]
        out.write(f"--- vanilla (greedy)  {vanilla.elapsed_s:.1f} s  self-eval {vscore:+.2f}\n")
        out.write(vanilla.text.strip() + "\n")
        out.write(f"--- RAIN ({result.rubric})  {_summary(result)}\n")
        out.write(result.text.strip() + "\n")
    else:
        out.write(result.text.strip() + "\n")
    if not args.quiet and vanilla is None and not json_to_stdout:
        err.write(f"rain: {_summary(result)}\n")
    if not args.quiet:
        for name, path in (("trace", args.trace_json), ("plot", args.plot)):
            if path and path != "-":
                err.write(f"rain: {name} written to {path}\n")
    return EXIT_OK


def _generate(
    engine: RainEngine,
    messages: list[dict[str, str]],
    rubric: RubricSpec,
    config: RainConfig,
    *,
    quiet: bool,
    err: IO[str],
) -> RainResult | None:
    """Run the search in a worker thread so Ctrl-C can set the engine's cancel event."""
    cancel = threading.Event()
    done = threading.Event()
    box: dict[str, Any] = {}
    bar = None if quiet else _Progress(config.max_new_tokens, err)

    def on_event(kind: str, data: dict[str, Any]) -> None:
        if bar is not None:
            bar.on_event(kind, data)

    def work() -> None:
        try:
            box["result"] = engine.generate(
                messages, rubric=rubric, config=config, on_event=on_event, cancel=cancel
            )
        except BaseException as exc:  # handed to the main thread below
            box["error"] = exc
        finally:
            done.set()

    worker = threading.Thread(target=work, name="rain-search", daemon=True)
    worker.start()
    # Wait on an Event, not Thread.join: an interrupted join can mark a running thread
    # as stopped (CPython 3.11), and then the search would outlive the command.
    try:
        while not done.wait(_POLL_S):
            pass
    except KeyboardInterrupt:
        cancel.set()  # the search stops within one forward pass
        done.wait()
        worker.join()
        err.write("rain: interrupted; the search was cancelled\n")
        return None
    finally:
        if bar is not None:
            bar.close()
    error = box.get("error")
    if isinstance(error, RainCancelled):
        return None
    if error is not None:
        raise error
    result: RainResult = box["result"]
    return result


class _Progress:
    """A tqdm bar over committed tokens; iterations, rewinds and the last score as postfix."""

    def __init__(self, total: int, stream: IO[str]) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, unit="tok", desc="RAIN", file=stream, leave=False)
        self.iterations = 0
        self.rewinds = 0
        self.tokens = 0

    def on_event(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "iteration":
            self.iterations = int(data.get("iteration", self.iterations + 1))
            score = data.get("score")
            self.bar.set_postfix(
                it=self.iterations,
                rewinds=self.rewinds,
                score=f"{score:+.2f}" if isinstance(score, int | float) else "-",
                refresh=True,
            )
        elif kind == "rewind":
            self.rewinds += 1
        elif kind == "commit":
            new = len(data.get("token_ids", ()))
            self.bar.update(min(new, max(0, self.bar.total - self.tokens)))
            self.tokens += new

    def close(self) -> None:
        self.bar.close()


def _summary(result: RainResult) -> str:
    s = result.stats
    score = "n/a" if s.final_score is None else f"{s.final_score:+.2f}"
    return (
        f"{result.elapsed_s:.1f} s  self-eval {score}  {s.iterations} iterations  "
        f"{s.rewinds} rewinds  {s.overrides}/{s.commits} commits differ from greedy"
    )


def _load(model: str | None, gguf_file: str | None) -> RainEngine:
    return load_engine(model, gguf_file)


def _read_prompt(arg: str) -> str:
    text = sys.stdin.read() if arg == "-" else arg
    if not text.strip():
        raise _UsageError("the prompt is empty; pass some text, or '-' to read it from stdin")
    return text


def _read_rubric(arg: str) -> RubricSpec:
    path = Path(arg)
    if arg.lower().endswith(".json") or (path.suffix and path.is_file()):
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise _UsageError(f"rubric file {arg!r} not found") from None
        except json.JSONDecodeError as exc:
            raise _UsageError(f"rubric file {arg!r} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise _UsageError(f"rubric file {arg!r} must hold a JSON object (a rubric's fields)")
        return get_rubric(data)
    return get_rubric(arg)


def _read_config(args: argparse.Namespace) -> RainConfig:
    """The options as one config, by :mod:`shared_core.settings`' precedence: ``--fast``
    (a preset) < ``--set KEY=VALUE`` < ``--max-new-tokens`` / ``--seed``."""
    data: dict[str, Any] = {"preset": "fast"} if args.fast else {}
    for item in args.settings:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise _UsageError(f"--set expects KEY=VALUE, got {item!r}")
        data[key.strip()] = _parse_value(raw)
    call = {
        "config": data,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
        "best_of": args.best_of,
    }
    flags = {k: v for k, v in call.items() if v is not None}
    return resolve(CLI, defaults=RainConfig(), call=flags).config


def _parse_value(raw: str) -> Any:
    text = raw.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return tuple(value) if isinstance(value, list) else value


def _check_writable(path: str | None, flag: str) -> None:
    if not path or path == "-":
        return
    folder = Path(path).expanduser().resolve().parent
    if not folder.is_dir():
        raise _UsageError(f"{flag}: folder {str(folder)!r} does not exist")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
