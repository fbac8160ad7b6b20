"""The arithmetic of the factors: bases from second-moment matrices, and each expert's factor given a basis."""
import torch

POWER_ITERATIONS = 4


def top_eigenvectors(moments: torch.Tensor, rank: int, oversample: int) -> torch.Tensor:
    """The ``rank`` leading eigenvectors of a symmetric PSD matrix, as columns, largest first. With
    ``oversample`` > 0 a randomized subspace iteration on rank + oversample columns (exact when they reach the
    dimension); 0 asks for the exact eigendecomposition."""
    dim = moments.size(0)
    if oversample <= 0 or rank + oversample >= dim:
        return torch.linalg.eigh(moments)[1][:, -rank:].flip(-1)
    generator = torch.Generator(moments.device).manual_seed(0)
    basis = torch.randn(dim, rank + oversample, device=moments.device, generator=generator)
    for _ in range(POWER_ITERATIONS):
        basis = torch.linalg.qr(moments @ basis).Q
    values, vectors = torch.linalg.eigh(basis.t() @ moments @ basis)
    return basis @ vectors[:, -rank:].flip(-1)


def pca_factors(weights: torch.Tensor, rank: int, oversample: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA over a layer's experts ([E, out, in]): the basis U [out, rank] of their joint column space that keeps
    the most of their squared entries, and each expert's V = U^T W [E, rank, in]."""
    gram = torch.einsum("eoi,epi->op", weights, weights)
    basis = top_eigenvectors(gram, rank, oversample)
    return basis, basis.t() @ weights


def ridge_factor(projected: torch.Tensor, inputs_moments: torch.Tensor | None, ridge: float) -> torch.Tensor:
    """The expert's V minimising sum ||U V x - W x||^2 + lambda ||V||^2 over its inputs x, given U^T W
    (``projected``, [rank, in]) and the inputs' second moments C = sum x x^T ([in, in]): V = U^T W C (C + lambda)^-1,
    lambda = ``ridge`` times C's mean eigenvalue. Without inputs (an expert the calibration never routed to), U^T W."""
    if inputs_moments is None:
        return projected
    dim = inputs_moments.size(0)
    shift = ridge * inputs_moments.diagonal().mean() * torch.eye(dim, device=projected.device)
    return torch.linalg.solve(inputs_moments + shift, inputs_moments @ projected.t()).t()
