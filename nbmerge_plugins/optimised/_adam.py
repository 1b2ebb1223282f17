"""Adam (Kingma & Ba 2015) on one tensor whose gradient the caller computes: torch.optim.Adam's arithmetic
(default betas and ε, no weight decay, no amsgrad), step for step, without autograd, Parameters or an optimizer
object, so that it runs in any grad mode (a merge called under ``torch.no_grad`` or ``inference_mode``) and keeps
three tensors of the parameter's size (the two moments and one scratch buffer).

At step s with gradient g:
  m ← m + (1 − β₁)(g − m),  v ← β₂ v + (1 − β₂) g²,
  θ ← θ − (lr / (1 − β₁ˢ)) · m / (√v / √(1 − β₂ˢ) + ε).
"""

import torch


class Adam:
    """Adam steps on ``value`` (updated in place)."""

    def __init__(self, value: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        self.value, self.lr, self.betas, self.eps = value, lr, betas, eps
        self.exp_avg = torch.zeros_like(value)
        self.exp_avg_sq = torch.zeros_like(value)
        self._denominator = torch.empty_like(value)
        self.steps = 0

    def step(self, grad: torch.Tensor) -> None:
        beta1, beta2 = self.betas
        self.steps += 1
        self.exp_avg.lerp_(grad, 1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = self.lr / (1 - beta1 ** self.steps)
        denominator = torch.sqrt(self.exp_avg_sq, out=self._denominator)
        denominator.div_((1 - beta2 ** self.steps) ** 0.5).add_(self.eps)
        self.value.addcdiv_(self.exp_avg, denominator, value=-step_size)
