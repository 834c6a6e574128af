"""The ``rain`` command line and the trace plot, on the tiny random model (seconds)."""

from __future__ import annotations

import _thread
import io
import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from shared_core import RainError
from shared_core.cli import _Progress, main
from shared_core.plotting import plot_trace, trace_of

# A small search (tests/conftest.py's quick_config) spelled as command-line settings.
QUICK = [
    "--max-new-tokens",
    "8",
    "--set",
    "num_candidates=3",
    "--set",
    "T=4",
    "--set",
    "min_new_iterations=2",
    "--set",
    "T_m=2",
    "--set",
    "simulation_max_tokens=4",
    "--set",
    "similarity_update=false",
    "--set",
    "dynamic_addition=false",
]


def run_cli(args, factory=None):
    out, err = io.StringIO(), io.StringIO()
    code = main(args, engine_factory=factory, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


class _Factory:
    """An engine factory that hands out the tiny engine and records what it was asked for."""

    def __init__(self, engine):
        self.engine = engine
        self.seen: list[tuple[str | None, str | None]] = []

    def __call__(self, model, gguf_file):
        self.seen.append((model, gguf_file))
        return self.engine


@pytest.fixture
def factory(tiny_engine):
    return _Factory(tiny_engine)


def test_answers_a_prompt(factory):
    code, out, err = run_cli(["Say hello.", *QUICK], factory)
    assert code == 0, err
    assert out.endswith("\n")  # the tiny random model's answer may be blank
    assert "iterations" in err and "self-eval" in err
    assert factory.seen == [(None, None)]


def test_model_and_gguf_reach_the_factory(factory):
    code, _, err = run_cli(["Hi", "--model", "some/id", "--gguf-file", "m.gguf", *QUICK], factory)
    assert code == 0, err
    assert factory.seen == [("some/id", "m.gguf")]


def test_compare_trace_json_and_plot(factory, tmp_path):
    trace_file, plot_file = tmp_path / "trace.json", tmp_path / "search.png"
    args = ["Hi", "--compare", "--trace-json", str(trace_file), "--plot", str(plot_file)]
    code, out, err = run_cli([*args, *QUICK], factory)
    assert code == 0, err
    assert "--- vanilla (greedy)" in out and "--- RAIN (positive)" in out
    data = json.loads(trace_file.read_text())
    assert data["vanilla"]["mode"] == "vanilla"
    assert -1.0 <= data["vanilla"]["self_evaluation"] <= 1.0
    assert data["rain"]["mode"] == "rain" and data["rain"]["trace"]
    assert data["rain"]["stats"]["commits"] == len(data["rain"]["trace"])
    assert plot_file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trace_json_to_stdout_is_pure_json(factory):
    code, out, _ = run_cli(["Hi", "--trace-json", "-", "--fast", *QUICK], factory)
    assert code == 0
    data = json.loads(out)
    assert data["rubric"] == "positive" and "trace" in data


def test_rubric_from_json_file(factory, tmp_path):
    rubric = tmp_path / "rubric.json"
    rubric.write_text(json.dumps({"preset": "positive", "name": "upbeat"}))
    code, out, err = run_cli(["Hi", "--rubric", str(rubric), "--trace-json", "-", *QUICK], factory)
    assert code == 0, err
    assert json.loads(out)["rubric"] == "upbeat"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["   "], "prompt is empty"),
        (["Hi", "--rubric", "kind"], "unknown rubric 'kind'"),
        (["Hi", "--rubric", "missing.json"], "not found"),
        (["Hi", "--set", "T"], "KEY=VALUE"),
        (["Hi", "--set", "bogus=1"], "unknown setting"),
        (["Hi", "--set", "T_m=9", "--set", "T=3"], "T_m (9) must not exceed T (3)"),
        (["Hi", "--plot", "/no/such/folder/x.png"], "does not exist"),
        (["Hi", "--gguf-file", "model.gguf"], "--gguf-file needs --model"),
    ],
)
def test_bad_input_exits_2_with_a_message(args, message):
    # No factory is reached: every case fails before a model is loaded.
    code, out, err = run_cli(args)
    assert code == 2
    assert message in err and err.startswith("rain: error:")
    assert "Traceback" not in err and out == ""


