"""A slow, straightforward LoFT written directly from the algorithm description.

No packing, no chunking, no shared "side" abstraction: explicit ``(n, r, r)`` / ``(m, r, r)``
second-moment grams, the full ``m x n`` moments rebuilt with ``einsum``, plain
``torch.linalg.solve``. The fast implementation in ``loft`` must agree with it.
"""

from __future__ import annotations

import torch
from torch import Tensor


class ReferenceLoFT:
    """LoFT for one pair ``dW = s B A`` (A: ``r x n``, B: ``m x r``), driven by raw gradients."""

    def __init__(
        self,
        A: Tensor,
        B: Tensor,
        s: float,
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        alternating: bool = True,
        second_moment_calibration: bool = True,
        gradient_scaling: bool = True,
        first_moment_calibration: bool = True,
        projected_update: bool = True,
    ) -> None:
        self.A, self.U, self.s = A.clone(), s * B.clone(), s
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.alternating, self.smc = alternating, second_moment_calibration
        self.scaling, self.fmc, self.projected = gradient_scaling, first_moment_calibration, projected_update
        r, n = A.shape
        m = B.shape[0]
        self.t = 0
        self.mA, self.mU = A.new_zeros(r, n), A.new_zeros(m, r)
        if self.smc:
            self.SA, self.SU = A.new_zeros(n, r, r), A.new_zeros(m, r, r)
        else:
            self.vA, self.vU = A.new_zeros(r, n), A.new_zeros(m, r)
        self.U_prev, self.A_prev = None, None

    @property
    def B(self) -> Tensor:
        return self.U / self.s

    def projected_grad_norm_sq(self, grad_A: Tensor, grad_B: Tensor) -> float:
        """``||P_U G||^2`` (A moves next) or ``||G P_A||^2`` (B moves next), dense formulas."""
        U, A = self.U, self.A
        G_PA = (grad_B / self.s) @ torch.linalg.solve(A @ A.T, A)  # G A^T (AA^T)^-1 A
        PU_G = U @ torch.linalg.solve(U.T @ U, grad_A)
        moves_b = (self.t + 1) % 2 == 1
        return float((G_PA if moves_b else PU_G).square().sum())

    def step(self, grad_A: Tensor, grad_B: Tensor, clip_coef: float = 1.0) -> None:
        U, A, s = self.U, self.A, self.s
        self.t += 1
        t = self.t
        if self.scaling:
            gA = torch.linalg.solve(U.T @ U, grad_A) * clip_coef if U.any() else torch.zeros_like(grad_A)  # B = 0 start
            gU = (grad_B / s) @ torch.linalg.inv(A @ A.T) * clip_coef
        else:  # the raw factor gradients, in U's units for U
            gA, gU = grad_A * clip_coef, grad_B / s * clip_coef
        if self.U_prev is not None:
            if not torch.equal(self.U_prev, U):
                C_U = torch.linalg.solve(U.T @ U, U.T @ self.U_prev)
                if self.fmc:
                    self.mA = C_U @ self.mA
                if self.smc:
                    self.SA = C_U @ self.SA @ C_U.T
            if not torch.equal(self.A_prev, A):
                C_A = self.A_prev @ A.T @ torch.linalg.inv(A @ A.T)
                if self.fmc:
                    self.mU = self.mU @ C_A
                if self.smc:
                    self.SU = C_A.T @ self.SU @ C_A
        self.U_prev, self.A_prev = U.clone(), A.clone()
        b1, b2 = self.b1, self.b2
        self.mA = b1 * self.mA + (1 - b1) * gA
        self.mU = b1 * self.mU + (1 - b1) * gU
        if self.smc:
            self.SA = b2 * self.SA + (1 - b2) * torch.einsum("kj,lj->jkl", gA, gA)
            self.SU = b2 * self.SU + (1 - b2) * torch.einsum("ik,il->ikl", gU, gU)
        else:
            self.vA = b2 * self.vA + (1 - b2) * gA**2
            self.vU = b2 * self.vU + (1 - b2) * gU**2
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        move_u = (not self.alternating) or t % 2 == 1
        move_a = (not self.alternating) or t % 2 == 0
        new_U, new_A = U, A
        if not self.projected:  # plain AdamW on each factor's parameter (A, and B = U / s)
            vA = torch.einsum("jkk->kj", self.SA) if self.smc else self.vA
            vU = torch.einsum("ikk->ik", self.SU) if self.smc else self.vU
            c = abs(s)
            if move_u:
                m_b, v_b = s * self.mU, c**2 * vU  # B's moments in B's units
                new_B = (1 - self.lr * self.wd) * self.B - self.lr * (m_b / bc1) / ((v_b / bc2).sqrt() + self.eps)
                new_U = s * new_B
            if move_a:
                new_A = (1 - self.lr * self.wd) * A - self.lr * (self.mA / bc1) / ((vA / bc2).sqrt() + self.eps)
            self.U, self.A = new_U, new_A
            return
        if move_u:
            M = self.mU @ A
            V = torch.einsum("kj,ikl,lj->ij", A, self.SU, A) if self.smc else self.vU @ (A**2)
            D = (M / bc1) / ((V / bc2).sqrt() + self.eps)
            new_U = (1 - self.lr * self.wd) * U - self.lr * D @ A.T @ torch.linalg.inv(A @ A.T)
        if move_a:
            M = U @ self.mA
            V = torch.einsum("ik,jkl,il->ij", U, self.SA, U) if self.smc else (U**2) @ self.vA
            D = (M / bc1) / ((V / bc2).sqrt() + self.eps)
            new_A = (1 - self.lr * self.wd) * A - self.lr * torch.linalg.solve(U.T @ U, U.T @ D)
        self.U, self.A = new_U, new_A
