"""A plain-PyTorch stand-in for TRL 1.15's Triton log-prob kernel, for machines without Triton.

TRL 1.15's GRPOTrainer always computes per-token log-probs through
``trl.trainer.utils._ChunkedLogProbFunction``, a Triton kernel; where Triton is missing (the
CPU wheel of PyTorch) that name is ``None`` and GRPO fails with
``'NoneType' object has no attribute 'apply'``. TRL plans a torch fallback
(huggingface/trl#7244); until it ships, :func:`install` puts this one in its place. It
computes the same outputs from materialised logits (fine for the small CPU models it serves)
and lets autograd do the backward. It is never installed where the Triton kernel exists.
"""

from __future__ import annotations

from typing import Any

import torch


class TorchLogProb:
    """Same call signature and outputs as TRL's ``ChunkedLogProbFunction.apply``."""

    @staticmethod
    def apply(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
              temperature: float, chunk_size: int, final_logit_softcapping: float | None = None,
              logit_scale: float = 1.0, outputs: tuple[str, ...] = ()) -> tuple[Any, ...]:
        z = torch.nn.functional.linear(hidden, weight, bias).float() * logit_scale
        if final_logit_softcapping is not None:
            z = final_logit_softcapping * torch.tanh(z / final_logit_softcapping)
        z = z / temperature
        log_z = torch.logsumexp(z, dim=-1)
        target = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        logprobs = target - log_z
        entropy = log_sum_sq = mean_logits = is_top1 = None
        if "entropy" in outputs:
            entropy = log_z - (torch.softmax(z, -1) * z).sum(-1)
        if "log_sum_sq_probs" in outputs:
            log_sum_sq = torch.logsumexp(2 * z, dim=-1) - 2 * log_z
        if "mean_logits" in outputs:
            mean_logits = z.mean(-1)
        if "is_top1" in outputs:
            is_top1 = targets == z.argmax(-1)
        return logprobs, entropy, log_sum_sq, mean_logits, is_top1


def install() -> bool:
    """Install the fallback if TRL has no kernel here; True when it did."""
    import trl.trainer.utils as trl_utils

    if getattr(trl_utils, "_ChunkedLogProbFunction", None) is not None:
        return False
    trl_utils._ChunkedLogProbFunction = TorchLogProb
    return True
