"""Shared fixtures: a tiny random model (fast) and the real embedded SmolLM2 (integration)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture(scope="session")
def smol_tokenizer():
    """SmolLM2's real tokenizer (with its chat template), read from the bundled GGUF."""
    from transformers import AutoTokenizer

    from shared_core.models.hf import default_gguf_path

    path = default_gguf_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="session")
def tiny_model(smol_tokenizer):
    """A tiny random Llama built from a config: real transformers code, instant forward."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(smol_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.config.name_or_path = "tiny-random-llama"
    return model


@pytest.fixture(scope="session")
def tiny_engine(tiny_model, smol_tokenizer):
    """RainEngine over the tiny random model (the real backend and real embedder)."""
    from shared_core import RainEngine

    return RainEngine(model=tiny_model, tokenizer=smol_tokenizer, name="tiny-random-llama")


@pytest.fixture(scope="session")
def default_engine():
    """The embedded SmolLM2-135M-Instruct, loaded once per test session and shared."""
    from shared_core import load_engine

    return load_engine()


@pytest.fixture
def quick_config():
    """A small search so tests stay fast: a handful of iterations per commit."""
    from shared_core import RainConfig

    return RainConfig.paper(
        num_candidates=3,
        T=4,
        min_new_iterations=2,
        T_m=2,
        max_new_tokens=12,
        simulation_max_tokens=6,
        similarity_update=False,
        dynamic_addition=False,
    )
