"""How each server is asked for what the RAIN search needs: llama.cpp, vLLM, SGLang.

A dialect maps three questions onto one server's HTTP API, on token ids:

- the raw top-``n`` next tokens after each of several prefixes, with log-probs
  (temperature 1, no grammar, no sampling filter): one request for the batch;
- ``n`` sampled continuations of one prefix (one request with ``n``);
- the exact log-probs of given label tokens after each of several judge
  prompts (both option orders in one request).

A dialect does no I/O itself: it is handed an :class:`Io` (``post``/``get``
coroutines and a traffic counter), so the mapping tests drive it with recorded
responses (``tests/recorded/``) and the served backend with httpx.

Where each server reports what (checked against each server's source):

- **llama.cpp** ``llama-server``, native ``/completion``: ``prompt`` a token list
  or a list of them (a batch: one result per prompt, ``n`` results each);
  ``n_probs`` log-probs per generated token come as ``completion_probabilities
  [i] = {id, token, logprob, top_logprobs: [{id, token, logprob}]}``, computed
  from the raw logits (``post_sampling_probs`` off: no temperature, no grammar);
  ``logit_bias`` moves sampling but not those log-probs, so forcing a label
  with +100 reads its exact log-prob; ``tokens_cached`` and ``timings`` report
  the prompt-cache reuse. Stop strings are not sent: on a stop word the server
  drops that word's tokens from the reported ones, so clause ends and stop
  strings are cut here, on the returned tokens.
- **vLLM**: ``/v1/completions`` with token-id prompts, ``return_tokens_as_token_ids``
  (tokens come as ``"token_id:N"``), ``logprobs`` (at most the server's
  ``--max-logprobs``, default 20), extra ``top_k``/``min_p``/``seed``,
  ``structured_outputs``; log-probs are the raw model log-probs (vLLM's default
  ``--logprobs-mode raw_logprobs``: before logit bias, temperature, penalties).
  Labels: ``/generative_scoring`` (``label_token_ids``, ``apply_softmax=false``:
  the full-vocabulary probability of each label) when the server has it, else
  ``/v1/completions`` top-k plus a forced read (``logit_bias`` +100) of every
  label outside the top-k.
- **SGLang**, native ``/generate``: ``input_ids``, ``sampling_params`` (``n``,
  ``max_new_tokens``, ``json_schema``...), ``return_logprob``,
  ``top_logprobs_num``, ``token_ids_logprob`` (log-probs of given ids: the
  labels, exact, one request); ``meta_info.output_token_logprobs[i] = [logprob,
  id, text]``, ``output_top_logprobs[i] = [[logprob, id, text], ...]``,
  ``output_token_ids_logprobs[i]`` likewise, ``cached_tokens``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from shared_core.errors import RainServerError

__all__ = [
    "DIALECTS",
    "Dialect",
    "Io",
    "LlamaCppDialect",
    "Row",
    "SGLangDialect",
    "ServerInfo",
    "Traffic",
    "VLLMDialect",
]

FORCE_BIAS = 100.0
"""Logit bias that makes a label the sampled token, so the server reports its log-prob."""


@dataclass
class Row:
    """One sampled continuation as the server returned it (before cutting at clause ends)."""

    token_ids: list[int]
    logprobs: list[float]
    finish: str
    """``stop`` (an end-of-generation token) or ``length``."""


@dataclass
class ServerInfo:
    """What a server says about itself."""

    dialect: str
    models: list[str] = field(default_factory=list)
    model_path: str | None = None
    """Where the server loaded the model from (a GGUF file, a folder, a hub id)."""
    context_window: int | None = None
    """Tokens one request may use (llama.cpp: per slot)."""
    slots: int | None = None
    """Requests served at once (llama.cpp ``--parallel``; the most ``n`` per request)."""
    max_logprobs: int | None = None
    """The most top log-probs per position the server returns (None: no cap)."""
    vocab_size: int | None = None


@dataclass
class Traffic:
    """HTTP requests and prompt tokens sent to a server (updated on the I/O thread)."""

    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    """Prompt tokens the server reported as read from its prefix cache."""
    completion_tokens: int = 0
    retries: int = 0

    def add(self, prompt: int = 0, cached: int = 0, completion: int = 0) -> None:
        self.prompt_tokens += int(prompt)
        self.cached_tokens += int(cached)
        self.completion_tokens += int(completion)

    def to_dict(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "completion_tokens": self.completion_tokens,
            "retries": self.retries,
        }


Post = Callable[[str, dict[str, Any]], Awaitable[Any]]
Get = Callable[[str], Awaitable[Any]]


@dataclass
class Io:
    """The I/O a dialect uses: JSON POST and GET coroutines, and a traffic counter."""

    post: Post
    get: Get
    stream: Post | None = None
    """POST answered with server-sent events (the list of them); None: not available."""
    traffic: Traffic = field(default_factory=Traffic)
    url: str = ""


def _bad_response(io: Io, what: str, payload: Any) -> RainServerError:
    text = repr(payload)
    if len(text) > 300:
        text = text[:300] + "..."
    return RainServerError(
        f"{io.url}: unexpected response to {what}: {text}; check that the server's dialect is "
        "right (pass dialect='llamacpp' | 'vllm' | 'sglang') and that it is a recent version",
        url=io.url,
    )


def _log(p: float) -> float:
    """log of a probability a server returned (0 -> -inf, an exact zero)."""
    return math.log(p) if p > 0 else -math.inf


def _common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        n = next((i for i in range(n) if s[i] != first[i]), n)
    return n


class Dialect(ABC):
    """One server API. ``model`` is the served model name sent with every request."""

    name: str

    def __init__(self, model: str | None = None) -> None:
        self.model = model

    @classmethod
    @abstractmethod
    async def probe(cls, io: Io) -> ServerInfo | None:
        """The server's info if it speaks this dialect, else None."""

    @abstractmethod
    async def top_logprobs(
        self, io: Io, prefixes: Sequence[Sequence[int]], n: int
    ) -> list[list[tuple[int, float]]]:
        """Raw top-``n`` ``(token id, log-prob)`` of the next token after each prefix."""

    @abstractmethod
    async def sample(
        self,
        io: Io,
        prefix: Sequence[int],
        *,
        n: int,
        max_tokens: int,
        temperature: float,
        top_k: int,
        seed: int,
        json_schema: str | None = None,
    ) -> list[Row]:
        """``n`` continuations of ``prefix`` (temperature 0: greedy)."""

    @abstractmethod
    async def label_logprobs(
        self, io: Io, prompts: Sequence[Sequence[int]], label_ids: Sequence[int]
    ) -> list[list[float]]:
        """Exact log-prob of each label as the next token after each prompt."""


