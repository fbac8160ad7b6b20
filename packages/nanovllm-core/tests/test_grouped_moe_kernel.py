"""The Triton grouped-MoE kernel against the per-expert reference: under TRITON_INTERPRET=1 on CPU and on a GPU."""
import pytest
import torch

from nanovllm.layers.moe import grouped_experts


def check(grouped_moe, device, dtype, tokens=13, hidden=32, inter=24, experts=5, top_k=2, tol=1e-4):
    torch.manual_seed(0)
    x = torch.randn(tokens, hidden, device=device).to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, device=device) / hidden ** 0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, device=device) / inter ** 0.5).to(dtype)
    probs = torch.randn(tokens, experts, device=device).softmax(-1)
    weights, ids = probs.topk(top_k, dim=-1)
    ids[0, -1] = experts - 1  # the last expert gets a pair; others may get none
    expected = grouped_experts(x.float(), weights, ids, lambda e: (w13[e].float(), w2[e].float()))
    out = grouped_moe(x, w13, w2, weights, ids)
    error = (out.float() - expected).abs().max().item()
    assert error < tol, f"max error {error}"


def check_skipped_pairs(device, dtype, tokens=9, hidden=32, inter=24, experts=4, top_k=2, tol=1e-4):
    """Pairs whose id is E (not computed this round) keep their rows; the others hold their weighted expert output."""
    from nanovllm.kernels.grouped_moe import grouped_moe_pairs
    from nanovllm.layers.activation import silu_and_mul
    torch.manual_seed(1)
    x = torch.randn(tokens, hidden, device=device).to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, device=device) / hidden ** 0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, device=device) / inter ** 0.5).to(dtype)
    weights = torch.rand(tokens, top_k, device=device)
    ids = torch.randint(0, experts + 1, (tokens, top_k), device=device)
    ids[0] = torch.tensor([experts, experts - 1])
    out = torch.full((tokens * top_k, hidden), 7.0, device=device, dtype=dtype)
    grouped_moe_pairs(x, w13, w2, weights, ids, out)
    for pair, expert in enumerate(ids.flatten().tolist()):
        token = pair // top_k
        if expert == experts:
            assert (out[pair] == 7.0).all(), f"skipped pair {pair} was written"
            continue
        expected = weights.flatten()[pair] * (silu_and_mul(x[token].float() @ w13[expert].float().t())
                                              @ w2[expert].float().t())
        error = (out[pair].float() - expected).abs().max().item()
        assert error < tol, f"pair {pair}: max error {error}"


def check_split_k(device, dtype, splits=3, tokens=3, hidden=32, inter=600, experts=4, top_k=2, tol=1e-4):
    """With the down matmul's K in splits, the splits of each pair add up to its weighted expert output."""
    from nanovllm.kernels.grouped_moe import grouped_moe_pairs
    torch.manual_seed(3)
    x = torch.randn(tokens, hidden, device=device).to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, device=device) / hidden ** 0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, device=device) / inter ** 0.5).to(dtype)
    weights, ids = torch.randn(tokens, experts, device=device).softmax(-1).topk(top_k, dim=-1)
    out = torch.empty(tokens * top_k * splits, hidden, device=device)
    grouped_moe_pairs(x, w13, w2, weights, ids, out)
    expected = grouped_experts(x.float(), weights, ids, lambda e: (w13[e].float(), w2[e].float()))
    error = (out.view(tokens, top_k * splits, hidden).sum(1) - expected).abs().max().item()
    assert error < tol, f"max error {error}"
    assert out.view(-1, splits, hidden).abs().sum(-1).min() > 0, "a split computed nothing"


def check_sorts_agree(device):
    """The one-program sort (decode) groups pairs exactly as the torch sort does, skipped pairs included."""
    from nanovllm.kernels.grouped_moe import _sort_pairs_in_one_program, _sort_pairs_with_torch
    torch.manual_seed(2)
    for experts, tokens, top_k, block_m in [(8, 1, 2, 16), (8, 16, 2, 16), (5, 13, 2, 16), (60, 32, 4, 16),
                                            (128, 32, 8, 16), (8, 7, 2, 128), (3, 100, 2, 16)]:
        ids = torch.randint(0, experts + 1, (tokens * top_k,), device=device)  # id == experts: skipped
        for got, expected in zip(_sort_pairs_in_one_program(ids, experts, block_m),
                                 _sort_pairs_with_torch(ids, experts, block_m)):
            assert torch.equal(got, expected), f"{experts} experts, {tokens} tokens: {got} != {expected}"


def check_interpreted():
    check_sorts_agree("cpu")
    from nanovllm.kernels.grouped_moe import grouped_moe
    check(grouped_moe, "cpu", torch.float32)
    check(grouped_moe, "cpu", torch.float32, tokens=1, top_k=1)
    check(grouped_moe, "cpu", torch.float32, tokens=150)  # > 256 pairs: prefill tiles of 128 rows
    # and the check fails when experts are swapped
    with pytest.raises(AssertionError, match="max error"):
        check(lambda x, w13, w2, w, ids: grouped_moe(x, w13, w2, w, (ids + 1) % 5), "cpu", torch.float32)
    check_skipped_pairs("cpu", torch.float32)
    check_split_k("cpu", torch.float32)


def test_grouped_moe_interpreted_on_cpu():
    from nanovllm.testing import run_interpreted
    run_interpreted(__file__, "check_interpreted")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 16, 300])
def test_grouped_moe_on_gpu(dtype, tokens):
    from nanovllm.kernels.grouped_moe import grouped_moe
    check(grouped_moe, "cuda", dtype, tokens=tokens, hidden=256, inter=512, experts=8, tol=5e-2)


@pytest.mark.gpu
def test_grouped_moe_skips_pairs_on_gpu():
    check_skipped_pairs("cuda", torch.bfloat16, tokens=40, hidden=256, inter=512, experts=8, tol=5e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [2, 4])
def test_grouped_moe_split_k_on_gpu(splits):
    check_split_k("cuda", torch.bfloat16, splits=splits, tokens=1, hidden=256, inter=2048, experts=8, tol=5e-2)


@pytest.mark.gpu
def test_pair_sorts_agree_on_gpu():
    check_sorts_agree("cuda")
