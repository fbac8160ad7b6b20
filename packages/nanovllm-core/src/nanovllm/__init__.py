"""nanovllm: a small, fast offline LLM inference engine with a vLLM-style API.

Users need ``LLM``, ``SamplingParams`` and ``EngineDeadError`` (a tensor-parallel rank failed); plugin
authors also get here what plugins build on: the hook
marker, the interfaces of attention backends, expert managers and KV-retention policies, the per-step
``Context`` attention reads, and the shared Triton ``kernels``.
"""
import logging
import os

from nanovllm import kernels
from nanovllm.attention_backend import AttentionBackend
from nanovllm.cli.info import print_attention_backend_info
from nanovllm.config import Config
from nanovllm.engine.context import Context, get_context
from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.engine.workers import EngineDeadError
from nanovllm.expert_manager import ExpertManager
from nanovllm.hookspecs import hookimpl
from nanovllm.kv_retention import KVRetentionPolicy
from nanovllm.llm import LLM
from nanovllm.platform import Platform, detect_platform
from nanovllm.sampling_params import SamplingParams

# As vLLM does: nanovllm's own handler, not propagated (no line twice under an application's root handler);
# NANOVLLM_CONFIGURE_LOGGING=0 leaves the "nanovllm" logger to the application.
if os.environ.get("NANOVLLM_CONFIGURE_LOGGING", "1") != "0":
    _logger = logging.getLogger("nanovllm")
    _logger.setLevel(os.environ.get("NANOVLLM_LOG_LEVEL", "INFO").upper())
    if not _logger.handlers:
        _handler = logging.StreamHandler()
        _handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        _logger.addHandler(_handler)
    _logger.propagate = False

__all__ = ["LLM", "LLMEngine", "SamplingParams", "EngineDeadError", "Config", "hookimpl", "AttentionBackend",
           "ExpertManager",
           "KVRetentionPolicy", "Context", "get_context", "kernels", "Platform", "detect_platform",
           "print_attention_backend_info"]
