"""Target distributions for verification: temperature and top-p (nucleus), per row.

A row with temperature 0 is greedy: its distribution is the one-hot of the argmax, so greedy and sampled requests
go through the same lossless rule (see verify_torch.py). Probabilities are float64: the verification walk compares
a uniform coin with running sums of them.
"""

from __future__ import annotations

import torch


def target_probs(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits [T, V]; temperature, top_p [T] -> probabilities [T, V] float64."""
    logits = logits.double()
    greedy = temperature <= 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature).double()
    probs = torch.softmax(logits / t[:, None], dim=-1)
    if bool((top_p < 1).any()):
        probs = apply_top_p(probs, top_p.double())
    if bool(greedy.any()):
        onehot = torch.zeros_like(probs)
        onehot.scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
        probs = torch.where(greedy[:, None], onehot, probs)
    return probs


def apply_top_p(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (at least one), renormalised."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(dim=-1) - sorted_p  # mass strictly before each token
    keep_sorted = before < top_p[:, None]
    keep_sorted[:, 0] = True
    keep = torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)
    out = torch.where(keep, probs, torch.zeros_like(probs))
    return out / out.sum(dim=-1, keepdim=True)
