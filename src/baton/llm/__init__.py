"""The LLM side: providers, the gateway, and the tasks that call models."""

from baton.llm.config import LLMConfig, ModelConfig
from baton.llm.gateway import Gateway
from baton.llm.types import ChatRequest, ChatResponse, Message, ProviderError, Usage

__all__ = [
    "ChatRequest",
    "ChatResponse",
    "Gateway",
    "LLMConfig",
    "Message",
    "ModelConfig",
    "ProviderError",
    "Usage",
]
