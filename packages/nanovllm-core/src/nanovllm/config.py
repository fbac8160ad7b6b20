import dataclasses
import glob
import logging
import os
from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, PretrainedConfig

from nanovllm import plugins
from nanovllm.platform import Platform, detect_platform
from nanovllm.sampling_params import checked_number, checked_seed

_DTYPES = {"float16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
logger = logging.getLogger(__name__)


def _checkpoint_dtype(hf_config) -> torch.dtype:
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    return (_DTYPES[dtype] if isinstance(dtype, str) else dtype) or torch.float32


def compute_dtype(checkpoint_dtype: torch.dtype, dtype: str, platform: Platform) -> torch.dtype:
    """``dtype`` unless "auto"; else the checkpoint's, with bf16 cast to fp16 on GPUs before sm80."""
    if dtype != "auto":
        return _DTYPES[dtype]
    if checkpoint_dtype == torch.bfloat16 and platform.device_type == "cuda" and platform.capability < (8, 0):
        return torch.float16
    return checkpoint_dtype


def option(default, help: str):
    """An engine option: a keyword of LLM() and a flag of the CLI, with its help."""
    return field(default=default, metadata={"help": help})


def engine_options() -> list[dataclasses.Field]:
    """The fields of Config that are LLM() keywords, in order."""
    return [f for f in dataclasses.fields(Config) if "help" in f.metadata]


# What an engine reads of a hub repository: weights, configs, tokenizer files (not other formats' weights).
HUB_FILES = ["*.safetensors", "*.json", "tokenizer.model", "*.tiktoken", "merges.txt", "vocab.txt"]


def resolve_model(model: str, download_dir: str | None = None) -> str:
    """A local folder as it is; a Hugging Face hub id (``owner/name``) from the local cache, else downloaded
    (safetensors, configs and tokenizer files only; HF_HUB_OFFLINE=1 forbids it)."""
    if os.path.isdir(model):
        return model
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model folder {model!r} does not exist; pass a local Hugging Face checkpoint folder "
                                f"(config.json, *.safetensors, tokenizer) or a hub id such as Qwen/Qwen3-0.6B")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:  # a snapshot that loading config or tokenizer alone left has no weights: it does not count
        folder = snapshot_download(model, cache_dir=download_dir, allow_patterns=HUB_FILES, local_files_only=True)
        if os.path.isfile(os.path.join(folder, "config.json")) and glob.glob(os.path.join(folder, "*.safetensors")):
            return folder
    except LocalEntryNotFoundError:
        pass
    cache = download_dir or constants.HF_HUB_CACHE
    if constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(f"{model!r} is not a local folder nor in the Hugging Face cache {cache}, and "
                                f"HF_HUB_OFFLINE is set: download it once online, or pass a local folder")
    logger.info("downloading %s from the Hugging Face hub into %s", model, cache)
    try:
        return snapshot_download(model, cache_dir=download_dir, allow_patterns=HUB_FILES)
    except Exception as exc:  # unreachable hub, unknown or gated repository: all end here
        raise FileNotFoundError(f"{model!r} is not a local folder nor in the Hugging Face cache {cache}, and the hub "
                                f"could not provide it ({type(exc).__name__}: {exc}); check the id and the network, "
                                f"or pass a local folder") from None


