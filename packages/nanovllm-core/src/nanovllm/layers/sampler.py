from dataclasses import dataclass

import torch
from torch import nn


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf every logit outside each row's top-k, then outside its top-p nucleus.

    top_k: [rows] int (vocabulary size to keep all); top_p: [rows] float (1.0 to keep all).
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.size(-1), device=logits.device)
    sorted_logits.masked_fill_(ranks >= top_k.unsqueeze(1), float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # Keep a token while the mass before it is below p (the smallest nucleus; the top token always stays).
    outside_nucleus = (probs.cumsum(dim=-1) - probs >= top_p.unsqueeze(1)) & (top_p < 1).unsqueeze(1)
    sorted_logits.masked_fill_(outside_nucleus, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


@dataclass
class LogitsAdjustments:
    """Per-row adjustments of the logits before sampling, on the device; None where no row uses them.

    banned: [rows, k] token ids that may not be sampled yet (min_tokens), vocab size as padding.
    history: [rows, L] each row's prompt and output token ids, vocab size as padding; num_prompt: [rows].
    penalties: [rows, 3] repetition, presence and frequency penalties. min_p: [rows].
    """

    banned: torch.Tensor | None = None
    history: torch.Tensor | None = None
    num_prompt: torch.Tensor | None = None
    penalties: torch.Tensor | None = None
    min_p: torch.Tensor | None = None


def apply_penalties(logits: torch.Tensor, history: torch.Tensor, num_prompt: torch.Tensor,
                    penalties: torch.Tensor) -> torch.Tensor:
    """vLLM's penalties: repetition over the prompt's and the output's tokens (a positive logit divided by it, a
    negative one multiplied), presence (once) and frequency (per occurrence) over the output's."""
    rows, vocab = logits.shape
    in_output = torch.arange(history.size(1), device=logits.device)[None, :] >= num_prompt[:, None]
    counts = torch.zeros(rows, vocab + 1, device=logits.device).scatter_add_(1, history, in_output.float())[:, :vocab]
    seen = torch.zeros(rows, vocab + 1, device=logits.device).scatter_(1, history, 1.0)[:, :vocab] > 0
    repetition, presence, frequency = (p[:, None] for p in penalties.unbind(1))
    logits = torch.where(seen, torch.where(logits > 0, logits / repetition, logits * repetition), logits)
    return logits - frequency * counts - presence * (counts > 0)


def ban_tokens(logits: torch.Tensor, banned: torch.Tensor) -> torch.Tensor:
    """-inf at each row's ``banned`` ids (the vocab size pads)."""
    rows, vocab = logits.shape
    mask = torch.zeros(rows, vocab + 1, dtype=torch.bool, device=logits.device).scatter_(1, banned, True)[:, :vocab]
    return logits.masked_fill(mask, float("-inf"))


def apply_min_p(scaled: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """-inf at tokens less probable than min_p times the row's most probable token."""
    probs = scaled.softmax(dim=-1)
    return scaled.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values, float("-inf"))


def sample_without_filters(logits: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    """No top-k/top-p and no seeds: scaling, Gumbel noise and both argmaxes in one pass over the logits (on CUDA a
    Triton kernel that splits each row over many programs; triton is imported only where it runs)."""
    if logits.is_cuda:
        from nanovllm.kernels.sampling import gumbel_argmax
        return gumbel_argmax(logits, temperatures)
    return gumbel_argmax_torch(logits, temperatures)


def gumbel_argmax_torch(logits: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    """sample_without_filters in PyTorch (CPU and MPS; tools/bench_sampler.py compiles it against the kernel)."""
    scaled = logits.float() / temperatures.clamp(min=1e-5).unsqueeze(1)
    gumbel = -torch.log(-torch.log(torch.rand_like(scaled)))
    return torch.where(temperatures == 0, logits.argmax(dim=-1), (scaled + gumbel).argmax(dim=-1))


class Sampler(nn.Module):
    """Greedy rows take the argmax; the others sample by the Gumbel-max trick:
    argmax(logits / T - log E) with E ~ Exp(1) draws from softmax(logits / T)."""

    def forward(self, logits: torch.Tensor, temperatures: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                generators: list[torch.Generator | None], filter_top: bool,
                adjust: LogitsAdjustments | None = None) -> torch.Tensor:
        seeded = [(row, g) for row, g in enumerate(generators) if g is not None]
        if adjust is not None:  # greedy rows take the argmax of the adjusted logits too
            logits = logits.float()
            if adjust.penalties is not None:
                logits = apply_penalties(logits, adjust.history, adjust.num_prompt, adjust.penalties)
            if adjust.banned is not None:
                logits = ban_tokens(logits, adjust.banned)
        if not filter_top and not seeded and (adjust is None or adjust.min_p is None):
            return sample_without_filters(logits, temperatures)
        scaled = logits.float() / temperatures.clamp(min=1e-5).unsqueeze(1)
        if filter_top:
            scaled = apply_top_k_top_p(scaled, top_k, top_p)
        if adjust is not None and adjust.min_p is not None:
            scaled = apply_min_p(scaled, adjust.min_p)
        noise = torch.empty_like(scaled).exponential_()
        for row, generator in seeded:  # a seeded request draws from its own stream only
            noise[row].exponential_(generator=generator)
        noise.clamp_(min=torch.finfo(noise.dtype).tiny)  # exponential_ may return 0: log(0) would win
        sampled = (scaled - noise.log()).argmax(dim=-1)
        return torch.where(temperatures == 0, logits.argmax(dim=-1), sampled)
