"""SnapKV for nanovllm: once a prompt is computed, each layer and KV head keeps only the KV entries that the
prompt's last queries attend to most, and the rest is freed (Li et al., "SnapKV: LLM Knows What You are
Looking for Before Generation", 2024).

    LLM(path, enable_snapkv=True, snapkv_limit=2048, snapkv_attn_sample_queries=128, snapkv_pool_kernel=7)
"""
import torch
import torch.nn.functional as F

import nanovllm

KEY_CHUNK = 4096  # keys scored at once: a 128-query window over 4096 keys and 32 heads is a 64 MiB fp32 tile


def window_attention(queries: torch.Tensor, keys: torch.Tensor, scale: float, chunk: int = KEY_CHUNK) -> torch.Tensor:
    """How much the observation window attends to each prompt key: float32 [kv_heads, num_keys].

    queries: the prompt's last ``window`` queries [window, heads, dim]; keys: the whole prompt's [num_keys,
    kv_heads, dim]. Softmax over all keys (causal inside the window), summed over the window's queries and over
    the query heads that share each KV head. Keys go in chunks, twice (the softmax's normaliser first), so the
    score tile stays small whatever the prompt's length; on CUDA two Triton kernels do the same in one sweep each.
    """
    if keys.is_cuda:
        from nanovllm_snapkv import kernels
        return kernels.window_attention(queries, keys, scale)
    window, num_heads, dim = queries.shape
    num_keys, num_kv_heads, _ = keys.shape
    group = num_heads // num_kv_heads
    # [kv_heads, group * window, dim]: query head h belongs to KV head h // group
    q = queries.float().view(window, num_kv_heads, group, dim).permute(1, 2, 0, 3).reshape(num_kv_heads, -1, dim)
    query_positions = (torch.arange(window, device=keys.device) + num_keys - window).repeat(group)

    def logits(start: int) -> torch.Tensor:  # [kv_heads, group * window, chunk]
        k = keys[start:start + chunk].float().permute(1, 2, 0)
        key_positions = torch.arange(start, start + k.size(-1), device=keys.device)
        causal = key_positions.unsqueeze(0) > query_positions.unsqueeze(1)
        return torch.bmm(q, k).mul_(scale).masked_fill_(causal, float("-inf"))

    starts = range(0, num_keys, chunk)
    normaliser = torch.stack([logits(start).logsumexp(dim=-1) for start in starts]).logsumexp(dim=0)
    return torch.cat([(logits(start) - normaliser.unsqueeze(-1)).exp_().sum(dim=1) for start in starts], dim=1)


def select_positions(scores: torch.Tensor, window: int, num_kept: int, kernel: int) -> torch.Tensor:
    """Per KV head, the ``num_kept - window`` prompt positions before the window with the highest max-pooled
    ``scores`` (ties to the earlier position), then the window's: int64 [kv_heads, num_kept]."""
    num_keys = scores.size(1)
    pooled = F.max_pool1d(scores[:, :num_keys - window], kernel, stride=1, padding=kernel // 2)
    top = pooled.argsort(dim=-1, descending=True, stable=True)[:, :num_kept - window]
    window_positions = torch.arange(num_keys - window, num_keys, device=scores.device).expand(scores.size(0), -1)
    return torch.cat([top, window_positions], dim=1)


class SnapKV(nanovllm.KVRetentionPolicy):
    """SnapKV: per layer and KV head, the prompt tokens its last queries attend to most, and those queries'."""

    name = "snapkv"
    priority = 100  # picked whenever enable_snapkv=True

    @classmethod
    def unsupported_reason(cls, config, by_name=False):
        if by_name or config.plugin_options["enable_snapkv"]:
            return None
        return "is used when enable_snapkv=True"

    def __init__(self, config):
        super().__init__(config)
        options = config.plugin_options
        self.window = options["snapkv_attn_sample_queries"]
        self.kernel = options["snapkv_pool_kernel"]
        self.limit = config.max_model_len if options["snapkv_limit"] is None else options["snapkv_limit"]
        for name, value in (("snapkv_attn_sample_queries", self.window), ("snapkv_pool_kernel", self.kernel),
                            ("snapkv_limit", self.limit)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.kernel % 2 == 0:
            raise ValueError(f"snapkv_pool_kernel={self.kernel} must be odd (the pooling window is centred on a key)")
        if self.limit < self.window:
            raise ValueError(f"snapkv_limit={self.limit} is below snapkv_attn_sample_queries={self.window}: the "
                             f"observation window is always kept; raise snapkv_limit or lower the window")

    def num_kept(self, num_prompt_tokens):
        return min(num_prompt_tokens, self.limit)

    def select(self, layer, queries, keys, num_kept, scale):
        return select_positions(window_attention(queries, keys, scale), queries.size(0), num_kept, self.kernel)


@nanovllm.hookimpl
def register_kv_retention_policies(register):
    register(SnapKV)


@nanovllm.hookimpl
def register_options(register):
    register("enable_snapkv", False, "keep only the KV entries each prompt's last queries attend to (SnapKV)")
    register("snapkv_limit", None, "SnapKV: KV entries kept per sequence, layer and KV head (default max_model_len)")
    register("snapkv_attn_sample_queries", 128, "SnapKV: the prompt's last queries that score its keys (the "
             "observation window, always kept)")
    register("snapkv_pool_kernel", 7, "SnapKV: keys max-pooled over this many neighbours before the top ones are kept")
