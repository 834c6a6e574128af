"""examples/demo.py end to end on the real SmolLM2, with very short answers."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo.py"


def _load_demo() -> Any:
    spec = importlib.util.spec_from_file_location("rain_demo", DEMO)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.integration
@pytest.mark.slow
def test_demo_prints_the_side_by_side_comparison(
    default_engine: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from llama_index.core import Settings

    demo = _load_demo()
    plot = tmp_path / "search.png"
    saved = (Settings._llm, Settings._embed_model)
    try:
        code = demo.main(["--max-new-tokens", "4", "--plot", str(plot)])
    finally:
        Settings._llm, Settings._embed_model = saved
    out = capsys.readouterr().out
    assert code == 0
    assert "Part 1 · LangChain" in out and "Part 2 · LlamaIndex" in out
    assert out.count("vanilla (greedy)") == len(demo.CHAIN_PROMPTS) + len(demo.RAG_QUERIES)
    assert "rubric=positive" in out and "rubric=truthful" in out  # switched per call
    assert "self-eval" in out and "rewinds" in out
    # The summary names which judge each figure comes from: the one the search optimised,
    # and VADER, which it did not see (the movie-review prompt is a sentiment prompt).
    assert "self-evaluation (the judge the search optimised)" in out
    assert "VADER (a judge the search did not see)" in out
    assert "cannot judge harm" in out  # the honest note about the small judge
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_bad_model_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    demo = _load_demo()
    assert demo.main(["--model", str(tmp_path / "missing"), "--skip-rag"]) == 2
    assert "could not load model" in capsys.readouterr().err


README = Path(__file__).resolve().parents[1] / "README.md"
SAMPLES = Path(__file__).resolve().parents[1] / "docs" / "samples"


def _quoted_block(section: str) -> list[str]:
    """The lines of the first ```text block after the README heading ``section``."""
    text = README.read_text(encoding="utf-8").split(f"\n## {section}\n", 1)[1]
    block = text.split("```text\n", 1)[1].split("\n```", 1)[0]
    return [x.rstrip() for x in block.splitlines() if x.strip() and x.strip() != "..."]


@pytest.mark.parametrize(("section", "sample"), [("Demo", "demo.txt"), ("Command line", "cli.txt")])
def test_readme_samples_are_lines_the_sample_script_printed(section: str, sample: str) -> None:
    # scripts/readme_samples.sh writes docs/samples/ from the current engine; the README
    # may shorten a sample ("..."), never change or invent a line of it.
    printed = [x.rstrip() for x in (SAMPLES / sample).read_text(encoding="utf-8").splitlines()]
    at = 0
    for line in _quoted_block(section):
        assert line in printed[at:], f"README {section} line not in docs/samples/{sample}: {line!r}"
        at = printed.index(line, at) + 1
