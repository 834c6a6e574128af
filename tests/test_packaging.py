"""The wheel: it builds, installs cleanly into a fresh venv, and each extra brings one framework.

Offline and quick (well under 2 minutes): the wheel is built without build
isolation (the venv's setuptools), installed with ``--no-deps --no-index`` into a
fresh venv that does not see this one's packages, and its metadata is read to
check what each extra requires. Whether each adapter imports with only its own
framework is checked on the installed copy, with the other framework's imports
blocked.
"""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[1]
LANGCHAIN = {"langchain-core", "langchain", "langgraph"}
LLAMA_INDEX = {"llama-index-core", "llama-index"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(ROOT)],
        check=True,
        timeout=120,
    )
    (built,) = out.glob("rain-*.whl")
    return built


def _requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(zf.read(name).decode())
    return [Requirement(r) for r in meta.get_all("Requires-Dist") or []]


def _needs(reqs: list[Requirement], *extras: str) -> set[str]:
    """Distribution names installed by ``rain[extras]`` (direct requirements)."""
    envs = [{"extra": ""}] + [{"extra": e} for e in extras]
    return {
        r.name.lower().replace("_", "-")
        for r in reqs
        if r.marker is None or any(r.marker.evaluate(env) for env in envs)
    }


def test_each_extra_brings_only_its_framework(wheel: Path) -> None:
    reqs = _requirements(wheel)
    base = _needs(reqs)
    assert not base & (LANGCHAIN | LLAMA_INDEX), "a framework is a base dependency"
    assert "langchain-core" in _needs(reqs, "langchain")
    assert not _needs(reqs, "langchain") & LLAMA_INDEX
    assert "llama-index-core" in _needs(reqs, "llamaindex")
    assert not _needs(reqs, "llamaindex") & LANGCHAIN
    assert {"langchain-core", "llama-index-core"} <= _needs(reqs, "all")
    # torch is a range that the CPU pin of scripts/setup.sh satisfies, not the pin itself.
    (torch,) = [r for r in reqs if r.name == "torch"]
    assert str(torch.specifier) != "==2.13.0" and torch.specifier.contains(Version("2.13.0"))
    assert "torch==2.13.0" in (ROOT / "scripts" / "setup.sh").read_text()
    # The set-up script installs everything the tests import.
    assert '".[all,dev]"' in (ROOT / "scripts" / "setup.sh").read_text()


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel installed into a fresh venv (no access to this venv's packages)."""
    env = tmp_path_factory.mktemp("fresh") / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(env)
    py = env / "bin" / "python"
    subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        timeout=120,
    )
    (site,) = (env / "lib").glob("python3*/site-packages")
    return site


def test_the_wheel_installs_cleanly(installed: Path) -> None:
    for package in ("shared_core", "langchain_rain", "llama_index_rain"):
        assert (installed / package / "__init__.py").is_file()
        assert (installed / package / "py.typed").is_file()
    assert (installed / "shared_core" / "models" / "protocol.py").is_file()
    assert (installed.parents[2] / "bin" / "rain").is_file()  # the console script
    assert not (installed / "tests").exists()


_BLOCKER = """
import sys
class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)")
        return None
sys.meta_path.insert(0, _Blocked())
import importlib
for module in {modules!r}:
    mod = importlib.import_module(module)
    assert mod.__file__.startswith({site!r}), (module, mod.__file__)
print("ok")
"""


@pytest.mark.parametrize(
    ("blocked", "modules"),
    [
        (
            ["langchain", "langchain_core", "llama_index"],
            ["shared_core", "shared_core.settings", "shared_core.bridge", "shared_core.cli"],
        ),
        (["llama_index"], ["langchain_rain", "shared_core.tools"]),
        (["langchain", "langchain_core"], ["llama_index_rain"]),
    ],
    ids=["shared_core-alone", "langchain-only", "llamaindex-only"],
)
def test_installed_packages_import_with_one_framework(
    installed: Path, tmp_path: Path, blocked: list[str], modules: list[str]
) -> None:
    # This venv's interpreter (for torch, pydantic, ...) with the installed wheel first
    # on the path, run from an empty folder so the checkout is not importable.
    code = _BLOCKER.format(blocked=blocked, modules=modules, site=str(installed))
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={"PYTHONPATH": str(installed), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")
