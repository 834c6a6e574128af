"""RAIN for LlamaIndex: ``RainLLM`` and the ``rain_rubric`` context manager."""

from llama_index_rain.base import RainLLM, current_rain_rubric, rain_rubric

__all__ = ["RainLLM", "current_rain_rubric", "rain_rubric"]
