"""The sampler's Triton kernel (Gumbel-max over a vocabulary split across programs): greedy rows are the argmax,
ties to the smallest id; sampled rows follow softmax(logits / T) across chunk boundaries; torch.manual_seed
repeats the draws. Under TRITON_INTERPRET=1 on CPU (CI), and compiled on a GPU."""
import math

import pytest
import torch


def check_greedy(device, dtype, vocab):
    from nanovllm.kernels.sampling import gumbel_argmax
    torch.manual_seed(0)
    rows = 6
    logits = (torch.randn(rows, vocab) * 4).to(dtype)
    logits[1, vocab - 1] = 100.0  # the last id, in the last chunk's last quarter
    logits[2, [5, vocab // 2, vocab - 2]] = 100.0  # ties across chunks: the smallest id
    logits[3, :] = -3.0  # all equal: id 0
    second = min(4096 + 1024 + 7, vocab - 3)  # the second chunk's second quarter where it has one
    logits[4, second] = 50.0
    logits = logits.to(device)
    out = gumbel_argmax(logits, torch.zeros(rows, device=device))
    assert out.dtype == torch.int64
    assert out.tolist() == logits.float().argmax(-1).tolist()
    assert out[1] == vocab - 1 and out[2] == 5 and out[3] == 0 and out[4] == second


def check_small_vocabularies(device):
    """A vocabulary of one chunk or less (the tiny test models'), and a batch of no rows."""
    from nanovllm.kernels.sampling import gumbel_argmax
    torch.manual_seed(0)
    for vocab in (1, 50, 4096):
        logits = torch.randn(5, vocab, device=device)
        temperatures = torch.tensor([0.0, 1.0, 0.0, 0.7, 0.0], device=device)
        out = gumbel_argmax(logits, temperatures)
        greedy = temperatures == 0
        assert torch.equal(out[greedy], logits.argmax(-1)[greedy]) and ((out >= 0) & (out < vocab)).all()
    assert gumbel_argmax(torch.randn(0, 10, device=device), torch.zeros(0, device=device)).shape == (0,)


def check_sampled_frequencies(device, temperatures, rows_per_temperature):
    """Four likely tokens, one in each quarter of a chunk's four (ids 1,500, 2,100 and 3,500 of the first, 5,000 of
    the second, of 5,001): each quarter's noise is drawn and compared, across chunks. The rest
    negligible at every T tested: the draws' frequencies match softmax(logits / T); T = 0 rows take the argmax in
    the same batch."""
    from nanovllm.kernels.sampling import gumbel_argmax
    vocab, likely = 5001, [1500, 2100, 3500, 5000]
    base = torch.full((vocab,), -60.0)  # at T = 2, -30 would be drawn some 5 times in 20,000 rows
    base[likely] = torch.tensor([0.0, math.log(2.0), math.log(3.0), math.log(4.0)])
    n = rows_per_temperature
    logits = base.expand(len(temperatures) * n, vocab).contiguous().to(device)
    temps = torch.cat([torch.full((n,), t) for t in temperatures]).to(device)
    torch.manual_seed(1)
    out = gumbel_argmax(logits, temps).cpu()
    for i, t in enumerate(temperatures):
        drawn = out[i * n:(i + 1) * n]
        assert set(drawn.tolist()) <= set(likely)
        weights = [w ** (1 / t) for w in (1, 2, 3, 4)] if t else [0, 0, 0, 1]
        for token, w in zip(likely, weights):
            expected, got = w / sum(weights), (drawn == token).float().mean().item()
            tolerance = 4 * math.sqrt(expected * (1 - expected) / n) + 1e-9
            assert abs(got - expected) <= tolerance, f"T={t}, token {token}: {got:.3f} against {expected:.3f}"
    # the global seed repeats the draws, another seed gives others (16 sampled rows, strided as a slice)
    some = slice(0, 2 * n, n // 8)

    def draw(seed):
        torch.manual_seed(seed)
        return gumbel_argmax(logits[some], temps[some]).cpu()
    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


def check_interpreted():
    for dtype in (torch.float32, torch.bfloat16):
        check_greedy("cpu", dtype, vocab=2 * 4096 + 5)  # a partial last chunk
    check_small_vocabularies("cpu")
    # the interpreter runs some 70 programs a second: T = 0.25 against 1 still moves each token's share by 0.1-0.3
    check_sampled_frequencies("cpu", (1.0, 0.25, 0.0), rows_per_temperature=160)


def test_sampling_kernel_interpreted_on_cpu():
    from nanovllm.testing import run_interpreted
    run_interpreted(__file__, "check_interpreted")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vocab", [151936, 32000, 4099])
def test_sampling_kernel_greedy_on_gpu(dtype, vocab):
    check_greedy("cuda", dtype, vocab)


@pytest.mark.gpu
def test_sampling_kernel_small_vocabularies_on_gpu():
    check_small_vocabularies("cuda")


@pytest.mark.gpu
def test_sampling_kernel_frequencies_on_gpu():
    check_sampled_frequencies("cuda", (1.0, 0.5, 2.0, 0.0), rows_per_temperature=20000)
