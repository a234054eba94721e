"""The GPU paths: bf16 autocast training, fused AdamW, decoding on the GPU. Skipped without CUDA."""

import pytest
import torch

from mt.config import ModelConfig
from mt.model import Transformer
from mt.special import BOS, EOS
from mt.train.loss import label_smoothed_nll
from mt.translate.search import greedy

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _pairs(device, n=8, length=6, vocab=30):
    g = torch.Generator().manual_seed(0)
    body = torch.randint(4, vocab, (n, length), generator=g)
    src = torch.cat([body, torch.full((n, 1), EOS)], 1)
    return src.to(device), torch.cat([torch.full((n, 1), BOS), body], 1).to(device), src.to(device)


@cuda
def test_bf16_training_learns_a_copy_task():
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(d_model=32, heads=2, ffn_dim=64, layers=1, dropout=0.0), 30, 30).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
    src, tin, tout = _pairs(dev)
    for _ in range(300):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = label_smoothed_nll(model(src, tin), tout, 0.0)
        (loss / tout.numel()).backward()
        opt.step()
        opt.zero_grad()
    assert float(loss) / tout.numel() < 0.1
    out = greedy(model.eval(), src, max_len_a=1.0, max_len_b=2)
    assert [h.tokens for h in out] == [row[:-1].tolist() for row in src.cpu()]


@cuda
def test_gpu_and_cpu_decode_alike():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(d_model=32, heads=2, ffn_dim=64, layers=1, dropout=0.0), 30, 30).eval()
    src, _, _ = _pairs("cpu")
    cpu = greedy(model, src, max_len_a=1.0, max_len_b=3)
    gpu = greedy(model.cuda(), src.cuda(), max_len_a=1.0, max_len_b=3)
    assert [h.tokens for h in cpu] == [h.tokens for h in gpu]
