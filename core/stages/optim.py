"""The stages' optimiser, chosen by `params.optimizer` (one section both stages read).

Magic123's scripts train both stages with Adam, betas (0.9, 0.99), eps 1e-15, no weight decay
(guochengqian/Magic123 main.py:554-555; every script passes `--optim adam`). Consistent123 keeps
stable-dreamfusion's default `--optim adan` (lyk412/Consistent123 main.py:87) for both stages:
Adan over the parameter groups at 5× their learning rates, eps 1e-8, decoupled weight decay 2e-5,
the global gradient norm clipped to 5 (main.py:457-460), betas (0.98, 0.92, 0.99) (the Adan
defaults, optimizer.py). Adan is timm's `timm.optim.Adan` (the same update as the released
optimizer.py); the global-norm clip, which timm's Adan lacks, is applied to the gradients before
its step, as the released optimizer does at the start of its own (clip = min(1, max/(‖g‖ + eps)),
every gradient scaled in place).

On a GPU Adam runs as torch's fused kernel (`optimizer.fused`): the released update, computed in one
pass over every parameter instead of foreach's dozen passes and their per-parameter host work
(reports/speed, session 23); on the CPU the foreach/for-loop Adam as before.

Every group keeps its unscaled-schedule learning rate as `base_lr` (lr × lr_scale) so a
representation's lr schedule (core/stages/coarse.py) scales that.
"""
from __future__ import annotations

import torch


def clip_global_grad_norm_(params, max_norm: float, eps: float) -> float:
    """Scale every gradient by min(1, max_norm / (‖g‖₂ + eps)), ‖g‖₂ over all of them; the factor."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or max_norm <= 0:
        return 1.0
    norm = torch.sqrt(sum((g.detach().float() ** 2).sum() for g in grads))
    factor = float(torch.clamp(max_norm / (norm + eps), max=1.0))
    if factor < 1.0:
        for g in grads:
            g.mul_(factor)
    return factor


def _with_clip(opt_cls):
    class Clipped(opt_cls):
        """`opt_cls` whose step first clips the global gradient norm to `max_grad_norm` (when > 0)."""

        def __init__(self, params, *, max_grad_norm: float = 0.0, **kw):
            super().__init__(params, **kw)
            self.max_grad_norm = float(max_grad_norm)

        @torch.no_grad()
        def step(self, closure=None):
            if self.max_grad_norm > 0:
                every = [p for g in self.param_groups for p in g["params"]]
                clip_global_grad_norm_(every, self.max_grad_norm, self.param_groups[-1]["eps"])
            return super().step(closure)

    Clipped.__name__ = f"Clipped{opt_cls.__name__}"
    return Clipped


def _all_cuda(groups: list[dict]) -> bool:
    """Whether every parameter of `groups` is a floating-point tensor on a CUDA device (what torch's
    fused Adam takes)."""
    every = [q for g in groups for q in g["params"]]
    return bool(every) and all(q.is_cuda and q.is_floating_point() for q in every)


def build_optimizer(groups: list[dict], p) -> torch.optim.Optimizer:
    """The optimiser of `params.optimizer` (`p`) over a representation's parameter groups."""
    groups = [dict(g, lr=g["lr"] * p.lr_scale) for g in groups]
    for g in groups:
        g["base_lr"] = g["lr"]
    if p.name == "adam":
        cls = _with_clip(torch.optim.Adam) if p.max_grad_norm > 0 else torch.optim.Adam
        kw = {"max_grad_norm": p.max_grad_norm} if p.max_grad_norm > 0 else {}
        if p.fused and _all_cuda(groups):
            kw["fused"] = True  # one kernel for every parameter, no host work a step: the same update
        return cls(groups, betas=tuple(p.betas), eps=p.eps, weight_decay=p.weight_decay, **kw)
    if p.name == "adan":
        from timm.optim import Adan

        return _with_clip(Adan)(groups, betas=tuple(p.betas), eps=p.eps, weight_decay=p.weight_decay,
                                max_grad_norm=p.max_grad_norm, foreach=False)
    raise ValueError(f"unknown optimizer {p.name!r}")
