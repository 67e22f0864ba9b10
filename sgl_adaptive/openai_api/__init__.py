"""An OpenAI-compatible HTTP front for adaptive Best-of-N (``sgl-adaptive serve``).

``protocol.py`` checks requests and shapes responses; ``server.py`` serves them (queue, limits, streaming,
shutdown). Importing this package imports neither torch nor sglang.
"""

from sgl_adaptive.openai_api.protocol import ApiError, ChatRequest, ServerLimits, parse_chat_request
from sgl_adaptive.openai_api.server import OpenAIServer, ServerOptions, serve_openai

__all__ = [
    "ApiError",
    "ChatRequest",
    "OpenAIServer",
    "ServerLimits",
    "ServerOptions",
    "parse_chat_request",
    "serve_openai",
]
