"""Label-smoothed cross-entropy, as fairseq's `label_smoothed_cross_entropy` criterion.

Definition (fairseq): with smoothing eps and vocabulary size V, let
eps_i = eps / (V - 1), nll = -log p(target) and smooth = -sum_v log p(v). Then

    loss = (1 - eps - eps_i) * nll + eps_i * smooth

i.e. cross-entropy against a target distribution that puts 1 - eps on the reference
token and eps / (V - 1) on each of the other V - 1 tokens.

PyTorch's `cross_entropy(label_smoothing=e)` instead mixes in a uniform distribution
over all V tokens (1 - e + e/V on the reference, e/V elsewhere). The two coincide when
e = eps * V / (V - 1); with eps = 0 both are plain cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mt.special import PAD


def label_smoothed_nll(
    logits: torch.Tensor, target: torch.Tensor, smoothing: float, ignore_index: int = PAD
) -> tuple[torch.Tensor, torch.Tensor]:
    """(smoothed loss, nll), each summed over the tokens whose target != ignore_index.

    logits: (N, V) or (B, T, V), any float dtype; computed in float32 regardless, since
    bf16/fp16 log-probabilities are too coarse for a loss. target: (N,) or (B, T) ids.
    Both results are float32 scalars and keep their graph; divide by the token count
    (e.g. `Batch.n_tgt_tokens`) for a per-token value, and detach nll before logging.
    """
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match target {tuple(target.shape)}")
    vocab = logits.shape[-1]
    if smoothing > 0 and vocab < 2:
        raise ValueError("label smoothing needs a vocabulary of at least 2")

    lprobs = F.log_softmax(logits.reshape(-1, vocab).float(), dim=-1)
    target = target.reshape(-1)
    keep = target != ignore_index
    # ignore_index need not be a valid class id (e.g. -100); gather a safe one and mask it.
    safe_target = target.masked_fill(~keep, 0).unsqueeze(-1)

    nll = -lprobs.gather(-1, safe_target).squeeze(-1)
    nll_sum = nll.masked_fill(~keep, 0.0).sum()
    if smoothing == 0:
        return nll_sum, nll_sum
    # -sum_v log p(v): a row reduction, no one-hot or smoothed target tensor is built.
    smooth_sum = -lprobs.sum(-1).masked_fill(~keep, 0.0).sum()
    eps_i = smoothing / (vocab - 1)
    loss_sum = (1.0 - smoothing - eps_i) * nll_sum + eps_i * smooth_sum
    return loss_sum, nll_sum
