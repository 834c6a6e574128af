"""RAIN -- Rewindable Auto-regressive INference (Li et al., ICLR 2024).

A frozen language model searches over its own continuations, judges them
against a preference (a rubric) with a self-evaluation prompt, rewinds bad
branches and commits only what survives.
"""

from shared_core.config import RainConfig, build_config
from shared_core.embeddings import Embedder, SentenceEmbedder
from shared_core.engine import RainEngine, RainResult, RainStream, load_engine
from shared_core.errors import RainConfigError, RainError, RainInputError, RubricError
from shared_core.evaluation import EvalSession, Evaluator, Judgement, SelfEvaluator
from shared_core.models import Continuation, Grammar, LanguageModel, ScriptedLM
from shared_core.rubric import PRESETS, Rubric, RubricExample, RubricOption, get_rubric
from shared_core.search import Commit, RainCancelled, SearchStats

__all__ = [
    "PRESETS",
    "Commit",
    "Continuation",
    "Embedder",
    "EvalSession",
    "Evaluator",
    "Grammar",
    "Judgement",
    "LanguageModel",
    "RainCancelled",
    "RainConfig",
    "RainConfigError",
    "RainEngine",
    "RainError",
    "RainInputError",
    "RainResult",
    "RainStream",
    "Rubric",
    "RubricError",
    "RubricExample",
    "RubricOption",
    "ScriptedLM",
    "SearchStats",
    "SelfEvaluator",
    "SentenceEmbedder",
    "build_config",
    "get_rubric",
    "load_engine",
]
