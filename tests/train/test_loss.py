import math

import pytest
import torch
import torch.nn.functional as F

from mt.special import PAD
from mt.train.loss import label_smoothed_nll


def _example():
    # 3 tokens, 4 classes; the last token is padding.
    logits = torch.tensor([[1.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [5.0, -1.0, 2.0, 3.0]])
    target = torch.tensor([1, 3, PAD])
    return logits, target


def test_hand_computed():
    logits, target = _example()
    eps = 0.1
    # Row 0: logsumexp = log(e + e^2 + 2); row 1: uniform, log p = -log 4.
    lse0 = math.log(math.e + math.e**2 + 2)
    nll0, nll1 = lse0 - 2.0, math.log(4)
    smooth0, smooth1 = 4 * lse0 - 3.0, 4 * math.log(4)
    eps_i = eps / 3
    want_loss = (1 - eps - eps_i) * (nll0 + nll1) + eps_i * (smooth0 + smooth1)
    loss, nll = label_smoothed_nll(logits, target, eps)
    assert nll.item() == pytest.approx(nll0 + nll1, rel=1e-6)
    assert loss.item() == pytest.approx(want_loss, rel=1e-6)
    # fairseq's target distribution: 1 - eps on the reference, eps / (V - 1) elsewhere
    dist = torch.full((2, 4), eps / 3)
    dist[0, 1] = dist[1, 3] = 1 - eps
    assert loss.item() == pytest.approx(-(dist * F.log_softmax(logits[:2], -1)).sum().item(), rel=1e-6)


def test_matches_torch_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    target = torch.randint(1, 7, (2, 5))
    target[1, 3:] = PAD
    eps, vocab = 0.1, 7
    loss, nll = label_smoothed_nll(logits, target, eps)
    flat_logits, flat_target = logits.reshape(-1, vocab), target.reshape(-1)
    ce = F.cross_entropy(flat_logits, flat_target, ignore_index=PAD, reduction="sum")
    # torch mixes in uniform over all V classes: equal to fairseq's eps at e = eps * V / (V - 1)
    ce_ls = F.cross_entropy(
        flat_logits, flat_target, ignore_index=PAD, reduction="sum", label_smoothing=eps * vocab / (vocab - 1)
    )
    assert nll.item() == pytest.approx(ce.item(), rel=1e-5)
    assert loss.item() == pytest.approx(ce_ls.item(), rel=1e-5)
    assert loss.dtype == nll.dtype == torch.float32


@pytest.mark.low_precision
def test_no_smoothing_is_cross_entropy_and_bf16_input():
    logits, target = _example()
    loss, nll = label_smoothed_nll(logits.bfloat16(), target, 0.0)
    ce = F.cross_entropy(logits.bfloat16().float(), target, ignore_index=PAD, reduction="sum")
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ce.item(), rel=1e-6) and nll.item() == loss.item()


def test_gradient_and_custom_ignore_index():
    logits, _ = _example()
    logits.requires_grad_(True)
    target = torch.tensor([1, 3, -100])
    loss, _ = label_smoothed_nll(logits, target, 0.1, ignore_index=-100)
    loss.backward()
    assert torch.all(logits.grad[2] == 0) and logits.grad[:2].abs().sum() > 0


def test_shape_mismatch():
    with pytest.raises(ValueError):
        label_smoothed_nll(torch.zeros(2, 3, 4), torch.zeros(2, 2, dtype=torch.long), 0.1)
