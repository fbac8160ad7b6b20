"""nanovllm: a small, fast offline LLM inference engine with a vLLM-style API."""
import logging
import os

import pluggy

hookimpl = pluggy.HookimplMarker("nanovllm")

_logger = logging.getLogger("nanovllm")
_logger.setLevel(os.environ.get("NANOVLLM_LOG_LEVEL", "INFO").upper())
if not _logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    _logger.addHandler(_handler)

from nanovllm.attention import AttentionBackend  # noqa: E402
from nanovllm.config import Config  # noqa: E402
from nanovllm.info import print_attention_backend_info  # noqa: E402
from nanovllm.llm import LLM  # noqa: E402
from nanovllm.llm_engine import LLMEngine  # noqa: E402
from nanovllm.sampling_params import SamplingParams  # noqa: E402

__all__ = ["LLM", "LLMEngine", "SamplingParams", "Config", "AttentionBackend", "hookimpl",
           "print_attention_backend_info"]
