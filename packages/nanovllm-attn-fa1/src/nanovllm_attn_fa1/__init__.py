"""flash-attn 1 attention backend for nanovllm: NVIDIA Turing (sm75) in fp16, and newer GPUs by name."""
import torch

import nanovllm
from nanovllm import Context
from nanovllm.platform import flash_attn_version


class FlashAttention1(nanovllm.AttentionBackend):
    """Fresh prefills with ``flash_attn_unpadded_func``; decode, prefix-cached and chunked prefill and mixed
    batches with core's Triton paged-attention kernel (flash-attn 1 has no KV-cache API); K and V stored by
    core's Triton kernel."""

    name = "fa1"
    priority = 50
    device_types = ("cuda",)
    min_capability = (7, 5)
    max_capability = (7, 5)  # picked on Turing; on newer GPUs only by name (fa2 is faster there)
    dtypes = (torch.float16, torch.bfloat16)
    head_sizes = tuple(range(16, 129, 8))  # flash-attn 1: multiples of 8 up to 128
    cuda_graphs = True

    @classmethod
    def unsupported_reason(cls, platform, dtype, head_dim, block_size, by_name=False):
        if not (flash_attn_version() or "").startswith("1."):
            return "needs flash-attn 1.x installed (pip install 'flash-attn>=1.0.9,<2' --no-build-isolation)"
        if dtype == torch.bfloat16 and platform.capability and platform.capability < (8, 0):
            return "runs bf16 only on sm80 and newer: use dtype='float16' on this GPU"
        return super().unsupported_reason(platform, dtype, head_dim, block_size, by_name)

    def __init__(self, num_heads, head_dim, num_kv_heads, scale, config):
        super().__init__(num_heads, head_dim, num_kv_heads, scale, config)
        from flash_attn.flash_attn_interface import flash_attn_unpadded_func
        from nanovllm.kernels.store_kv import store_kv
        from nanovllm.kernels.paged_attention import paged_attention
        self._unpadded, self._store_kv, self._paged = flash_attn_unpadded_func, store_kv, paged_attention

    def forward(self, q, k, v, kv_cache, context: Context):
        if kv_cache.numel():
            self._store_kv(k, v, kv_cache, context.slot_mapping)
        if context.is_fresh_prefill or not kv_cache.numel():
            group = self.num_heads // self.num_kv_heads  # flash-attn 1 wants as many K/V heads as query heads
            return self._unpadded(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                  context.cu_seqlens_q, context.cu_seqlens_q, context.max_seqlen_q,
                                  context.max_seqlen_q, 0.0, softmax_scale=self.scale, causal=True)
        return self._paged(q, kv_cache, context.cu_seqlens_q, context.context_lens, context.block_tables,
                           context.max_seqlen_q, self.scale, work=context.prompt_work)


@nanovllm.hookimpl
def register_attention_backends(register):
    register(FlashAttention1)
