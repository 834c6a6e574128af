"""A served model: the :class:`LanguageModel` protocol over HTTP (llama.cpp, vLLM, SGLang).

The search's questions go to a model server as token ids (what the search
committed is exactly what the server reads next); the server samples, keeps
the prefix cache and batches concurrent requests. :mod:`served_dialects`
maps the questions onto each server's API.

Design:

- **I/O**: one event-loop thread per backend with an ``httpx.AsyncClient``
  (a connection pool). The protocol's methods are synchronous: each submits
  one coroutine that sends the batch's requests concurrently (the ``n``
  candidates of an expansion in one request, the two option orders of a
  judgement in one request), and waits for it. Many threads share one backend
  with no lock around model calls: their requests meet on the server, which
  batches them. ``cancel`` (a :class:`threading.Event`) cancels the
  coroutine, which closes its in-flight connections; the server stops that
  work, and the next call opens new ones.
- **Faults** become :class:`~shared_core.errors.RainServerError` naming the
  URL, what failed and the fix. Connection errors (refused, reset, the server
  gone mid-request) and HTTP 429/502/503/504 are retried with exponential
  backoff, ``retries`` times; other HTTP errors and timeouts are not (a
  timed-out request would be sent again to a server that is already behind).
  Every request has a timeout.
- **Tokenizer and chat template** are loaded locally with transformers, so
  encoding, decoding and the judge's prompt layout cost no round trip:
  ``tokenizer=`` (a tokenizer object, a local folder, a ``.gguf`` file or a
  Hugging Face cache id), else the path the server reports loading the model
  from (llama.cpp's ``/props`` ``model_path``: a local GGUF file when the
  server runs on this machine, as in the tests), else the ``model`` name. The
  tokenizer is checked against the server's ``/tokenize`` where the server has
  one, so a mismatch fails at start, not as a silently wrong search.
- **Sampling**: every sampling field is sent (llama.cpp's defaults are
  temperature 0.8, top_k 40, top_p 0.95, min_p 0.05). Greedy rows are a
  separate temperature-0 request. Clause ends and stop strings are cut here
  on the returned tokens (a server's stop strings drop or reshape the tokens
  around the match). Same seed, same rows on one server; samples differ from
  the in-process backend's (another random stream).
- **Grammar** (:class:`Grammar`, a JSON schema) is applied here, with the
  same xgrammar matcher as in process: a grammar request is decoded token by
  token from the server's raw top-N log-probs (N grows until enough allowed
  tokens are in it), masked locally. The servers' own structured output
  (llama.cpp ``json_schema``, vLLM ``structured_outputs``, SGLang
  ``json_schema``; the dialects map it) is not used by the search: it
  constrains a request's generated tokens from the start of a JSON document,
  while the search resumes mid-document (the response so far is in the
  prompt), and each server's JSON grammar admits other whitespace than ours
  (llama.cpp writes ``{\n  "a"\n:``), so a document the server began could be
  rejected when the search continues it.
- **Labels**: exact log-probs (llama.cpp top-1024 plus a ``logit_bias`` forced
  read of any label outside it; vLLM ``/generative_scoring`` or the same
  forced read; SGLang ``token_ids_logprob``); never a silent 0.
- **Prefix reuse**: the servers cache prefixes themselves (llama.cpp
  ``cache_prompt``, vLLM automatic prefix caching, SGLang RadixAttention);
  ``pin``/``unpin`` are hints they do not need, and ``reuse=False`` does not
  turn a server's cache off.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import math
import os
import threading
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx

from shared_core.errors import RainCancelled, RainInputError, RainServerError
from shared_core.models.hf_text import HFTokenizerText
from shared_core.models.protocol import (
    Continuation,
    LanguageModel,
    SampleRequest,
    TopTokens,
    TopTokensRequest,
)
from shared_core.models.served_dialects import (
    DIALECTS,
    Dialect,
    Io,
    LlamaCppDialect,
    Row,
    ServerInfo,
    SGLangDialect,
    Traffic,
    VLLMDialect,
)

__all__ = ["ServedModel"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_TRANSIENT_STATUS = frozenset({429, 502, 503, 504})
_GRAMMAR_TOP = 64
"""Raw top-N log-probs read per step of a grammar-constrained decode (grown as needed)."""
_TOKENIZERS: dict[str, Any] = {}
_TOKENIZERS_LOCK = threading.Lock()


def _load_tokenizer(spec: str) -> Any:
    """A transformers tokenizer from a folder, a ``.gguf`` file or a Hugging Face cache id."""
    from transformers import AutoTokenizer

    with _TOKENIZERS_LOCK:
        found = _TOKENIZERS.get(spec)
        if found is not None:
            return found
        path = Path(spec).expanduser()
        if path.suffix == ".gguf":
            if not path.is_file():
                raise OSError(f"no GGUF file at {path}")
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        else:
            tok = AutoTokenizer.from_pretrained(str(path) if path.exists() else spec)
        _TOKENIZERS[spec] = tok
        return tok


class _Loop:
    """An asyncio event loop on a daemon thread, with one pooled httpx client."""

    def __init__(
        self, base_url: str, headers: dict[str, str], timeout: httpx.Timeout, max_connections: int
    ) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="rain-served", daemon=True
        )
        self.thread.start()

        async def make() -> httpx.AsyncClient:
            return httpx.AsyncClient(
                base_url=base_url,
                headers=headers,
                timeout=timeout,
                limits=httpx.Limits(
                    max_connections=max_connections, max_keepalive_connections=max_connections
                ),
            )

        self.client = asyncio.run_coroutine_threadsafe(make(), self.loop).result()

    def run(self, coro: Coroutine[Any, Any, T], cancel: threading.Event | None) -> T:
        """Run ``coro`` on the loop; a set ``cancel`` cancels it (closing its requests)."""
        if cancel is not None and cancel.is_set():
            coro.close()
            raise RainCancelled("the RAIN search was cancelled by its caller")
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        if cancel is None:
            return fut.result()
        while True:
            try:
                return fut.result(timeout=0.02)
            except concurrent.futures.TimeoutError:
                if cancel.is_set():
                    fut.cancel()  # cancels the task: httpx closes its in-flight connections
                    with contextlib.suppress(concurrent.futures.CancelledError, Exception):
                        fut.result(timeout=5)
                    raise RainCancelled("the RAIN search was cancelled by its caller") from None

    def close(self) -> None:
        if self.loop.is_closed():
            return
        # Closing a pool whose server is gone raises nothing worth reporting.
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self.client.aclose(), self.loop).result(timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


class ServedModel(HFTokenizerText, LanguageModel):
    """A model behind a llama.cpp, vLLM or SGLang server, driven over HTTP.

    ``base_url``: the server's root (``http://127.0.0.1:8080``; a trailing
    ``/v1`` is dropped). ``model``: the served model name (default: the one the
    server serves; a name it does not serve is an error). ``dialect``:
    ``"llamacpp"``, ``"vllm"`` or ``"sglang"`` (default: detected from
    ``/props``, ``/get_model_info``, ``/version``). ``tokenizer``: see the
    module docstring. ``timeout``: seconds per request (connect:
    ``connect_timeout``); ``retries``/``backoff_s``: for transient errors.
    """

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        *,
        api_key: str | None = None,
        dialect: str | None = None,
        tokenizer: Any = None,
        timeout: float = 120.0,
        connect_timeout: float = 5.0,
        retries: int = 3,
        backoff_s: float = 0.25,
        max_connections: int = 64,
        context_window: int | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        url = str(base_url).strip().rstrip("/")
        if url.endswith("/v1"):
            url = url[: -len("/v1")]
        parsed = httpx.URL(url) if url else None
        if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
            raise RainInputError(
                f"base_url {base_url!r} is not an http(s) URL; pass the server's root, e.g. "
                "'http://127.0.0.1:8080' (llama-server) or 'http://host:8000' (vLLM)"
            )
        if dialect is not None and dialect not in DIALECTS:
            raise RainInputError(
                f"unknown dialect {dialect!r}; use one of {sorted(DIALECTS)} or None to detect"
            )
        if timeout <= 0 or connect_timeout <= 0 or retries < 0:
            raise RainInputError("timeout and connect_timeout must be > 0 and retries >= 0")
        self.base_url = url
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.timeout = float(timeout)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.traffic = Traffic()
        self._loop = _Loop(
            url, headers, httpx.Timeout(timeout, connect=connect_timeout), max_connections
        )
        self.io = Io(
            post=self._post, get=self._get, stream=self._stream, traffic=self.traffic, url=url
        )
        try:
            self.info, self.dialect = self._loop.run(self._detect(dialect, model), None)
            self._setup(model, tokenizer, context_window, name)
        except BaseException:
            self._loop.close()
            raise

    # --- construction ---------------------------------------------------------------------
    async def _detect(self, dialect: str | None, model: str | None) -> tuple[ServerInfo, Dialect]:
        order: list[type[Dialect]] = (
            [DIALECTS[dialect]] if dialect else [LlamaCppDialect, SGLangDialect, VLLMDialect]
        )
        for cls in order:
            try:
                info = await cls.probe(self.io)
            except RainServerError as exc:
                if exc.status in (404, 405):
                    info = None
                else:
                    raise
            if info is not None:
                return info, cls(model)
        if dialect:
            raise RainServerError(
                f"{self.base_url}: this does not look like a {dialect} server (its info "
                "endpoint did not answer as expected); check base_url and dialect=",
                url=self.base_url,
            )
        raise RainServerError(
            f"{self.base_url}: could not tell which server this is (no llama.cpp /props, "
            "SGLang /get_model_info or vLLM /version); pass dialect='llamacpp' | 'vllm' | "
            "'sglang'",
            url=self.base_url,
        )

    def _setup(
        self, model: str | None, tokenizer: Any, context_window: int | None, name: str | None
    ) -> None:
        info = self.info
        served = info.models
        if model is not None and served and not self._serves(model):
            raise RainServerError(
                f"{self.base_url}: the server does not serve a model named {model!r}; it "
                f"serves {served}. Pass model= one of those (or leave it out)",
                url=self.base_url,
            )
        if model is None and served:
            model = served[0]
        self.dialect.model = model
        self.model_name = model
        shown = model or info.model_path or self.base_url
        if shown.endswith(".gguf"):
            shown = Path(shown).stem  # llama-server names its model by the file's path
        self.name = name or shown
        self.tokenizer = self._tokenizer(tokenizer, model)
        self._tokenizer_lock = threading.Lock()
        self.vocab_size = int(info.vocab_size or len(self.tokenizer))
        window = context_window or info.context_window
        if not window:
            window = int(getattr(self.tokenizer, "model_max_length", 0) or 0)
            if not 0 < window < 1_000_000:
                raise RainInputError(
                    f"{self.base_url}: the server does not report its context window; pass "
                    "context_window= (tokens one request may use)"
                )
        self.context_window = int(window)
        self.stop_token_ids = frozenset(self._stop_tokens())
        self._token_text: dict[int, str] = {}
        self._delimiter_masks: Any = None
        if isinstance(self.dialect, VLLMDialect) and info.max_logprobs:
            self.dialect.max_logprobs = info.max_logprobs
        self._check_tokenizer()

    def _serves(self, model: str) -> bool:
        for served in self.info.models:
            if model == served or Path(served).name == model or Path(served).stem == model:
                return True
        return False

    def _tokenizer(self, spec: Any, model: str | None) -> Any:
        if spec is not None and not isinstance(spec, str | os.PathLike):
            return spec  # a tokenizer object
        tried: list[str] = []
        candidates = [str(spec)] if spec is not None else [self.info.model_path, model]
        for cand in candidates:
            if not cand or cand in tried:
                continue
            tried.append(cand)
            try:
                return _load_tokenizer(cand)
            except (OSError, ValueError) as exc:
                logger.debug("tokenizer %r: %s", cand, exc)
        raise RainServerError(
            f"{self.base_url}: could not load the tokenizer of the served model locally "
            f"(tried {tried}); pass tokenizer= a local folder, a .gguf file or a Hugging Face "
            "id already in the cache (HF_HUB_OFFLINE=1 keeps it offline)",
            url=self.base_url,
        )

    def _stop_tokens(self) -> set[int]:
        tok = self.tokenizer
        ids: set[int] = set()
        if isinstance(tok.eos_token_id, int):
            ids.add(tok.eos_token_id)
        # Special tokens the chat template writes are turn boundaries (as in-process).
        template = tok.chat_template if isinstance(tok.chat_template, str) else ""
        for special in tok.all_special_tokens + list(getattr(tok, "added_tokens_encoder", {})):
            if special and special in template:
                tid = tok.convert_tokens_to_ids(special)
                if isinstance(tid, int) and tid != tok.unk_token_id:
                    ids.add(tid)
        return ids

    def _check_tokenizer(self) -> None:
        probe = 'RAIN checks: héllo, wörld! 12345\n  {"a": [1, 2]}'
        local = self.encode(probe)
        try:
            if isinstance(self.dialect, LlamaCppDialect):
                got = self._loop.run(
                    self._post("/tokenize", {"content": probe, "add_special": False}), None
                )
            elif isinstance(self.dialect, VLLMDialect):
                got = self._loop.run(
                    self._post(
                        "/tokenize",
                        {"model": self.model_name, "prompt": probe, "add_special_tokens": False},
                    ),
                    None,
                )
            else:
                return  # SGLang: no stable /tokenize across versions
        except RainServerError as exc:
            if exc.status in (404, 405):
                return
            raise
        remote = [int(t) for t in (got or {}).get("tokens", [])]
        if remote and remote != local:
            raise RainServerError(
                f"{self.base_url}: the local tokenizer does not match the server's (a probe "
                f"text gives {local[:8]}... here, {remote[:8]}... there); pass tokenizer= the "
                "served model's own tokenizer",
                url=self.base_url,
            )

    # --- HTTP ------------------------------------------------------------------------------
    async def _send(
        self, method: str, path: str, body: dict[str, Any] | None, stream: bool
    ) -> tuple[httpx.Response, list[Any] | None]:
        client = self._loop.client
        if body is None:
            return await client.request(method, path), None
        content = json.dumps(body)
        headers = {"Content-Type": "application/json"}
        if not stream:
            return await client.request(method, path, content=content, headers=headers), None
        async with client.stream(method, path, content=content, headers=headers) as resp:
            if resp.status_code >= 400:
                await resp.aread()
                return resp, None
            events: list[Any] = []
            async for line in resp.aiter_lines():
                if line.startswith("data: "):
                    data = line[len("data: ") :].strip()
                    if data == "[DONE]":
                        break
                    events.append(json.loads(data))
                elif line.startswith("error: "):
                    events.append({"error": json.loads(line[len("error: ") :])})
            return resp, events

    async def _request(
        self, method: str, path: str, body: dict[str, Any] | None, stream: bool = False
    ) -> Any:
        """One request with retries; ``stream``: read server-sent events (a list of them).

        Streaming is how a cancel reaches llama-server: it notices a closed connection
        when it next writes, and drops the work; a non-streaming request runs to its end.
        """
        url = f"{self.base_url}{path}"
        error: RainServerError | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                self.traffic.retries += 1
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                resp, events = await self._send(method, path, body, stream)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                error = RainServerError(
                    f"{url}: cannot connect ({type(exc).__name__}: {exc or 'refused'}); is the "
                    "server running and is base_url right? Start it, or fix base_url",
                    url=url,
                    transient=True,
                )
                continue
            except httpx.TimeoutException as exc:
                raise RainServerError(
                    f"{url}: no answer within {self.timeout:g} s ({type(exc).__name__}); the "
                    "server is overloaded or the request is too large: raise timeout= or "
                    "lower the load",
                    url=url,
                ) from None
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
                error = RainServerError(
                    f"{url}: the connection broke mid-request ({type(exc).__name__}: {exc}); "
                    "the server may have died or restarted: check its log and restart it",
                    url=url,
                    transient=True,
                )
                continue
            self.traffic.requests += 1
            self.work.forward_calls += 1
            if resp.status_code in _TRANSIENT_STATUS:
                error = self._http_error(url, resp, transient=True)
                continue
            if resp.status_code >= 400:
                raise self._http_error(url, resp, transient=False)
            if events is not None:
                for event in events:
                    if isinstance(event, dict) and "error" in event:
                        raise RainServerError(
                            f"{url}: the server failed mid-answer: {event['error']}; check "
                            "its log",
                            url=url,
                        )
                return events
            try:
                return resp.json()
            except ValueError:
                raise RainServerError(
                    f"{url}: the answer is not JSON ({resp.text[:200]!r}); is base_url the "
                    "model server's root?",
                    url=url,
                    status=resp.status_code,
                ) from None
        assert error is not None
        raise error

    def _http_error(self, url: str, resp: httpx.Response, *, transient: bool) -> RainServerError:
        try:
            detail: Any = resp.json()
            if isinstance(detail, dict):
                err = detail.get("error", detail)
                detail = err.get("message", err) if isinstance(err, dict) else err
        except ValueError:
            detail = resp.text[:300]
        status = resp.status_code
        if status in (401, 403):
            fix = "pass api_key= (the server's --api-key)"
        elif status == 404:
            fix = (
                f"the server has no {resp.request.url.path} endpoint: it is not a "
                f"{self.dialect.name if hasattr(self, 'dialect') else 'known'} server or lacks "
                "this feature; check base_url and dialect=, or upgrade the server"
            )
        elif status in _TRANSIENT_STATUS:
            fix = "the server is busy, loading or restarting: retry later or lower the load"
        elif status < 500:
            fix = (
                "the server rejected the request: check the model name, context window and options"
            )
        else:
            fix = "the server failed: check its log"
        return RainServerError(
            f"{url}: HTTP {status}: {detail}; {fix}", url=url, status=status, transient=transient
        )

    async def _post(self, path: str, body: dict[str, Any]) -> Any:
        return await self._request("POST", path, body)

    async def _stream(self, path: str, body: dict[str, Any]) -> Any:
        return await self._request("POST", path, body, stream=True)

    async def _get(self, path: str) -> Any:
        return await self._request("GET", path, None)

    def _sync_work(self) -> None:
        t = self.traffic
        self.work.tokens_processed = t.prompt_tokens - t.cached_tokens + t.completion_tokens
        self.work.extra.update(
            {
                "http_requests": t.requests,
                "prompt_tokens": t.prompt_tokens,
                "cached_prompt_tokens": t.cached_tokens,
                "completion_tokens": t.completion_tokens,
                "retries": t.retries,
            }
        )

    def _run(self, coro: Coroutine[Any, Any, T], cancel: threading.Event | None) -> T:
        try:
            return self._loop.run(coro, cancel)
        finally:
            self._sync_work()

    # --- text <-> tokens (HFTokenizerText) -----------------------------------------------
    def _text_of_token(self, token: int) -> str:
        text = self._token_text.get(token)
        if text is None:
            text = str(self.tokenizer.decode([token]))
            self._token_text[token] = text
        return text

    # --- checks ------------------------------------------------------------------------------
    def _check_length(self, n: int) -> None:
        if n > self.context_window:
            raise RainInputError(
                f"the sequence needs {n} tokens but {self.name} at {self.base_url} has a "
                f"context window of {self.context_window} per request; shorten the prompt or "
                "lower max_new_tokens (llama-server: raise -c, or lower --parallel)"
            )

    def _check_ids(self, ids: Sequence[int]) -> None:
        if not ids:
            raise RainInputError("a served model call needs a non-empty token prefix")

    # --- the protocol ----------------------------------------------------------------------
    def top_tokens(
        self, requests: Sequence[TopTokensRequest], *, cancel: threading.Event | None = None
    ) -> list[TopTokens]:
        if not requests:
            return []
        for r in requests:
            self._check_ids(r.prefix)
            self._check_length(len(r.prefix) + 1)
        return self._run(self._top_tokens(requests), cancel)

    async def _top_tokens(self, requests: Sequence[TopTokensRequest]) -> list[TopTokens]:
        out: list[TopTokens | None] = [None] * len(requests)
        plain = [i for i, r in enumerate(requests) if r.grammar is None]
        if plain:
            k = max(requests[i].k for i in plain)
            tops = await self.dialect.top_logprobs(self.io, [requests[i].prefix for i in plain], k)
            for i, top in zip(plain, tops, strict=True):
                out[i] = _best(top, requests[i].k)
        for i, r in enumerate(requests):
            if r.grammar is not None:
                out[i] = await self._top_allowed(r)
        return [t for t in out if t is not None]

    async def _top_allowed(self, r: TopTokensRequest) -> TopTokens:
        """The ``k`` likeliest tokens the grammar allows: raw top-N masked locally."""
        assert r.grammar is not None
        matcher = self._matcher(r.grammar.json_schema)
        mask = matcher.allowed(r.prefix[r.response_start :])
        n = max(_GRAMMAR_TOP, 2 * r.k)
        while True:
            (top,) = await self.dialect.top_logprobs(self.io, [r.prefix], n)
            allowed = [(t, lp) for t, lp in top if t < len(mask) and mask[t]]
            if len(allowed) >= r.k or len(top) < n or n >= self._top_cap():
                return _best(allowed, r.k)
            n = min(4 * n, self._top_cap())

    def _top_cap(self) -> int:
        if isinstance(self.dialect, VLLMDialect):
            return self.dialect.max_logprobs
        return self.vocab_size

    def _matcher(self, schema: str) -> Any:
        from shared_core.constraints import JSONSchemaConstraint

        return JSONSchemaConstraint(
            schema,
            self.tokenizer,
            vocab_size=self.vocab_size,
            stop_token_ids=sorted(self.stop_token_ids),
        )

    def sample(
        self, requests: Sequence[SampleRequest], *, cancel: threading.Event | None = None
    ) -> list[list[Continuation]]:
        for r in requests:
            self._check_ids(r.prefix)
            self._check_length(len(r.prefix) + r.max_tokens)
        out: list[list[Continuation] | None] = [None] * len(requests)
        plain = [i for i, r in enumerate(requests) if r.grammar is None]
        if plain:
            results = self._run(self._sample_all([requests[i] for i in plain]), cancel)
            for i, res in zip(plain, results, strict=True):
                out[i] = res
        for i, r in enumerate(requests):
            if out[i] is None:
                out[i] = self._sample_with_grammar(r, cancel)
        return [o for o in out if o is not None]

    async def _sample_all(self, requests: Sequence[SampleRequest]) -> list[list[Continuation]]:
        return list(await asyncio.gather(*(self._sample_one(r) for r in requests)))

    async def _sample_one(self, r: SampleRequest) -> list[Continuation]:
        if r.n <= 0 or r.max_tokens <= 0:
            return [Continuation([], []) for _ in range(max(r.n, 0))]
        greedy = r.n if r.temperature == 0 else min(r.greedy_rows, r.n)
        sampled = r.n - greedy
        # llama.cpp runs at most one sample per slot: split ``n`` to fit.
        per_request = self.info.slots or sampled or 1
        jobs = []
        if greedy:
            jobs.append(
                self.dialect.sample(
                    self.io,
                    r.prefix,
                    n=1,
                    max_tokens=r.max_tokens,
                    temperature=0.0,
                    top_k=0,
                    seed=r.seed,
                )
            )
        start = 0
        while start < sampled:
            size = min(per_request, sampled - start)
            jobs.append(
                self.dialect.sample(
                    self.io,
                    r.prefix,
                    n=size,
                    max_tokens=r.max_tokens,
                    temperature=r.temperature,
                    top_k=r.top_k,
                    seed=r.seed + start,
                )
            )
            start += size
        parts = await asyncio.gather(*jobs)
        rows: list[Row] = []
        if greedy:
            rows.extend([parts[0][0]] * greedy)
            parts = parts[1:]
        for part in parts:
            rows.extend(part)
        return [self._cut(row, r) for row in rows]

    def _cut(self, row: Row, r: SampleRequest) -> Continuation:
        """The row up to its first stop token, clause end or stop string (kept)."""
        ids, lps = row.token_ids[: r.max_tokens], row.logprobs[: r.max_tokens]
        for i, tok in enumerate(ids):
            if tok in self.stop_token_ids:
                return Continuation(ids[: i + 1], lps[: i + 1])
            if r.stop_after and any(d in self._text_of_token(tok) for d in r.stop_after):
                return Continuation(ids[: i + 1], lps[: i + 1])
            if r.stop_strings:
                text = self.decode(ids[: i + 1])
                if any(s in text for s in r.stop_strings):
                    return Continuation(ids[: i + 1], lps[: i + 1])
        return Continuation(list(ids), list(lps))

    def _sample_with_grammar(
        self, r: SampleRequest, cancel: threading.Event | None
    ) -> list[Continuation]:
        """Decode under the grammar here, from the server's raw top-N log-probs per step."""
        import numpy as np

        from shared_core.models.decoding import DelimiterMasks, decode

        assert r.grammar is not None
        matcher = self._matcher(r.grammar.json_schema)
        base = list(r.prefix)
        start = r.response_start
        need = max(r.top_k, 1) if r.top_k > 0 else 8
        seqs: dict[int, list[int]] = {}

        def step(active: list[int], last: list[int] | None) -> np.ndarray:
            if last is None:
                for i in active:
                    seqs[i] = list(base)
            else:
                for i, tok in zip(active, last, strict=True):
                    seqs[i].append(tok)
            rows = np.full((len(active), self.vocab_size), -np.inf, dtype=np.float32)
            # Rows that share a sequence (all of them, at the first step) ask once.
            unique: dict[tuple[int, ...], list[int]] = {}
            for pos, i in enumerate(active):
                unique.setdefault(tuple(seqs[i]), []).append(pos)
            keys = list(unique)
            tops = self._run(self._grammar_tops(keys, start, matcher, need), cancel)
            for key, top in zip(keys, tops, strict=True):
                for pos in unique[key]:
                    for tok, lp in top:
                        if tok < self.vocab_size:
                            rows[pos, tok] = lp
            return rows

        if self._delimiter_masks is None:
            self._delimiter_masks = DelimiterMasks(self.token_texts)
        masks = self._delimiter_masks
        return decode(
            r,
            step,
            stop_token_ids=self.stop_token_ids,
            delimiter_masks=masks,
            text_of=self.decode,
            allowed=matcher.allowed,
            cancel=cancel,
        )

    async def _grammar_tops(
        self, seqs: list[tuple[int, ...]], start: int, matcher: Any, need: int
    ) -> list[list[tuple[int, float]]]:
        n = _GRAMMAR_TOP
        tops = await self.dialect.top_logprobs(self.io, seqs, n)
        for j, seq in enumerate(seqs):
            mask = matcher.allowed(seq[start:])
            m = n
            while sum(1 for t, _ in tops[j] if t < len(mask) and mask[t]) < need:
                if m >= self._top_cap() or len(tops[j]) < m:
                    break
                m = min(4 * m, self._top_cap())
                (tops[j],) = await self.dialect.top_logprobs(self.io, [seq], m)
        return tops

    def label_logprobs(
        self,
        prompts: Sequence[Sequence[int]],
        label_ids: Sequence[int],
        *,
        reuse: bool = True,
        cancel: threading.Event | None = None,
    ) -> list[list[float]]:
        if not prompts:
            return []
        if not label_ids:
            raise RainInputError("label_logprobs needs at least one label token id")
        for p in prompts:
            self._check_ids(p)
            self._check_length(len(p) + 1)
        out = self._run(self.dialect.label_logprobs(self.io, prompts, label_ids), cancel)
        for row in out:
            if len(row) != len(label_ids) or any(math.isnan(v) for v in row):
                raise RainServerError(
                    f"{self.base_url}: the server did not return every label's log-prob",
                    url=self.base_url,
                )
        return out

    def close(self) -> None:
        self._loop.close()

    def __enter__(self) -> ServedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"ServedModel({self.base_url!r}, model={self.model_name!r}, "
            f"dialect={self.dialect.name!r})"
        )


def _best(pairs: Sequence[tuple[int, float]], k: int) -> TopTokens:
    """The ``k`` best ``(id, log-prob)`` pairs, best first, ties to the lower id."""
    ordered = sorted(pairs, key=lambda p: (-p[1], p[0]))[:k]
    return TopTokens(tuple(int(t) for t, _ in ordered), tuple(float(lp) for _, lp in ordered))
