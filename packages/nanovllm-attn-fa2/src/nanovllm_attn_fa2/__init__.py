"""flash-attn 2 attention backend for nanovllm: NVIDIA Ampere and newer (sm80+), fp16 and bf16."""
import torch

import nanovllm
from nanovllm import Context
from nanovllm.platform import flash_attn_version


class FlashAttention2(nanovllm.AttentionBackend):
    """Prefill and mixed batches run eagerly with ``flash_attn_varlen_func`` over the paged cache
    (``block_table``); decode and steps replayed from CUDA graphs with core's Triton paged-attention kernel (its
    grid is fixed by the shapes; decode keys split at small batches), with which the throughput benchmark runs
    faster than with ``flash_attn_with_kvcache`` on an H200; K and V stored by core's Triton kernel."""

    name = "fa2"
    priority = 100
    device_types = ("cuda",)
    min_capability = (8, 0)
    dtypes = (torch.float16, torch.bfloat16)
    head_sizes = (32, 64, 96, 128, 160, 192, 224, 256)
    cuda_graphs = True
    block_size_multiple = 256  # flash-attn's paged KV needs page sizes divisible by 256

    @classmethod
    def unsupported_reason(cls, platform, dtype, head_dim, block_size, by_name=False):
        if not (flash_attn_version() or "").startswith("2."):
            return "needs flash-attn 2.x installed (pip install flash-attn --no-build-isolation)"
        return super().unsupported_reason(platform, dtype, head_dim, block_size, by_name)

    def __init__(self, num_heads, head_dim, num_kv_heads, scale, config):
        super().__init__(num_heads, head_dim, num_kv_heads, scale, config)
        from flash_attn import flash_attn_varlen_func
        from nanovllm.kernels.paged_attention import paged_attention
        from nanovllm.kernels.store_kv import store_kv
        self._varlen, self._paged, self._store_kv = flash_attn_varlen_func, paged_attention, store_kv

    def forward(self, q, k, v, kv_cache, context: Context):
        if kv_cache.numel():  # empty in the warm-up
            self._store_kv(k, v, kv_cache, context.slot_mapping)
        if not kv_cache.numel() or context.is_fresh_prefill:
            # the keys are the step's own tokens: flash-attn's prefill kernel (with a block table it runs its
            # split-KV one: 12 of 42 ms of GPU in the throughput benchmark's 16k-token prompt steps, H100)
            return self._varlen(q, k, v, context.cu_seqlens_q, context.cu_seqlens_q, context.max_seqlen_q,
                                context.max_seqlen_q, softmax_scale=self.scale, causal=True)
        if context.is_decode or context.captured:
            return self._paged(q, kv_cache, context.cu_seqlens_q, context.context_lens, context.block_tables,
                               context.max_seqlen_q, self.scale, work=context.prompt_work)
        return self._varlen(q, kv_cache[0], kv_cache[1], context.cu_seqlens_q, context.cu_seqlens_k,
                            context.max_seqlen_q, context.max_seqlen_k, softmax_scale=self.scale, causal=True,
                            block_table=context.block_tables)


@nanovllm.hookimpl
def register_attention_backends(register):
    register(FlashAttention2)
