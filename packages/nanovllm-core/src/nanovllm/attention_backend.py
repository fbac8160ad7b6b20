"""The attention-backend interface and the choice of a backend for the detected platform."""
import os

import torch

from nanovllm.engine.context import Context
from nanovllm.platform import Platform
from nanovllm.plugins import choose


class AttentionBackend:
    """Base class of attention backends. A plugin subclasses it and registers the class.

    Class attributes state what the backend supports; the engine checks them before loading
    the model. An instance serves one attention layer; ``config`` is the engine's ``Config``
    (``config.plugin_options`` holds plugin options).
    """

    name: str = ""
    priority: int = 0  # the highest-priority supported backend wins
    device_types: tuple[str, ...] = ()  # where it runs when asked for by name
    default_device_types: tuple[str, ...] | None = None  # where it may be picked unasked (None: device_types)
    min_capability: tuple[int, int] | None = None  # CUDA only
    max_capability: tuple[int, int] | None = None  # newest CUDA capability it is picked for unasked
    dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)
    head_sizes: tuple[int, ...] | None = None  # None: any
    block_size_multiple: int = 1
    cuda_graphs: bool = False  # steps may be captured in CUDA graphs: no host syncs in forward, and a grid
    # fixed by the shapes when Context.captured

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float, config):
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.scale = scale
        self.config = config

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                context: Context) -> torch.Tensor:
        """Store this step's K and V into ``kv_cache`` and return attention output.

        q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim];
        kv_cache: [2, num_blocks, block_size, num_kv_heads, head_dim], or empty during the
        warm-up pass (then every sequence is a plain prefill of its own tokens).
        Returns [num_tokens, num_heads, head_dim].
        """
        raise NotImplementedError

    @classmethod
    def unsupported_reason(cls, platform: Platform, dtype: torch.dtype, head_dim: int, block_size: int,
                           by_name: bool = False) -> str | None:
        """Why this backend cannot run the given setting, or None when it can."""
        if platform.device_type not in cls.device_types:
            return f"runs on {'/'.join(cls.device_types)}, not {platform.device_type}"
        default = cls.device_types if cls.default_device_types is None else cls.default_device_types
        if not by_name and platform.device_type not in default:
            return f"is used on {platform.device_type} only when asked for by name"
        if cls.min_capability and platform.capability and platform.capability < cls.min_capability:
            return f"needs compute capability {'.'.join(map(str, cls.min_capability))} or newer"
        if not by_name and cls.max_capability and platform.capability and platform.capability > cls.max_capability:
            return (f"is picked up to compute capability {'.'.join(map(str, cls.max_capability))} unless asked "
                    f"for by name")
        if dtype not in cls.dtypes:
            return f"supports dtypes {', '.join(str(d).removeprefix('torch.') for d in cls.dtypes)}, not {str(dtype).removeprefix('torch.')}"
        if cls.head_sizes is not None and head_dim not in cls.head_sizes:
            return f"supports head sizes {cls.head_sizes}, not {head_dim}"
        if block_size % cls.block_size_multiple:
            return f"needs kvcache_block_size to be a multiple of {cls.block_size_multiple}, not {block_size}"
        return None


# Which package to install for each platform when no installed backend fits.
def recommended_package(platform: Platform) -> str:
    if platform.device_type == "cuda":
        return "nanovllm-attn-fa2" if platform.capability >= (8, 0) else "nanovllm-attn-fa1"
    return "nanovllm-attn-mps"


def select_backend(backends: dict[str, type[AttentionBackend]], platform: Platform, dtype: torch.dtype,
                   head_dim: int, block_size: int, requested: str | None = None) -> tuple[type[AttentionBackend], str]:
    """Return the backend class to use and a sentence saying why."""
    requested = requested or os.environ.get("NANOVLLM_ATTENTION_BACKEND") or None
    setting = (f"{platform.describe()} with dtype {str(dtype).removeprefix('torch.')}, head size {head_dim} and "
               f"block size {block_size}")
    try:
        return choose(backends, lambda cls, by_name: cls.unsupported_reason(platform, dtype, head_dim, block_size,
                                                                            by_name),
                      requested, "attention_backend", "backend", setting)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}. Install {recommended_package(platform)}.") from None