@dataclass
class Config:
    """Engine options; every field is a keyword of ``LLM(model, ...)``."""

    model: str
    max_num_batched_tokens: int = option(16384, "tokens computed per step")
    max_num_seqs: int = option(512, "sequences running at once")
    max_model_len: int | None = option(None, "longest prompt plus output; default: the model's maximum, lowered "
                                             "to what the KV cache holds")
    gpu_memory_utilization: float = option(0.9, "share of GPU memory for weights, activations and KV cache")
    kv_cache_memory_gib: float | None = option(None, "KV cache budget in GiB; default: measured on CUDA, 1 on MPS, "
                                                     "2 on CPU")
    num_kvcache_blocks: int | None = option(None, "KV cache size in blocks, overriding every memory-based sizing")
    kvcache_block_size: int = option(256, "tokens per KV block")
    tensor_parallel_size: int = option(1, "ranks (processes): gloo on CPU, NCCL on CUDA")
    enforce_eager: bool = option(False, "no CUDA graphs")
    enable_prefix_caching: bool = option(True, "reuse KV blocks of shared prompt prefixes")
    enable_chunked_prefill: bool = option(True, "split long prompts over steps, mixed with decodes")
    long_prefill_token_threshold: int = option(0, "chunked prefill: most tokens one prompt computes per step, and a "
                                                  "longer prompt leaves room in the step for waiting ones that are not, "
                                                  "so that decodes and short prompts are not held up (0: no cap)")
    async_scheduling: bool = option(True, "prepare step N+1 while step N runs")
    dtype: str = option("auto", "auto (the checkpoint's), float16, bfloat16 or float32")
    attention_backend: str | None = option(None, "an attention backend by name (default: the best installed)")
    tokenizer: str | None = option(None, "a folder (or hub id) with the tokenizer files, when the model's has none")
    expert_manager: str | None = option(None, "how MoE experts are stored: resident, offload, or a plugin's")
    kv_retention: str | None = option(None, "which prompt KV to keep once computed: keep-all, recent, or a "
                                            "plugin's")
    download_dir: str | None = option(None, "where hub models are cached (default: Hugging Face's cache)")
    seed: int | None = option(None, "seeds the sampling of requests without their own seed: runs repeat")
    plugin_options: dict = field(default_factory=dict)
    hf_config: PretrainedConfig | None = None
    eos_token_ids: frozenset[int] = frozenset()

    @classmethod
    def from_options(cls, model: str, **options) -> "Config":
        """Build a Config from ``LLM(...)`` keywords; unknown keywords fail with the known ones."""
        known = {f.name for f in engine_options()}
        extra = plugins.plugin_options()
        if known & set(extra):
            raise ValueError(f"plugin option(s) {sorted(known & set(extra))} would shadow core options of the same "
                             f"name; rename them in the plugin")
        unknown = sorted(set(options) - known - set(extra))
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(map(repr, unknown))} for LLM(); known options: "
                            f"{', '.join(sorted(known | set(extra)))}")
        plugin_values = {name: options.pop(name, opt.default) for name, opt in extra.items()}
        return cls(model, plugin_options=plugin_values, **options)

    def __post_init__(self):
        self.model = resolve_model(self.model, self.download_dir)
        if self.tokenizer is not None:
            self.tokenizer = resolve_model(self.tokenizer, self.download_dir)
        positive = ("max_num_batched_tokens", "max_num_seqs", "max_model_len", "kvcache_block_size", "tensor_parallel_size")
        for name in positive:
            value = getattr(self, name)
            if name == "max_model_len" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        self.gpu_memory_utilization = checked_number("gpu_memory_utilization", self.gpu_memory_utilization)
        if self.kv_cache_memory_gib is not None:
            self.kv_cache_memory_gib = checked_number("kv_cache_memory_gib", self.kv_cache_memory_gib)
            if self.kv_cache_memory_gib <= 0:
                raise ValueError(f"kv_cache_memory_gib={self.kv_cache_memory_gib} must be positive")
        for name in ("enforce_eager", "enable_prefix_caching", "enable_chunked_prefill", "async_scheduling"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(f"{name}={value!r} is a {type(value).__name__}; give True or False")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1]")
        if self.num_kvcache_blocks is not None:
            self.num_kvcache_blocks = checked_number("num_kvcache_blocks", self.num_kvcache_blocks, integer=True)
        if self.num_kvcache_blocks is not None and self.num_kvcache_blocks < 1:
            raise ValueError(f"num_kvcache_blocks={self.num_kvcache_blocks} must be a positive integer or None")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not one of auto, {', '.join(_DTYPES)}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} is below max_num_seqs="
                             f"{self.max_num_seqs}: a step must fit one token of every running sequence")
        if self.hf_config is None:
            if not os.path.isfile(os.path.join(self.model, "config.json")):
                raise FileNotFoundError(f"{self.model!r} has no config.json: it is not a Hugging Face checkpoint "
                                        f"folder (config.json, *.safetensors, tokenizer files)")
            self.hf_config = AutoConfig.from_pretrained(self.model)
        self._check_tensor_parallel_split()
        model_max = self.hf_config.max_position_embeddings
        self.max_model_len_is_default = self.max_model_len is None
        if self.max_model_len_is_default:  # chunked prefill off: a prompt must fit one step
            self.max_model_len = (model_max if self.enable_chunked_prefill
                                  else min(model_max, self.max_num_batched_tokens))
        self.max_model_len = min(self.max_model_len, model_max)
        if self.seed is not None:
            self.seed = checked_seed("seed", self.seed)
        threshold = self.long_prefill_token_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0:
            raise ValueError(f"long_prefill_token_threshold={threshold!r} must be a non-negative integer (0: no cap)")
        if threshold and not self.enable_chunked_prefill:
            raise ValueError(f"long_prefill_token_threshold={threshold} splits prompts over steps, which needs "
                             f"enable_chunked_prefill=True; set that or leave the threshold at 0")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} is below max_model_len="
                             f"{self.max_model_len} with chunked prefill off: a long prompt could never be "
                             f"scheduled; raise it or enable_chunked_prefill=True")
        if self.dtype == "auto" and _checkpoint_dtype(self.hf_config) == torch.bfloat16 != self.torch_dtype:
            logger.warning("%s has no bf16: the bf16 checkpoint runs in float16 (dtype= chooses otherwise)",
                           detect_platform().describe())
        eos = self.hf_config.eos_token_id
        self.eos_token_ids = frozenset(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])

    def fit_kv_capacity(self, num_blocks: int):
        """A default max_model_len that the KV cache cannot hold is lowered to what it holds, with a warning; a
        given one is an error."""
        tokens = max(num_blocks, 0) * self.kvcache_block_size
        if tokens >= self.max_model_len:
            return
        if not self.max_model_len_is_default or tokens == 0:
            raise ValueError(f"the KV cache holds {tokens} tokens ({max(num_blocks, 0)} blocks of "
                             f"{self.kvcache_block_size}), fewer than max_model_len={self.max_model_len}: lower "
                             f"max_model_len, or give the cache more memory (gpu_memory_utilization, "
                             f"kv_cache_memory_gib or num_kvcache_blocks)")
        logger.warning("max_model_len lowered from %d (the model's maximum) to %d, what the KV cache holds (%d "
                       "blocks of %d); give the cache more memory or set max_model_len", self.max_model_len, tokens,
                       num_blocks, self.kvcache_block_size)
        self.max_model_len = tokens

    def _check_tensor_parallel_split(self):
        """Each rank takes an equal share of the heads and of the MLP's width: name the dimension that does not
        split, before any rank starts."""
        tp, hf = self.tensor_parallel_size, self.hf_config
        dims = ("num_attention_heads", "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size")
        for name in dims:
            value = getattr(hf, name, None)
            if value and value % tp:
                divisors = [d for d in range(1, value + 1) if value % d == 0 and d <= 8]
                raise ValueError(f"tensor_parallel_size={tp} does not divide this model's {name}={value}: use one "
                                 f"of {divisors}")
        kv_heads = getattr(hf, "num_key_value_heads", None)
        if kv_heads and kv_heads % tp and tp % kv_heads:
            raise ValueError(f"tensor_parallel_size={tp} can neither split nor replicate this model's "
                             f"num_key_value_heads={kv_heads}: use a divisor or a multiple of {kv_heads}")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The compute dtype: ``dtype``, or the checkpoint's, with bf16 cast to fp16 on GPUs before sm80."""
        return compute_dtype(_checkpoint_dtype(self.hf_config), self.dtype, detect_platform())