# --- llama.cpp ---------------------------------------------------------------------------


def _llamacpp_neutral(temperature: float, top_k: int, seed: int) -> dict[str, Any]:
    # llama.cpp's defaults (temperature 0.8, top_k 40, top_p 0.95, min_p 0.05, ...)
    # would change every distribution: send every sampling field.
    return {
        "temperature": float(temperature),
        "top_k": int(top_k),
        "top_p": 1.0,
        "min_p": 0.0,
        "typical_p": 1.0,
        "top_n_sigma": -1.0,
        "xtc_probability": 0.0,
        "repeat_penalty": 1.0,
        "repeat_last_n": 0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "dry_multiplier": 0.0,
        "mirostat": 0,
        "dynatemp_range": 0.0,
        "seed": int(seed) % (2**31),
        "ignore_eos": False,
        "cache_prompt": True,
        "post_sampling_probs": False,
        "stream": False,
    }


class LlamaCppDialect(Dialect):
    """llama.cpp's ``llama-server`` (native ``/completion``)."""

    name = "llamacpp"

    label_top_n = 1024
    """Top log-probs read per judge prompt; labels outside them are forced one by one.

    Why 1024, not 20: a rubric's label variants ("positive", " Positive", "Negative", ...)
    sit far down the list (SmolLM2 on the ``positive`` rubric: ranks up to ~980), so a
    top-20 read left ~5 labels per judgement to forced reads, one request each. At 8
    concurrent searches on one ``--parallel 8`` server those reads landed on other
    slots and re-read the response and tail (~26 tokens) each time: 13,500 prompt tokens
    processed per 80 committed tokens instead of ~3,000, and 8 searches ran at 0.96
    tok/s against 1.5 for one (``benchmarks/served.py``, 10 tokens, 2 loaded cores).
    With 1024 nearly every label is in the first read: 3.6-3.8 tok/s at 8 searches. The
    longer list costs JSON on both sides (two cached prompts: 34 ms with 200 entries,
    64 ms with 2000); 512 still left forced reads (1.9 tok/s at 8), 2048 was no faster.
    """

    @classmethod
    async def probe(cls, io: Io) -> ServerInfo | None:
        props = await io.get("/props")
        if not isinstance(props, Mapping) or "default_generation_settings" not in props:
            return None
        settings = props.get("default_generation_settings") or {}
        info = ServerInfo(
            dialect=cls.name,
            model_path=props.get("model_path"),
            context_window=settings.get("n_ctx"),
            slots=props.get("total_slots"),
        )
        models = await io.get("/v1/models")
        for entry in (models or {}).get("data", []):
            info.models.append(str(entry.get("id")))
            meta = entry.get("meta") or {}
            if meta.get("n_vocab"):
                info.vocab_size = int(meta["n_vocab"])
        for alias in props.get("model_alias", "") and [props["model_alias"]]:
            if alias not in info.models:
                info.models.append(str(alias))
        return info

    def _body(self, prompt: Any, **fields: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"prompt": prompt, **fields}
        if self.model:
            body["model"] = self.model
        return body

    @staticmethod
    def _results(io: Io, payload: Any, expected: int, what: str) -> list[Mapping[str, Any]]:
        results = payload if isinstance(payload, list) else [payload]
        if len(results) != expected or not all(isinstance(r, Mapping) for r in results):
            raise _bad_response(io, what, payload)
        for r in results:
            io.traffic.add(
                prompt=r.get("tokens_evaluated", 0),
                cached=r.get("timings", {}).get("cache_n", 0) if r.get("timings") else 0,
                completion=r.get("tokens_predicted", 0),
            )
        # A batch answers in completion order; ``index`` says which prompt (and sample).
        return sorted(results, key=lambda r: int(r.get("index", 0)))

    async def top_logprobs(
        self, io: Io, prefixes: Sequence[Sequence[int]], n: int
    ) -> list[list[tuple[int, float]]]:
        body = self._body(
            [list(p) for p in prefixes],
            n_predict=1,
            n_probs=int(n),
            **_llamacpp_neutral(0.0, 0, 0),
        )
        payload = await io.post("/completion", body)
        out = []
        for r in self._results(io, payload, len(prefixes), "a top-tokens request"):
            probs = r.get("completion_probabilities")
            if not probs:
                raise _bad_response(io, "a top-tokens request (no completion_probabilities)", r)
            out.append([(int(t["id"]), float(t["logprob"])) for t in probs[0]["top_logprobs"]])
        return out

    async def sample(
        self,
        io: Io,
        prefix: Sequence[int],
        *,
        n: int,
        max_tokens: int,
        temperature: float,
        top_k: int,
        seed: int,
        json_schema: str | None = None,
    ) -> list[Row]:
        body = self._body(
            list(prefix),
            n_predict=int(max_tokens),
            n=int(n),
            n_probs=1,
            return_tokens=True,
            **_llamacpp_neutral(temperature, top_k, seed),
        )
        if json_schema is not None:
            import json

            body["json_schema"] = json.loads(json_schema)
        payload = await self._sample_payload(io, body, n)
        rows: list[Row] = []
        holes: list[tuple[int, int]] = []  # (row, position) of tokens the server gave no log-prob
        for r in self._results(io, payload, n, "a sampling request"):
            probs = r.get("completion_probabilities") or []
            tokens = [int(t) for t in r.get("tokens") or []]
            # The server reports no log-prob for a token that leaves the text mid-way
            # through a UTF-8 character (an emoji's byte tokens): only for the token that
            # completes it. ``tokens`` has them all; the others are read exactly below.
            lps: list[float] = []
            j = 0
            for pos, tok in enumerate(tokens):
                if j < len(probs) and int(probs[j]["id"]) == tok:
                    lps.append(float(probs[j]["logprob"]))
                    j += 1
                else:
                    lps.append(math.nan)
                    holes.append((len(rows), pos))
            if j != len(probs):
                raise _bad_response(io, "a sampling request (tokens and log-probs differ)", r)
            finish = "stop" if r.get("stop_type") in ("eos", "word") else "length"
            rows.append(Row(tokens, lps, finish))
        if holes:
            contexts = [list(prefix) + rows[i].token_ids[:pos] for i, pos in holes]
            for (i, pos), context in zip(holes, contexts, strict=True):
                (value,) = await self.label_logprobs(io, [context], [rows[i].token_ids[pos]])
                rows[i].logprobs[pos] = value[0]
        return rows

    @staticmethod
    async def _sample_payload(io: Io, body: dict[str, Any], n: int) -> list[dict[str, Any]]:
        """The final result of each of the ``n`` samples, log-probs included.

        Streamed when the transport can (a cancel then stops the server's decoding): the
        partial events carry each token's log-probs, the final one per sample its tokens,
        stop type and timings.
        """
        if io.stream is None:
            payload = await io.post("/completion", body)
            return list(payload) if isinstance(payload, list) else [payload]
        events = await io.stream("/completion", body | {"stream": True})
        finals: dict[int, dict[str, Any]] = {}
        probs: dict[int, list[Any]] = {}
        tokens: dict[int, list[int]] = {}
        for ev in events:
            if not isinstance(ev, Mapping):
                raise _bad_response(io, "a streamed sampling request", ev)
            index = int(ev.get("index", 0))
            probs.setdefault(index, []).extend(ev.get("completion_probabilities") or [])
            if ev.get("stop"):
                finals[index] = dict(ev)
            else:
                tokens.setdefault(index, []).extend(int(t) for t in ev.get("tokens") or [])
        if len(finals) != n:
            raise _bad_response(io, f"a streamed sampling request ({len(finals)} of {n})", events)
        for index, final in finals.items():
            final["completion_probabilities"] = probs.get(index, [])
            final["tokens"] = tokens.get(index, [])
            if len(final["tokens"]) != int(final.get("tokens_predicted", 0)):
                # A streamed event carries only the token that completes a UTF-8
                # character, not the byte tokens before it: ask again unstreamed
                # (same seed, same samples), where the final answer lists every token.
                payload = await io.post("/completion", body)
                return list(payload) if isinstance(payload, list) else [payload]
        return [finals[i] for i in sorted(finals)]

    async def label_logprobs(
        self, io: Io, prompts: Sequence[Sequence[int]], label_ids: Sequence[int]
    ) -> list[list[float]]:
        # One request reads the top ``label_top_n`` of every prompt (the labels are nearly
        # always there); a label outside them is read exactly by forcing it (logit_bias),
        # one request per such label for all prompts that missed it.
        labels = [int(t) for t in label_ids]
        tops = await self.top_logprobs(io, prompts, max(self.label_top_n, len(labels)))
        out: list[list[float]] = []
        missing: dict[int, list[int]] = {}
        for i, top in enumerate(tops):
            found = dict(top)
            out.append([found.get(t, math.nan) for t in labels])
            for t in labels:
                if t not in found:
                    missing.setdefault(t, []).append(i)
        for label, rows in missing.items():
            body = self._body(
                [list(prompts[i]) for i in rows],
                n_predict=1,
                n_probs=1,
                logit_bias=[[label, FORCE_BIAS]],
                **_llamacpp_neutral(0.0, 0, 0),
            )
            payload = await io.post("/completion", body)
            results = self._results(io, payload, len(rows), "a forced label read")
            col = labels.index(label)
            for i, r in zip(rows, results, strict=True):
                (first,) = r.get("completion_probabilities") or [None]
                if first is None or int(first["id"]) != label:
                    raise _bad_response(io, "a forced label read (the label was not chosen)", r)
                out[i][col] = float(first["logprob"])
        return out


