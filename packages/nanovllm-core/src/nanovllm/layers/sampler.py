import torch
from torch import nn

from nanovllm.layers.compile import compile_on_cuda


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


@compile_on_cuda
def sample_without_filters(logits: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    """No top-k/top-p and no seeds: scaling, Gumbel noise and both argmaxes fuse into one pass."""
    scaled = logits.float() / temperatures.clamp(min=1e-5).unsqueeze(1)
    gumbel = -torch.log(-torch.log(torch.rand_like(scaled)))
    return torch.where(temperatures == 0, logits.argmax(dim=-1), (scaled + gumbel).argmax(dim=-1))


class Sampler(nn.Module):
    """Greedy rows take the argmax; the others sample by the Gumbel-max trick:
    argmax(logits / T - log E) with E ~ Exp(1) draws from softmax(logits / T)."""

    def forward(self, logits: torch.Tensor, temperatures: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                generators: list[torch.Generator | None], filter_top: bool) -> torch.Tensor:
        seeded = [(row, g) for row, g in enumerate(generators) if g is not None]
        if not filter_top and not seeded:
            return sample_without_filters(logits, temperatures)
        scaled = logits.float() / temperatures.clamp(min=1e-5).unsqueeze(1)
        if filter_top:
            scaled = apply_top_k_top_p(scaled, top_k, top_p)
        noise = torch.empty_like(scaled).exponential_()
        for row, generator in seeded:  # a seeded request draws from its own stream only
            noise[row].exponential_(generator=generator)
        noise.clamp_(min=torch.finfo(noise.dtype).tiny)  # exponential_ may return 0: log(0) would win
        sampled = (scaled - noise.log()).argmax(dim=-1)
        return torch.where(temperatures == 0, logits.argmax(dim=-1), sampled)
