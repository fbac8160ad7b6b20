"""Top-k / top-p filtering and the Sampler (greedy rows, temperature, seeded generators)."""
import math

import torch

from nanovllm.layers.sampler import Sampler, apply_top_k_top_p


def kept(row: torch.Tensor) -> set[int]:
    return set(torch.isfinite(row).nonzero().flatten().tolist())


def filt(logits, top_k, top_p):
    logits = torch.as_tensor(logits, dtype=torch.float32)
    if logits.dim() == 1:
        logits = logits.unsqueeze(0)
    rows = logits.size(0)
    top_k = torch.as_tensor(top_k if isinstance(top_k, list) else [top_k] * rows)
    top_p = torch.as_tensor(top_p if isinstance(top_p, list) else [top_p] * rows, dtype=torch.float32)
    return logits, apply_top_k_top_p(logits.clone(), top_k, top_p)


def log_probs(probs):
    return [math.log(p) for p in probs]


# ---------------------------------------------------------------- apply_top_k_top_p

def test_top_k_keeps_exactly_the_k_largest_with_their_values():
    logits, out = filt([0.3, 2.0, -1.0, 5.0, 1.0, 4.0], top_k=3, top_p=1.0)
    assert kept(out[0]) == {3, 5, 1}
    for i in kept(out[0]):
        assert out[0, i] == logits[0, i]
    assert torch.isneginf(out[0, [0, 2, 4]]).all()


def test_top_k_per_row_and_vocab_size_keeps_all():
    row = [0.3, 2.0, -1.0, 5.0, 1.0, 4.0]
    _, out = filt([row, row, row], top_k=[1, 2, 6], top_p=1.0)
    assert kept(out[0]) == {3}
    assert kept(out[1]) == {3, 5}
    assert kept(out[2]) == set(range(6))
    assert torch.equal(out[2], torch.tensor(row))


def test_top_p_keeps_the_smallest_nucleus():
    # probabilities 0.05, 0.5, 0.15, 0.3 (shuffled positions)
    row = log_probs([0.05, 0.5, 0.15, 0.3])
    cases = {0.3: {1}, 0.6: {1, 3}, 0.79: {1, 3}, 0.81: {1, 3, 2}, 0.96: {0, 1, 2, 3}, 1.0: {0, 1, 2, 3}}
    for p, expected in cases.items():
        _, out = filt(row, top_k=4, top_p=p)
        assert kept(out[0]) == expected, f"top_p={p}"


