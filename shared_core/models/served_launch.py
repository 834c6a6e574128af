"""Start and stop a local ``llama-server`` (for the served tests and ``benchmarks/served.py``).

The binary comes from ``scripts/llama_server.sh`` (built once, cached); its
path is read from ``RAIN_LLAMA_SERVER``. The default model is the embedded
SmolLM2-135M-Instruct GGUF.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO

import httpx

from shared_core.errors import RainError

__all__ = ["LlamaServer", "llama_server_binary"]

ENV = "RAIN_LLAMA_SERVER"


def llama_server_binary() -> Path:
    """The ``llama-server`` named by ``RAIN_LLAMA_SERVER`` (an error says how to build it)."""
    value = os.environ.get(ENV, "").strip()
    if not value:
        raise RainError(
            f"{ENV} is not set: build llama-server once with `bash scripts/llama_server.sh` "
            f'and export {ENV}="$(bash scripts/llama_server.sh)" (scripts/test.sh does both)'
        )
    path = Path(value)
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise RainError(
            f"{ENV}={value} is not an executable file: rebuild it with "
            "`bash scripts/llama_server.sh` and export the path it prints"
        )
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LlamaServer:
    """A ``llama-server`` process on 127.0.0.1 and a free port.

    ``parallel`` slots share ``ctx`` tokens (each request may use ``ctx / parallel``).
    ``port``: a fixed port (default: a free one), e.g. to restart a server where clients
    expect it.

    The defaults are what served concurrent searches best on the 2-core test machine
    (``benchmarks/served.py``, 8 searches on ``--parallel 8``, 10 tokens each, beside two
    other 1-thread benchmarks; llama.cpp build 11434):

    - ``threads=1``: ``-t 2`` ran 8 searches at 0.83 tok/s against 3.6 with ``-t 1``
      (and one search at 0.84 against 3.6-5.0): the server's threads wait on each other
      when the cores are shared.
    - per-slot KV (no ``--kv-unified``, the default when ``--parallel`` is given):
      unified KV clears idle slots, so 8 searches re-read 5,800 prompt tokens instead of
      3,000 (2.2 tok/s against 3.6).
    - the host prompt cache left on (``--cache-ram``, llama.cpp's default 8192 MiB): it
      restores a slot's prompt when another search took the slot; ``--cache-ram 0``
      re-read 11,600 prompt tokens (1.4 tok/s). ``--slot-prompt-similarity 0.5`` changed
      nothing measurable.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        *,
        parallel: int = 4,
        ctx: int = 8192,
        threads: int = 1,
        binary: str | os.PathLike[str] | None = None,
        extra_args: tuple[str, ...] = (),
        port: int | None = None,
    ) -> None:
        if model is None:
            from shared_core.models.hf import default_gguf_path

            model = default_gguf_path()
        self.model = Path(model)
        self.binary = Path(binary) if binary is not None else llama_server_binary()
        self.parallel = parallel
        self.ctx = ctx
        self.threads = threads
        self.extra_args = extra_args
        self.port = port or 0
        self._fixed_port = port is not None
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def flags(self) -> list[str]:
        """The command-line flags the server runs with (model and port aside)."""
        return [
            "-c", str(self.ctx),
            "--parallel", str(self.parallel),
            "-t", str(self.threads),
            "--no-webui",
            *self.extra_args,
        ]  # fmt: skip

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, n: int = 2000) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        with open(self._log.name, "rb") as f:
            data = f.read()
        return data[-n:].decode("utf-8", "replace")

    def start(self, timeout: float = 60.0) -> LlamaServer:
        if not self._fixed_port:
            self.port = _free_port()
        # Kept open for the server's lifetime (closed in stop()), so no context manager.
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115
            prefix="llama-server-", suffix=".log", delete=False
        )
        cmd = [
            str(self.binary),
            "--model", str(self.model),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            *self.flags(),
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RainError(
                    f"llama-server exited with code {self.proc.returncode} at start "
                    f"({' '.join(cmd)}):\n{self.log_tail()}"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RainError(f"llama-server was not ready within {timeout:g} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