# --- vLLM ----------------------------------------------------------------------------------


def _vllm_token_id(token: str) -> int:
    if not token.startswith("token_id:"):
        raise ValueError(token)
    return int(token.split(":", 1)[1])


class VLLMDialect(Dialect):
    """vLLM's OpenAI-compatible server (``/v1/completions``, ``/generative_scoring``)."""

    name = "vllm"

    def __init__(self, model: str | None = None) -> None:
        super().__init__(model)
        self.scoring_path: str | None = "/generative_scoring"
        """The label-scoring endpoint; None once the server has shown it has none."""
        self.max_logprobs = 20

    @classmethod
    async def probe(cls, io: Io) -> ServerInfo | None:
        version = await io.get("/version")
        if not isinstance(version, Mapping) or "version" not in version:
            return None
        info = ServerInfo(dialect=cls.name, max_logprobs=None)
        models = await io.get("/v1/models")
        for entry in (models or {}).get("data", []):
            info.models.append(str(entry.get("id")))
            if entry.get("max_model_len"):
                info.context_window = int(entry["max_model_len"])
            if entry.get("root"):
                info.model_path = str(entry["root"])
        return info

    def _completion(self, prompt: Any, **fields: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt,
            "top_p": 1.0,
            "min_p": 0.0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "repetition_penalty": 1.0,
            "return_tokens_as_token_ids": True,
            "skip_special_tokens": False,
            "ignore_eos": False,
            "stream": False,
            "echo": False,
        }
        body.update(fields)
        return body

    @staticmethod
    def _choices(io: Io, payload: Any, expected: int, what: str) -> list[Mapping[str, Any]]:
        choices = payload.get("choices") if isinstance(payload, Mapping) else None
        if not isinstance(choices, list) or len(choices) != expected:
            raise _bad_response(io, what, payload)
        usage = payload.get("usage") or {}
        details = usage.get("prompt_tokens_details") or {}
        io.traffic.add(
            prompt=usage.get("prompt_tokens", 0),
            cached=details.get("cached_tokens", 0) or 0,
            completion=usage.get("completion_tokens", 0),
        )
        # Choices come prompt by prompt, n per prompt; ``index`` numbers them in that order.
        return sorted(choices, key=lambda c: int(c.get("index", 0)))

    async def top_logprobs(
        self, io: Io, prefixes: Sequence[Sequence[int]], n: int
    ) -> list[list[tuple[int, float]]]:
        if n > self.max_logprobs:
            raise RainServerError(
                f"{io.url}: the search asks for the top {n} tokens but this vLLM server "
                f"returns at most {self.max_logprobs} log-probs per token; restart it with "
                f"`--max-logprobs {max(n, 64)}` or lower num_candidates",
                url=io.url,
            )
        body = self._completion(
            [list(p) for p in prefixes], max_tokens=1, temperature=0.0, top_k=-1, logprobs=int(n)
        )
        payload = await io.post("/v1/completions", body)
        out = []
        for c in self._choices(io, payload, len(prefixes), "a top-tokens request"):
            try:
                top = (c["logprobs"]["top_logprobs"] or [{}])[0]
                pairs = [(_vllm_token_id(t), float(lp)) for t, lp in top.items()]
            except (KeyError, TypeError, ValueError, IndexError):
                raise _bad_response(io, "a top-tokens request", c) from None
            # The sampled token is listed too, even outside the top n: keep the top n.
            pairs.sort(key=lambda p: (-p[1], p[0]))
            out.append(pairs[:n])
        return out

    async def sample(
        self,
        io: Io,
        prefix: Sequence[int],
        *,
        n: int,
        max_tokens: int,
        temperature: float,
        top_k: int,
        seed: int,
        json_schema: str | None = None,
    ) -> list[Row]:
        body = self._completion(
            list(prefix),
            n=int(n),
            max_tokens=int(max_tokens),
            temperature=float(temperature),
            top_k=int(top_k) if top_k > 0 else -1,
            seed=int(seed) % (2**31),
            logprobs=1,
        )
        if json_schema is not None:
            import json

            body["structured_outputs"] = {"json": json.loads(json_schema)}
        payload = await io.post("/v1/completions", body)
        rows = []
        for c in self._choices(io, payload, n, "a sampling request"):
            try:
                lp = c["logprobs"]
                ids = [_vllm_token_id(t) for t in lp["tokens"]]
                lps = [float(x) for x in lp["token_logprobs"]]
            except (KeyError, TypeError, ValueError):
                raise _bad_response(io, "a sampling request", c) from None
            rows.append(Row(ids, lps, "stop" if c.get("finish_reason") == "stop" else "length"))
        return rows

    async def label_logprobs(
        self, io: Io, prompts: Sequence[Sequence[int]], label_ids: Sequence[int]
    ) -> list[list[float]]:
        labels = [int(t) for t in label_ids]
        if self.scoring_path is not None:
            try:
                return await self._scored(io, prompts, labels)
            except RainServerError as exc:
                if exc.status not in (404, 405):
                    raise
                self.scoring_path = None  # an older vLLM: read the labels from completions
        return await self._from_completions(io, prompts, labels)

    async def _scored(
        self, io: Io, prompts: Sequence[Sequence[int]], labels: list[int]
    ) -> list[list[float]]:
        # The prompts share the judge's cached prefix: send it once as the query.
        cut = min(_common_prefix_len(prompts), min(len(p) for p in prompts) - 1)
        query = list(prompts[0][:cut])
        items = [list(p[cut:]) for p in prompts]

        async def ask(first: int) -> Any:
            order = [first] + [t for t in labels if t != first]
            body = {
                "model": self.model,
                "query": query,
                "items": items,
                "label_token_ids": order,
                "apply_softmax": False,
                "add_special_tokens": False,
            }
            assert self.scoring_path is not None
            return await io.post(self.scoring_path, body)

        payload = await ask(labels[0])
        out = [[math.nan] * len(labels) for _ in prompts]
        if isinstance(payload, Mapping) and isinstance(payload.get("results"), list):
            # Versions that return every label's probability per item.
            for r in payload["results"]:
                probs = r.get("token_probs") or {}
                for j, t in enumerate(labels):
                    if str(t) in probs:
                        out[int(r["index"])][j] = _log(float(probs[str(t)]))
        elif isinstance(payload, Mapping) and isinstance(payload.get("data"), list):
            # Versions that return the first label's probability: one request per label.
            import asyncio

            answers = [payload, *list(await asyncio.gather(*(ask(t) for t in labels[1:])))]
            for j, answer in enumerate(answers):
                for r in answer.get("data") or []:
                    out[int(r["index"])][j] = _log(float(r["score"]))
        else:
            raise _bad_response(io, "a generative-scoring request", payload)
        if any(math.isnan(v) for row in out for v in row):
            raise _bad_response(io, "a generative-scoring request (a label is missing)", payload)
        usage = payload.get("usage") or {}
        io.traffic.add(prompt=usage.get("prompt_tokens", 0))
        return out

    async def _from_completions(
        self, io: Io, prompts: Sequence[Sequence[int]], labels: list[int]
    ) -> list[list[float]]:
        k = min(self.max_logprobs, max(20, len(labels)))
        tops = await self.top_logprobs(io, prompts, k)
        out: list[list[float]] = []
        missing: dict[int, list[int]] = {}
        floor: list[float] = []
        for i, top in enumerate(tops):
            found = dict(top)
            floor.append(min(found.values()) if found else 0.0)
            out.append([found.get(t, math.nan) for t in labels])
            for t in labels:
                if t not in found:
                    missing.setdefault(t, []).append(i)
        for label, rows in missing.items():
            # Forced read: +100 on the label makes it the sampled token; vLLM reports raw
            # log-probs (before logit bias) by default, so this is its exact log-prob.
            body = self._completion(
                [list(prompts[i]) for i in rows],
                max_tokens=1,
                temperature=0.0,
                top_k=-1,
                logprobs=0,
                logit_bias={str(label): FORCE_BIAS},
            )
            payload = await io.post("/v1/completions", body)
            col = labels.index(label)
            for i, c in zip(
                rows, self._choices(io, payload, len(rows), "a forced label read"), strict=True
            ):
                try:
                    token = _vllm_token_id(c["logprobs"]["tokens"][0])
                    value = float(c["logprobs"]["token_logprobs"][0])
                except (KeyError, TypeError, ValueError, IndexError):
                    raise _bad_response(io, "a forced label read", c) from None
                if token != label:
                    raise _bad_response(io, "a forced label read (the label was not chosen)", c)
                if value > floor[i] + 1e-4:
                    # A label outside the top k cannot be likelier than the k-th token:
                    # the server reports log-probs after the bias.
                    raise RainServerError(
                        f"{io.url}: the server reports log-probs after logit bias, so a "
                        "label outside the top-k cannot be read exactly; restart vLLM with "
                        "`--logprobs-mode raw_logprobs` (the default) or raise --max-logprobs",
                        url=io.url,
                    )
                out[i][col] = value
        return out


