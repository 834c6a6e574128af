"""RAIN for LangChain: :class:`ChatRain`, a chat model aligned by self-evaluated search."""

from langchain_rain.chat_models import ChatRain

__all__ = ["ChatRain"]