def test_top_p_always_keeps_the_top_token():
    _, out = filt([[9.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], top_k=4, top_p=1e-6)
    assert kept(out[0]) == {0}
    assert len(kept(out[1])) == 1


def test_top_p_at_an_exact_boundary_keeps_the_smallest_nucleus():
    # probabilities 0.5, 0.25, 0.125, 0.125 are exact in float32: 0.5 + 0.25 reaches top_p = 0.75 exactly,
    # so the smallest nucleus is {0, 1} (as in Hugging Face's and vLLM's top-p).
    # Regression: the filter once used `mass before > p` and kept token 2 here too.
    _, out = filt(log_probs([0.5, 0.25, 0.125, 0.125]), top_k=4, top_p=0.75)
    assert kept(out[0]) == {0, 1}
    _, out = filt([0.0, 0.0, 0.0, 0.0], top_k=4, top_p=0.5)  # uniform: exactly 2 of the 4 reach 0.5
    assert len(kept(out[0])) == 2


def test_top_p_one_keeps_every_token_even_when_the_mass_rounds_to_one():
    # in float32 the top token's probability is exactly 1.0: the mass before the others "reaches" 1.0
    row = [0.0, -30.0, -31.0, -32.0]
    _, out = filt([row, row], top_k=4, top_p=[1.0, 0.9])
    assert kept(out[0]) == {0, 1, 2, 3}
    assert kept(out[1]) == {0}


def test_top_p_is_computed_after_top_k():
    # full distribution 0.4, 0.3, 0.2, 0.1. top_k=2 renormalises to 4/7, 3/7.
    # top_p=0.5 on the full distribution would keep 2 tokens (mass before the 2nd is 0.4 < 0.5);
    # after top-k the mass before the 2nd is 4/7 > 0.5, so only the top token stays.
    row = log_probs([0.1, 0.4, 0.2, 0.3])
    _, out = filt(row, top_k=2, top_p=0.5)
    assert kept(out[0]) == {1}
    _, out = filt(row, top_k=4, top_p=0.5)
    assert kept(out[0]) == {1, 3}
    # top_p=0.6 after top-k: 4/7 < 0.6, both top-k tokens stay, never the 3rd
    _, out = filt(row, top_k=2, top_p=0.6)
    assert kept(out[0]) == {1, 3}
    _, out = filt(row, top_k=3, top_p=0.9)
    assert kept(out[0]) == {1, 3, 2}


def test_filtering_rows_are_independent():
    a = log_probs([0.1, 0.4, 0.2, 0.3])
    b = log_probs([0.7, 0.1, 0.1, 0.1])
    _, out = filt([a, b, a], top_k=[4, 4, 1], top_p=[0.5, 0.75, 1.0])
    assert kept(out[0]) == {1, 3}
    # 0.7 < 0.75 so a second token is needed; which of the three tied 0.1 tokens is unspecified
    assert len(kept(out[1])) == 2 and 0 in kept(out[1])
    assert kept(out[2]) == {1}


# ---------------------------------------------------------------- Sampler

def sample(logits, temperatures, top_k=None, top_p=None, generators=None, filter_top=None):
    logits = torch.as_tensor(logits, dtype=torch.float32)
    rows, vocab = logits.shape
    temperatures = torch.as_tensor(temperatures, dtype=torch.float32)
    if temperatures.dim() == 0:
        temperatures = temperatures.expand(rows).contiguous()
    top_k = torch.full((rows,), vocab) if top_k is None else torch.as_tensor(top_k).expand(rows).contiguous()
    top_p = torch.ones(rows) if top_p is None else torch.as_tensor(top_p, dtype=torch.float32).expand(rows).contiguous()
    if filter_top is None:
        filter_top = bool((top_k < vocab).any() or (top_p < 1).any())
    generators = generators if generators is not None else [None] * rows
    return Sampler()(logits, temperatures, top_k, top_p, generators, filter_top)


def test_temperature_zero_rows_are_argmax():
    torch.manual_seed(0)
    logits = torch.randn(64, 50)
    temps = torch.tensor([0.0, 1.0] * 32)
    for filter_top in (False, True):
        out = sample(logits, temps, top_k=torch.tensor(50), top_p=torch.tensor(0.9), filter_top=filter_top)
        assert out.shape == (64,)
        assert torch.equal(out[0::2], logits[0::2].argmax(-1))
    # the sampled rows are not all argmax: sampling really happens there
    flat = torch.zeros(400, 50)
    flat[:, 7] = 0.5
    out = sample(flat, 1.0)
    assert (out != 7).sum() > 100


def test_temperature_zero_is_argmax_even_for_huge_logits():
    logits = torch.tensor([[1e4, 1e4 + 8.0, -1e4, 0.0]] * 8)
    out = sample(logits, 0.0)
    assert out.tolist() == [1] * 8


def test_top_k_2_only_samples_the_two_largest():
    torch.manual_seed(1)
    logits = torch.tensor([0.0, 0.3, 0.1, 0.5, 0.2, 0.45, 0.05, 0.25]).expand(4000, 8).contiguous()
    out = sample(logits, 1.0, top_k=torch.tensor(2))
    assert set(out.tolist()) == {3, 5}
    # control: without top-k every token shows up
    out = sample(logits, 1.0)
    assert set(out.tolist()) == set(range(8))


def test_sampled_frequencies_follow_softmax_with_temperature_per_row():
    torch.manual_seed(2)
    n = 20000
    logits = torch.tensor([0.0, math.log(3.0)]).expand(4 * n, 2).contiguous()
    temps = torch.cat([torch.full((n,), t) for t in (1.0, 0.5, 2.0, 0.0)])
    out = sample(logits, temps)
    freq = [out[i * n:(i + 1) * n].float().mean().item() for i in range(4)]
    expected = [0.75, 0.9, math.sqrt(3) / (1 + math.sqrt(3)), 1.0]
    for f, e, t in zip(freq, expected, (1.0, 0.5, 2.0, 0.0)):
        assert abs(f - e) < 0.02, f"temperature {t}: P(token 1) = {f:.3f}, expected {e:.3f}"
    assert freq[3] == 1.0


def test_seeded_rows_reproduce_regardless_of_the_rest_of_the_batch():
    vocab = 1000
    row = torch.zeros(vocab)  # uniform: the token is decided by the random draw alone

    def draws(position, batch_size, global_seed, steps=6):
        torch.manual_seed(global_seed)
        gen = torch.Generator().manual_seed(1234)
        tokens = []
        for _ in range(steps):
            logits = torch.randn(batch_size, vocab) * 3
            logits[position] = row
            gens = [None] * batch_size
            gens[position] = gen
            temps = torch.rand(batch_size) + 0.5
            temps[position] = 1.0
            out = sample(logits, temps, top_k=torch.tensor(vocab), generators=gens)
            tokens.append(out[position].item())
        return tokens

    reference = draws(0, 1, global_seed=0)
    assert draws(2, 5, global_seed=1) == reference
    assert draws(7, 8, global_seed=2) == reference
    assert len(set(reference)) > 1  # it is not a constant

    # an unseeded row depends on the global RNG
    torch.manual_seed(3)
    a = sample(row.expand(1, vocab), 1.0).item()
    torch.manual_seed(4)
    b = sample(row.expand(1, vocab), 1.0).item()
    torch.manual_seed(5)
    c = sample(row.expand(1, vocab), 1.0).item()
    assert len({a, b, c}) > 1

    # a different seed gives a different stream
    gen = torch.Generator().manual_seed(99)
    other = [sample(row.expand(1, vocab), 1.0, generators=[gen]).item() for _ in range(6)]
    assert other != reference


def test_seeded_rows_reproduce_with_top_k_top_p_filtering():
    vocab = 200
    logits = torch.linspace(0, 1, vocab).expand(3, vocab).contiguous()

    def run(seed_row_first):
        gen = torch.Generator().manual_seed(7)
        gens = [gen, None, None] if seed_row_first else [None, None, gen]
        row = 0 if seed_row_first else 2
        return [sample(logits, 1.0, top_k=torch.tensor([50, 10, 50]), top_p=torch.tensor([0.9, 0.5, 0.9]),
                       generators=gens)[row].item() for _ in range(5)]

    first = run(True)
    assert run(False) == first
    assert all(t >= vocab - 50 for t in first)


def test_zero_noise_never_selects_a_zero_probability_token(monkeypatch):
    """Fault injection in torch (not in nanovllm): exponential_ returns an exact -0.0 at token 0, as MPS does."""
    real_exponential = torch.Tensor.exponential_

    def exponential_with_a_zero(self, *args, **kwargs):
        out = real_exponential(self, *args, **kwargs)
        self[..., 0] = -0.0
        return out

    monkeypatch.setattr(torch.Tensor, "exponential_", exponential_with_a_zero)
    # row 0: token 0 is outside top_k=2; row 1: token 0's probability underflows to exactly 0
    logits = torch.tensor([[0.0, 5.0, 4.0, 3.0], [0.0, 200.0, 199.0, 198.0]])
    gens = [None, torch.Generator().manual_seed(0)]
    out = sample(logits, 1.0, top_k=torch.tensor([2, 4]), generators=gens, filter_top=True)
    assert out[0].item() in (1, 2)
    assert out[1].item() != 0


# ---------------------------------------------------------------- penalties, min_p, min_tokens against transformers

def test_penalties_match_transformers_and_the_openai_formula():
    from transformers import RepetitionPenaltyLogitsProcessor

    from nanovllm.layers.sampler import apply_penalties
    torch.manual_seed(0)
    vocab, prompt, output = 50, [3, 7, 7, 9], [7, 11, 11, 11, 2]
    logits = torch.randn(1, vocab) * 3
    history = torch.tensor([prompt + output + [vocab, vocab]])  # padded with the vocab size
    got = apply_penalties(logits, history, torch.tensor([len(prompt)]), torch.tensor([[1.7, 0.0, 0.0]]))
    expected = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([prompt + output]), logits.clone())
    torch.testing.assert_close(got, expected)
    got = apply_penalties(logits, history, torch.tensor([len(prompt)]), torch.tensor([[1.0, 0.5, 0.25]]))
    counts = torch.bincount(torch.tensor(output), minlength=vocab).float()
    # the prompt-only tokens 3 and 9 untouched
    torch.testing.assert_close(got[0], logits[0] - 0.25 * counts - 0.5 * (counts > 0).float())


def test_min_p_matches_transformers():
    from transformers import MinPLogitsWarper

    from nanovllm.layers.sampler import apply_min_p
    torch.manual_seed(1)
    scores = torch.randn(3, 40) * 2
    got = apply_min_p(scores, torch.tensor([0.1, 0.1, 0.1]))
    expected = MinPLogitsWarper(0.1)(None, scores.clone())
    assert torch.equal(got.isinf(), expected.isinf()) and torch.equal(got[~got.isinf()], scores[~got.isinf()])


def test_min_tokens_ban_matches_transformers():
    from transformers import MinNewTokensLengthLogitsProcessor

    from nanovllm.layers.sampler import ban_tokens
    scores = torch.randn(1, 30)
    processor = MinNewTokensLengthLogitsProcessor(prompt_length_to_skip=4, min_new_tokens=3, eos_token_id=[5, 8])
    expected = processor(torch.zeros(1, 5, dtype=torch.long), scores.clone())  # one new token so far: banned
    torch.testing.assert_close(ban_tokens(scores, torch.tensor([[5, 8, 30]])), expected)