# --- SGLang --------------------------------------------------------------------------------


class SGLangDialect(Dialect):
    """SGLang's native ``/generate``."""

    name = "sglang"

    @classmethod
    async def probe(cls, io: Io) -> ServerInfo | None:
        info = await io.get("/get_model_info")
        if not isinstance(info, Mapping) or "model_path" not in info:
            return None
        out = ServerInfo(
            dialect=cls.name,
            model_path=str(info.get("tokenizer_path") or info["model_path"]),
            models=[str(info["model_path"])],
        )
        models = await io.get("/v1/models")
        for entry in (models or {}).get("data", []):
            name = str(entry.get("id"))
            if name not in out.models:
                out.models.append(name)
            if entry.get("max_model_len"):
                out.context_window = int(entry["max_model_len"])
        return out

    @staticmethod
    def _params(temperature: float, top_k: int, max_new_tokens: int, n: int = 1) -> dict[str, Any]:
        return {
            "n": int(n),
            "max_new_tokens": int(max_new_tokens),
            "temperature": float(temperature),
            "top_k": int(top_k) if top_k > 0 else -1,
            "top_p": 1.0,
            "min_p": 0.0,
            "frequency_penalty": 0.0,
            "presence_penalty": 0.0,
            "repetition_penalty": 1.0,
            "ignore_eos": False,
            "skip_special_tokens": False,
            "no_stop_trim": True,
        }

    @staticmethod
    def _outputs(io: Io, payload: Any, expected: int, what: str) -> list[Mapping[str, Any]]:
        outputs = payload if isinstance(payload, list) else [payload]
        if len(outputs) != expected or not all(
            isinstance(o, Mapping) and isinstance(o.get("meta_info"), Mapping) for o in outputs
        ):
            raise _bad_response(io, what, payload)
        for o in outputs:
            meta = o["meta_info"]
            io.traffic.add(
                prompt=meta.get("prompt_tokens", 0),
                cached=meta.get("cached_tokens", 0),
                completion=meta.get("completion_tokens", 0),
            )
        return outputs

    async def _first_positions(
        self,
        io: Io,
        prompts: Sequence[Sequence[int]],
        top_n: int,
        label_ids: Sequence[int] | None,
    ) -> list[Mapping[str, Any]]:
        body: dict[str, Any] = {
            "input_ids": [list(p) for p in prompts],
            "sampling_params": self._params(0.0, 0, 1),
            "return_logprob": True,
            "logprob_start_len": -1,
            "top_logprobs_num": int(top_n),
        }
        if label_ids is not None:
            body["token_ids_logprob"] = [int(t) for t in label_ids]
        if self.model:
            body["model"] = self.model
        payload = await io.post("/generate", body)
        return [o["meta_info"] for o in self._outputs(io, payload, len(prompts), "a /generate")]

    async def top_logprobs(
        self, io: Io, prefixes: Sequence[Sequence[int]], n: int
    ) -> list[list[tuple[int, float]]]:
        metas = await self._first_positions(io, prefixes, n, None)
        out = []
        for meta in metas:
            try:
                top = meta["output_top_logprobs"][0]
                out.append([(int(e[1]), float(e[0])) for e in top][:n])
            except (KeyError, TypeError, IndexError):
                raise _bad_response(io, "a top-tokens request", meta) from None
        return out

    async def sample(
        self,
        io: Io,
        prefix: Sequence[int],
        *,
        n: int,
        max_tokens: int,
        temperature: float,
        top_k: int,
        seed: int,
        json_schema: str | None = None,
    ) -> list[Row]:
        params = self._params(temperature, top_k, max_tokens, n)
        params["sampling_seed"] = int(seed) % (2**31)
        if json_schema is not None:
            params["json_schema"] = json_schema
        body: dict[str, Any] = {
            "input_ids": list(prefix),
            "sampling_params": params,
            "return_logprob": True,
            "logprob_start_len": -1,
            "top_logprobs_num": 0,
        }
        if self.model:
            body["model"] = self.model
        payload = await io.post("/generate", body)
        rows = []
        for o in self._outputs(io, payload, n, "a sampling request"):
            meta = o["meta_info"]
            try:
                entries = meta["output_token_logprobs"]
                ids = [int(e[1]) for e in entries]
                lps = [float(e[0]) for e in entries]
            except (KeyError, TypeError, IndexError):
                raise _bad_response(io, "a sampling request", o) from None
            finish = meta.get("finish_reason") or {}
            kind = finish.get("type") if isinstance(finish, Mapping) else finish
            rows.append(Row(ids, lps, "stop" if kind == "stop" else "length"))
        return rows

    async def label_logprobs(
        self, io: Io, prompts: Sequence[Sequence[int]], label_ids: Sequence[int]
    ) -> list[list[float]]:
        labels = [int(t) for t in label_ids]
        metas = await self._first_positions(io, prompts, 0, labels)
        out = []
        for meta in metas:
            try:
                entries = meta["output_token_ids_logprobs"][0]
                found = {int(e[1]): float(e[0]) for e in entries}
                out.append([found[t] for t in labels])
            except (KeyError, TypeError, IndexError):
                raise _bad_response(io, "a label read (token_ids_logprob)", meta) from None
        return out


DIALECTS: dict[str, type[Dialect]] = {
    LlamaCppDialect.name: LlamaCppDialect,
    VLLMDialect.name: VLLMDialect,
    SGLangDialect.name: SGLangDialect,
}
