"""Continual-personalization metrics (docs/design.md, docs/world.md): MMD, AMMD, BwT-MMD, accuracy, fidelity, BwT and forgetting.

Matrices are (N, N) with rows = concepts i and columns = task states j (the model after task j);
entries with i > j (concept not yet seen) are NaN.

MMD is the unbiased estimate of MMD^2 with the KID polynomial kernel k(x, y) = (x.y / d + 1)^3
(Binkowski et al., 2018, "Demystifying MMD GANs"), computed on all pairs of the two sets (no
subsets, so it also works for the few images a personalization task has):

    MMD^2 = 1/(m(m-1)) sum_{a != b} k(x_a, x_b) + 1/(n(n-1)) sum_{a != b} k(y_a, y_b)
            - 2/(m n) sum_{a, b} k(x_a, y_b)

It is unbiased, so two samples of one distribution give values around 0, possibly negative.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor, degree: int = 3, coef0: float = 1.0) -> torch.Tensor:
    """KID's kernel matrix k(x_a, y_b) = (x_a . y_b / d + coef0)^degree, (m, n) for x (m, d), y (n, d)."""
    return (x @ y.T / x.shape[1] + coef0) ** degree


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor, degree: int = 3, coef0: float = 1.0) -> float:
    """Unbiased MMD^2 between feature sets x (m, d) and y (n, d), m, n >= 2, computed in float64."""
    for name, f in (("x", x), ("y", y)):
        if not isinstance(f, torch.Tensor) or f.dim() != 2 or f.shape[0] < 2:
            raise ValueError(f"{name} must be a (num_samples >= 2, dim) feature tensor, got {tuple(getattr(f, 'shape', ()))}")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same feature dim, got {x.shape[1]} and {y.shape[1]}")
    x, y = x.detach().double().cpu(), y.detach().double().cpu()
    m, n = x.shape[0], y.shape[0]
    kxx = polynomial_kernel(x, x, degree, coef0)
    kyy = polynomial_kernel(y, y, degree, coef0)
    kxy = polynomial_kernel(x, y, degree, coef0)
    within_x = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    within_y = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(within_x + within_y - 2 * kxy.mean())


def _check_matrix(name: str, matrix: torch.Tensor) -> torch.Tensor:
    matrix = torch.as_tensor(matrix, dtype=torch.float64)
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(f"{name} must be a square (N, N) concepts x task-states matrix, got {tuple(matrix.shape)}")
    return matrix


def ammd(mmd: torch.Tensor) -> float:
    """AMMD = mean_i M[i, N]: mean MMD of every concept under the final model."""
    return final_score(mmd, "mmd")


def bwt_mmd(mmd: torch.Tensor) -> float:
    """BwT-MMD = mean_{i<N} (M[i, N] - M[i, i]); positive = forgetting (MMD grew). NaN when N = 1."""
    return bwt(mmd, "mmd")


def final_score(matrix: torch.Tensor, name: str = "matrix") -> float:
    """Mean of every concept's score under the final model, mean_i R[i, N]."""
    matrix = _check_matrix(name, matrix)
    return float(matrix[:, -1].mean())


def final_accuracy(accuracy: torch.Tensor) -> float:
    """Mean accuracy of every concept under the final model, mean_i A[i, N]."""
    return final_score(accuracy, "accuracy")


def plasticity(matrix: torch.Tensor, name: str = "matrix") -> float:
    """Mean of each concept's score right after its own task, mean_i R[i, i]: what the method could learn."""
    matrix = _check_matrix(name, matrix)
    return float(matrix.diagonal().mean())


def bwt(matrix: torch.Tensor, name: str = "matrix") -> float:
    """Backward transfer of a higher-is-better score (Lopez-Paz & Ranzato 2017), mean_{i<N} (R[i, N] - R[i, i]);
    negative = forgetting. NaN when N = 1."""
    matrix = _check_matrix(name, matrix)
    n = matrix.shape[0]
    if n < 2:
        return math.nan
    idx = torch.arange(n - 1)
    return float((matrix[idx, -1] - matrix[idx, idx]).mean())


def forgetting(matrix: torch.Tensor, name: str = "accuracy") -> float:
    """Forgetting of a higher-is-better score (Chaudhry et al. 2018): for each of the first N-1 concepts, the
    best score it had before the final state minus its final score, averaged over those N-1 concepts,
    mean_{i<N} (max_{i<=j<N} R[i, j] - R[i, N]). Can be negative (backward transfer); 0 when N = 1."""
    matrix = _check_matrix(name, matrix)
    n = matrix.shape[0]
    if n < 2:
        return 0.0
    before_final = torch.nan_to_num(matrix[:n - 1, :n - 1], nan=-math.inf).amax(dim=1)
    return float((before_final - matrix[:n - 1, -1]).mean())


def final_overwrite(overwrite: torch.Tensor) -> Optional[float]:
    """Mean over the first N-1 concepts of O[i, N]: how much of the final model's samples of each earlier prompt
    draw the newest concept instead (None when N = 1: no earlier prompt)."""
    overwrite = _check_matrix("overwrite", overwrite)
    n = overwrite.shape[0]
    return float(overwrite[:n - 1, -1].mean()) if n > 1 else None


def summary(accuracy: torch.Tensor, mmd: torch.Tensor) -> Dict[str, float]:
    """All scalar metrics of one run: ammd, bwt_mmd, final_accuracy, forgetting."""
    return {"ammd": ammd(mmd), "bwt_mmd": bwt_mmd(mmd),
            "final_accuracy": final_accuracy(accuracy), "forgetting": forgetting(accuracy)}


def fidelity_summary(fidelity: torch.Tensor, shape: torch.Tensor, colour: torch.Tensor) -> Dict[str, float]:
    """Scalar metrics of the world's fidelity matrices (docs/world.md): final fidelity, plasticity (mean F[i, i],
    each concept right after its own task), BwT-fidelity, fidelity forgetting, and final shape-only / colour-only
    fidelity."""
    return {"final_fidelity": final_score(fidelity, "fidelity"), "plasticity": plasticity(fidelity, "fidelity"),
            "bwt_fidelity": bwt(fidelity, "fidelity"),
            "fidelity_forgetting": forgetting(fidelity, "fidelity"),
            "final_shape_fidelity": final_score(shape, "shape fidelity"),
            "final_colour_fidelity": final_score(colour, "colour fidelity")}
