"""The one-kernel MoE router against softmax and topk in torch: under TRITON_INTERPRET=1 on CPU and on a GPU."""
import pytest
import torch

CASES = [  # tokens, experts, top_k, normalize
    (1, 8, 2, True), (13, 8, 2, False), (100, 60, 4, False), (7, 128, 8, True), (5, 4, 1, False), (40, 3, 2, True)]


def check(top_k_routing, device, dtype, tokens, experts, top_k, normalize, tol=1e-5):
    torch.manual_seed(tokens)
    logits = (torch.randn(tokens, experts, device=device) * 2).to(dtype)
    logits[0, 1] = logits[0, 0]  # a tie
    weights, ids = top_k_routing(logits, top_k, normalize)
    probs = logits.float().softmax(dim=-1)
    expected = probs.topk(top_k, dim=-1).values
    assert ids.dtype == torch.int64 and ids.shape == (tokens, top_k)
    assert (ids.sort(dim=-1).values.diff(dim=-1) > 0).all(), "an expert was chosen twice"
    # the chosen experts hold the top-k probabilities, largest first (which of two equal ones is taken is free)
    error = (probs.gather(1, ids) - expected).abs().max().item()
    assert error < tol, f"chosen experts' probabilities off by {error}"
    if normalize:
        expected = expected / expected.sum(dim=-1, keepdim=True)
    error = (weights - expected).abs().max().item()
    assert error < tol, f"weights off by {error}"


def check_interpreted():
    from nanovllm.kernels.routing import top_k_routing
    for case in CASES:
        check(top_k_routing, "cpu", torch.float32, *case)
    logits = torch.randn(3, 60)
    logits[1] = float("nan")  # a row of garbage still names real experts (a manager indexes with them)
    ids = top_k_routing(logits, 4, True)[1]
    assert ids.min() >= 0 and ids.max() < 60, ids
    with pytest.raises(AssertionError, match="probabilities off"):  # and the check catches a wrong router
        check(lambda logits, k, n: top_k_routing(logits.flip(1), k, n), "cpu", torch.float32, *CASES[1])


def test_routing_interpreted_on_cpu():
    from nanovllm.testing import run_interpreted
    run_interpreted(__file__, "check_interpreted")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES + [(3000, 8, 2, True)])
def test_routing_on_gpu(dtype, case):
    from nanovllm.kernels.routing import top_k_routing
    check(top_k_routing, "cuda", dtype, *case)
