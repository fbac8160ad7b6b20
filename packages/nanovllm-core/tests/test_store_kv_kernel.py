"""The Triton KV-store kernel: under TRITON_INTERPRET=1 on CPU (CI), and compiled on a GPU."""
import pytest
import torch


def check_store(module, device, dtype, num_kv_heads, head_dim):
    num_blocks, block_size, num_tokens = 6, 4, 9
    kv_cache = torch.zeros(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
    q_size, kv_size = 2 * num_kv_heads * head_dim, num_kv_heads * head_dim
    qkv = torch.randn(num_tokens, q_size + 2 * kv_size, device=device).to(dtype)
    k = qkv[:, q_size:q_size + kv_size].view(num_tokens, num_kv_heads, head_dim)  # strided views, as models pass
    v = qkv[:, q_size + kv_size:].view(num_tokens, num_kv_heads, head_dim)
    slots = torch.tensor([5, -1, 0, 23, 8, 9, -1, 17, 2], device=device)
    module.store_kv(k, v, kv_cache, slots)
    keep = slots >= 0
    flat_k = kv_cache[0].view(-1, num_kv_heads, head_dim)
    flat_v = kv_cache[1].view(-1, num_kv_heads, head_dim)
    assert torch.equal(flat_k[slots[keep]], k[keep])
    assert torch.equal(flat_v[slots[keep]], v[keep])
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool, device=device)
    untouched[slots[keep]] = False
    assert not flat_k[untouched].any() and not flat_v[untouched].any()


def check_interpreted():
    from nanovllm.kernels import store_kv
    for num_kv_heads, head_dim in [(2, 8), (3, 16)]:  # rows of 16 and 48 (not a power of 2)
        check_store(store_kv, "cpu", torch.float32, num_kv_heads, head_dim)


def test_store_kv_interpreted_on_cpu():
    from nanovllm.testing import run_interpreted
    run_interpreted(__file__, "check_interpreted")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_kv_heads, head_dim", [(8, 128), (2, 64), (3, 80)])
def test_store_kv_on_gpu(dtype, num_kv_heads, head_dim):
    from nanovllm.kernels import store_kv
    check_store(store_kv, "cuda", dtype, num_kv_heads, head_dim)
