"""The Triton rotary kernel (QK norms and rotation in one launch) against the PyTorch path it replaces on CUDA:
under TRITON_INTERPRET=1 on CPU (CI), and compiled on a GPU."""
import pytest
import torch


def check_rotary(device, dtype, num_heads, num_kv_heads, head_dim, with_norms, atol):
    from nanovllm.kernels.rotary import rotate_queries_keys
    from nanovllm.layers.layernorm import RMSNorm
    from nanovllm.layers.rotary_embedding import RotaryEmbedding, apply_rotary
    torch.manual_seed(0)
    num_tokens, max_position = 7, 64
    with torch.device(device):
        rope = RotaryEmbedding(head_dim, max_position, 10000.0, {})
        norms = (RMSNorm(head_dim, 1e-6), RMSNorm(head_dim, 1e-5)) if with_norms else None
    for norm in norms or ():
        norm.weight.data = torch.rand(head_dim, device=device).add(0.5).to(dtype)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = torch.randn(num_tokens, q_size + 2 * kv_size, device=device).to(dtype)
    q = qkv[:, :q_size].view(num_tokens, num_heads, head_dim)  # strided views, as models pass
    k = qkv[:, q_size:q_size + kv_size].view(num_tokens, num_kv_heads, head_dim)
    positions = torch.tensor([0, 5, 63, 1, 17, 17, 40], device=device)
    out_q, out_k = rotate_queries_keys(positions, q, k, rope.cos_sin_cache, norms)
    if norms:
        q, k = norms[0](q), norms[1](k)
    ref_q, ref_k = apply_rotary(positions, q, k, rope.cos_sin_cache)
    for out, ref in ((out_q, ref_q), (out_k, ref_k)):
        assert out.is_contiguous() and out.dtype == ref.dtype
        torch.testing.assert_close(out, ref, rtol=0, atol=atol)


def check_interpreted():
    for num_heads, num_kv_heads, head_dim in [(4, 2, 16), (6, 2, 24), (3, 1, 8)]:  # heads and halves not powers of 2
        for with_norms in (False, True):
            check_rotary("cpu", torch.float32, num_heads, num_kv_heads, head_dim, with_norms, atol=1e-5)


def test_rotary_interpreted_on_cpu():
    from nanovllm.testing import run_interpreted
    run_interpreted(__file__, "check_interpreted")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [(16, 8, 128), (32, 8, 128), (6, 2, 80)])
@pytest.mark.parametrize("with_norms", [False, True])
def test_rotary_on_gpu(dtype, num_heads, num_kv_heads, head_dim, with_norms):
    # the kernel may round once less than the compiled norms (inductor keeps float32 between ops): one step apart
    check_rotary("cuda", dtype, num_heads, num_kv_heads, head_dim, with_norms, atol=0.07 if with_norms else 0.02)
