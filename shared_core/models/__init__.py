"""Language models behind one protocol.

- :mod:`shared_core.models.protocol` -- :class:`LanguageModel`: what the search asks
  of a model (top tokens, sampled continuations, label log-probs; batched, token ids);
- :mod:`shared_core.models.hf` -- :class:`TransformersBackend`, a transformers model in
  this process, with KV-cache prefix reuse (imports torch; loaded on first use);
- :mod:`shared_core.models.scripted` -- :class:`ScriptedLM`, a scripted character-level
  model in plain Python, for tests and for running without torch;
- :mod:`shared_core.models.decoding` -- the sampling loop the in-process backends share.

Importing this package does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shared_core.models.protocol import (
    Continuation,
    Grammar,
    LanguageModel,
    Message,
    SampleRequest,
    TopTokens,
    TopTokensRequest,
    WorkCounter,
)
from shared_core.models.scripted import ScriptedLM, choice_table

if TYPE_CHECKING:
    from shared_core.models.hf import TransformersBackend

__all__ = [
    "Continuation",
    "Grammar",
    "LanguageModel",
    "Message",
    "SampleRequest",
    "ScriptedLM",
    "TopTokens",
    "TopTokensRequest",
    "TransformersBackend",
    "WorkCounter",
    "choice_table",
]


def __getattr__(name: str) -> Any:
    # The transformers backend imports torch: only when it is asked for.
    if name == "TransformersBackend":
        from shared_core.models.hf import TransformersBackend

        return TransformersBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
