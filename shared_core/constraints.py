"""Constrained decoding: which tokens may come next (e.g. valid JSON for a schema).

The in-process transformers backend turns a request's
:class:`~shared_core.models.protocol.Grammar` into a :class:`JSONSchemaConstraint`
and asks it before every token it chooses -- the search's candidate token sets,
rollouts and greedy finish -- with the response tokens of that branch. Because
the question carries the whole branch, a rewind of the search needs no state
to undo: a stateful matcher (xgrammar) rolls back to the common prefix.
"""

from __future__ import annotations

import json
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from shared_core.errors import RainInputError

__all__ = ["JSONSchemaConstraint", "TokenConstraint"]


class TokenConstraint(ABC):
    """Restricts the next token given the response tokens generated so far."""

    @abstractmethod
    def allowed(self, response_ids: Sequence[int]) -> np.ndarray | None:
        """``[vocab]`` bool mask of allowed next tokens, or ``None`` for no restriction.

        The end-of-text token must be allowed exactly when the response is complete.
        """


# Compiling a grammar costs ~0.15 s and building the tokenizer's vocabulary table
# more; both depend only on (tokenizer, vocab size, stops, schema), so share them.
_COMPILERS: dict[tuple[int, int, tuple[int, ...]], Any] = {}
_GRAMMARS: OrderedDict[tuple[int, int, tuple[int, ...], str], Any] = OrderedDict()
_GRAMMAR_CACHE_SIZE = 32
_XGR_LOCK = threading.Lock()


def _compiled_json_grammar(
    tokenizer: Any, vocab_size: int, stop_ids: tuple[int, ...], schema_json: str
) -> Any:
    import xgrammar as xgr

    tok_key = (id(tokenizer), vocab_size, stop_ids)
    with _XGR_LOCK:
        grammar = _GRAMMARS.get((*tok_key, schema_json))
        if grammar is not None:
            _GRAMMARS.move_to_end((*tok_key, schema_json))
            return grammar
        compiler = _COMPILERS.get(tok_key)
        if compiler is None:
            info = xgr.TokenizerInfo.from_huggingface(
                tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_ids)
            )
            compiler = xgr.GrammarCompiler(info, max_threads=1)
            _COMPILERS[tok_key] = compiler
        try:
            # Compact JSON: a small model given free whitespace tends to spend its
            # token budget on indentation.
            grammar = compiler.compile_json_schema(
                schema_json, any_whitespace=False, separators=(",", ":")
            )
        except Exception as exc:
            raise RainInputError(
                f"cannot build a decoding grammar for this JSON schema: {exc}; "
                "simplify the schema (xgrammar supports the common JSON Schema keywords)"
            ) from exc
        _GRAMMARS[(*tok_key, schema_json)] = grammar
        if len(_GRAMMARS) > _GRAMMAR_CACHE_SIZE:
            _GRAMMARS.popitem(last=False)
        return grammar


class JSONSchemaConstraint(TokenConstraint):
    """Only JSON text valid for ``schema`` may be generated (xgrammar).

    One xgrammar matcher follows whichever branch the search asks about: it
    rolls back to the common prefix with the previous question and accepts the
    rest, so a rewind of the search rewinds the grammar state too. Masks of
    recent prefixes are memoised because the search asks about the same node
    repeatedly. Not thread-safe: use one instance per generation.
    """

    def __init__(
        self,
        schema: Mapping[str, Any] | str,
        tokenizer: Any,
        *,
        vocab_size: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
        mask_cache_size: int = 64,
    ) -> None:
        """``tokenizer``: a Hugging Face tokenizer; ``vocab_size``: the model's logits width.

        ``stop_token_ids``: the end-of-answer tokens allowed once the JSON is
        complete (default: the tokenizer's eos token).
        """
        import xgrammar as xgr

        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise RainInputError(f"the JSON schema is not valid JSON: {exc}") from None
        if not isinstance(schema, Mapping):
            raise RainInputError(
                f"a JSON schema must be a dict, got {type(schema).__name__}; "
                'pass e.g. {"type": "object", "properties": {...}}'
            )
        stops = list(stop_token_ids) if stop_token_ids else [tokenizer.eos_token_id]
        if any(s is None for s in stops):
            raise RainInputError("the tokenizer has no eos token; pass stop_token_ids=[...]")
        self.schema = dict(schema)
        self.vocab_size = int(vocab_size or len(tokenizer))
        self.stop_token_ids = tuple(sorted(int(s) for s in stops))
        grammar = _compiled_json_grammar(
            tokenizer,
            self.vocab_size,
            self.stop_token_ids,
            json.dumps(self.schema),  # key order matters: properties are generated in order
        )
        self._matcher = xgr.GrammarMatcher(grammar)
        self._bitmask = xgr.allocate_token_bitmask(1, self.vocab_size)
        self._accepted: list[int] = []
        self._masks: OrderedDict[tuple[int, ...], np.ndarray] = OrderedDict()
        self._cache_size = mask_cache_size
        self._stop_only = np.zeros(self.vocab_size, dtype=bool)
        self._stop_only[list(self.stop_token_ids)] = True

    def allowed(self, response_ids: Sequence[int]) -> np.ndarray:
        key = tuple(int(t) for t in response_ids)
        mask = self._masks.get(key)
        if mask is not None:
            self._masks.move_to_end(key)
            return mask
        mask = self._compute(key)
        self._masks[key] = mask
        if len(self._masks) > self._cache_size:
            self._masks.popitem(last=False)
        return mask

    def is_complete(self, response_ids: Sequence[int]) -> bool:
        """Whether ``response_ids`` is a whole valid document (the end may come next)."""
        return bool(self.allowed(response_ids)[list(self.stop_token_ids)].any())

    def _compute(self, ids: tuple[int, ...]) -> np.ndarray:
        common = 0
        for a, b in zip(self._accepted, ids, strict=False):
            if a != b:
                break
            common += 1
        if common < len(self._accepted):
            self._matcher.rollback(len(self._accepted) - common)
            del self._accepted[common:]
        for tok in ids[common:]:
            if self._matcher.is_terminated() or not self._matcher.accept_token(tok):
                # A branch the grammar never allowed (or text past the end):
                # only ending the answer is left.
                return self._stop_only
            self._accepted.append(tok)
        if self._matcher.is_terminated():
            return self._stop_only
        self._matcher.fill_next_token_bitmask(self._bitmask)
        words = self._bitmask[0].numpy().view(np.uint32)
        bits = np.unpackbits(words.view(np.uint8), bitorder="little")
        return bits[: self.vocab_size].astype(bool)
