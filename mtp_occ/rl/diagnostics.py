"""Exact decomposition diagnostics: c = ⟨g_RL, g_MTP⟩, v² = ‖g_MTP‖² over the shared parameters.

g_MTP is the gradient of the *unscaled* MTP loss over the parameters it may reach (the regime's grad
path decides which; under `detach` it is exactly zero), taken with one extra backward pass through the
already-built graph (`retain_graph=True`) before the ordinary joint backward. The joint backward is left
untouched, so the optimizer sees bit-for-bit the gradients it would see without diagnostics; g_RL is
then recovered as g_total − Σ λ_i·g_MTP,i (the λ of each micro-batch). Total cost: two backward passes
per micro-batch instead of one, no extra forward. The paper computed the same quantities from separate
backward passes at 5.6× a step.

Cross-mini-batch c: given the previous update's g_RL (`prev_g_rl`, another mini-batch of the same
policy, weights one update apart), `diag/c_cross` = ⟨g_RL^prev, g_MTP⟩. Within one mini-batch
⟨g_RL, g_MTP⟩ also holds the two gradients' sampling covariance; across independent mini-batches it
estimates the population ⟨∇J, g_MTP⟩ the one-step gain needs. Every update's values are also written
one row per update (`diagnostics.jsonl`, `mtp_occ.log.RunLogger.log_updates`): the step's mean in
metrics.jsonl mixes signs.
"""

from __future__ import annotations

import math

import torch


class Decomposition:
    """Accumulates g_MTP over the micro-batches of one optimizer update, then measures against .grad."""

    def __init__(self, params: list[torch.nn.Parameter], prev_g_rl: list[torch.Tensor] | None = None):
        self.params, self.prev_g_rl = params, prev_g_rl
        self.g_rl: list[torch.Tensor] = []  # this update's g_RL after `measure` (the next update's prev_g_rl)
        self.result: dict[str, float] = {}
        self.g_mtp = [torch.zeros_like(p) for p in params]
        self.lam_g_mtp = [torch.zeros_like(p) for p in params]

    def add(self, mtp_loss: torch.Tensor, lam: float) -> None:
        """Call before the joint backward of each micro-batch (the graph must still exist)."""
        if not mtp_loss.requires_grad:
            return
        grads = torch.autograd.grad(mtp_loss, self.params, retain_graph=True, allow_unused=True)
        for acc, lacc, g in zip(self.g_mtp, self.lam_g_mtp, grads, strict=True):
            if g is not None:
                acc.add_(g)
                lacc.add_(g, alpha=lam)

    @torch.no_grad()
    def measure(self) -> dict[str, float]:
        """After the joint backward(s) and the gradient all-reduce, before clipping: c, v², cos and
        ‖g_RL‖² in float64 over the global mini-batch."""
        from mtp_occ.dist import all_reduce_

        for acc in (*self.g_mtp, *self.lam_g_mtp):
            all_reduce_(acc)
        c = v2 = rl2 = cross = 0.0
        self.g_rl = []
        for i, (p, g_mtp, lam_g) in enumerate(zip(self.params, self.g_mtp, self.lam_g_mtp, strict=True)):
            total = p.grad if p.grad is not None else torch.zeros_like(p)
            g_rl = total.double() - lam_g.double()
            c += float((g_rl * g_mtp.double()).sum())
            v2 += float(g_mtp.double().square().sum())
            rl2 += float(g_rl.square().sum())
            if self.prev_g_rl is not None:
                cross += float((self.prev_g_rl[i].double() * g_mtp.double()).sum())
            self.g_rl.append(g_rl.to(p.dtype))
        cos = c / math.sqrt(v2 * rl2) if v2 > 0 and rl2 > 0 else 0.0
        self.result = {"diag/c": c, "diag/v2": v2, "diag/cos": cos, "diag/g_rl_norm2": rl2}
        if self.prev_g_rl is not None:
            self.result["diag/c_cross"] = cross
        return self.result
