"""The language-model loss over a long token stream: Σ cross-entropy of the output layer's logits.

At 64K tokens and a 128K vocabulary the logits alone would take 32 GB in fp32. The loss is
therefore computed `chunk` rows at a time, and each chunk's gradient is formed right away in the
forward pass (softmax − one-hot, then the two matmuls that carry it to the hidden states and to
the output weight): only one chunk of logits is ever alive, and the output matmul is never
recomputed in backward. Backward just scales the stored gradients by the incoming one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

IGNORE = -100  # the label of a token that has none (a document's last token, padding)

LogitGrads = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def logit_grads(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ cross-entropy of the rows (fp32 or wider) and its gradient w.r.t. the logits (their dtype);
    rows labelled IGNORE add nothing. A compiled region on GPU (trainer/compiled.py)."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    valid = labels != IGNORE
    target = labels.clamp_min(0)[:, None]
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    loss = ((lse - x.gather(1, target))[:, 0] * valid).sum()
    onehot = torch.zeros_like(x).scatter_(1, target, 1.0)
    grad = (torch.exp(x - lse) - onehot) * valid[:, None]
    return loss, grad.to(logits.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int,
                grads_of: LogitGrads) -> torch.Tensor:
        dh = torch.empty_like(h)
        dw = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32), device=weight.device)
        total = torch.zeros((), dtype=dw.dtype, device=h.device)
        for start in range(0, h.shape[0], chunk):
            rows = slice(start, start + chunk)
            logits = h[rows] @ weight.t()  # (under autocast: bf16 matmuls)
            # (a copy: a slice's storage offset would be one more thing a compiled grads_of specialises on,
            # compiling again for a micro-batch shorter than one chunk)
            loss, grad = grads_of(logits, labels[rows].clone())
            total += loss
            dh[rows] = grad @ weight
            dw += grad.t() @ h[rows]
        ctx.save_for_backward(dh, dw)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        dh, dw = ctx.saved_tensors
        return dh * grad_total.to(dh.dtype), (dw * grad_total).to(ctx.weight_dtype), None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int,
                         grads_of: LogitGrads = logit_grads) -> torch.Tensor:
    """Σ over rows of cross-entropy(h @ weightᵀ, labels), `chunk` rows of logits at a time."""
    return _LinearCrossEntropy.apply(h, weight, labels, max(1, chunk), grads_of)