def test_plot_without_matplotlib_fails_before_any_work(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name)
    )
    code, _, err = run_cli(["Hi", "--plot", str(tmp_path / "p.png")])
    assert code == 2 and "needs matplotlib" in err


def test_a_model_that_cannot_load_exits_2(tmp_path):
    code, _, err = run_cli(["Hi", "--model", str(tmp_path / "nothing-here"), "--quiet"])
    assert code == 2
    assert "could not load model" in err and "Traceback" not in err


def test_malformed_option_is_argparse_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["Hi", "--max-new-tokens", "0"])
    assert exc.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err


def test_ctrl_c_cancels_the_search_cleanly(factory, monkeypatch):
    """Ctrl-C in the main thread sets the engine's cancel event; exit status 130."""
    original = _Progress.on_event
    fired = threading.Event()

    def interrupt_once(self, kind, data):
        original(self, kind, data)
        if kind == "iteration" and not fired.is_set():
            fired.set()
            _thread.interrupt_main()  # what Ctrl-C does: KeyboardInterrupt in the main thread

    monkeypatch.setattr(_Progress, "on_event", interrupt_once)
    # A process started in the background by a non-interactive shell inherits SIGINT
    # ignored, and then interrupt_main() does nothing: give it Python's own handler,
    # as a terminal would.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    long_search = ["--max-new-tokens", "200", "--set", "T=50", "--set", "min_new_iterations=50"]
    try:
        code, out, err = run_cli(["Hi", *QUICK, *long_search], factory)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert fired.is_set()
    assert code == 130
    assert "cancelled" in err and out == ""
    assert not any(t.name == "rain-search" for t in threading.enumerate())


def test_python_dash_m_entry_point():
    """``python -m shared_core`` runs the CLI: a real process, status 2, no traceback."""
    done = subprocess.run(
        [sys.executable, "-m", "shared_core", "", "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 2
    assert "prompt is empty" in done.stderr and "Traceback" not in done.stderr


# --- plot_trace --------------------------------------------------------------------------------


def _commit(index, chosen, greedy, iterations):
    cands = [
        {"text": t, "token_ids": [i], "p": 0.5, "n": n, "v": v, "greedy": i == greedy}
        for i, (t, n, v) in enumerate([(" good", 5.0, 0.8), (" bad", 2.0, -0.6), (" meh", 0, 0)])
    ]
    return {
        "index": index,
        "text": cands[chosen]["text"],
        "token_ids": [chosen],
        "iterations": iterations,
        "visits": cands[chosen]["n"],
        "value": cands[chosen]["v"],
        "greedy_agrees": chosen == greedy,
        "differs_from_greedy": chosen != greedy,
        "candidates": cands,
    }


def test_plot_trace_from_dicts(tmp_path):
    trace = [_commit(0, 0, 0, 4), _commit(1, 0, 1, 7)]
    path = tmp_path / "t.svg"
    fig = plot_trace({"text": "x", "trace": trace}, path=path)
    _, bottom = fig.axes
    assert [int(p.get_height()) for p in bottom.patches] == [4, 7]  # type: ignore[attr-defined]
    assert "1 differ from greedy" in fig.get_suptitle()
    assert path.read_text().lstrip().startswith("<?xml")


def test_plot_trace_from_a_real_result(tiny_engine, quick_config):
    result = tiny_engine.generate("Hi", rubric="positive", config=quick_config)
    fig = plot_trace(result, title="tiny")
    assert fig.get_suptitle() == "tiny"
    assert len(fig.axes[1].patches) == len(result.trace)
    assert trace_of(result.to_dict()) == trace_of(result.trace)


@pytest.mark.parametrize("bad", [[], {"trace": []}, 42, "text"])
def test_plot_trace_rejects_what_it_cannot_draw(bad):
    with pytest.raises(RainError):
        plot_trace(bad)
