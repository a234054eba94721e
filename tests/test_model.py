"""Tests of mt.model on tiny seeded models (each runs in well under a second, the
overfitting test in a few)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import mt.model
from mt.config import ModelConfig
from mt.model import DecoderCache, Linear, Memory, Transformer, _attend, pack_linear_weights
from mt.special import BOS, EOS, PAD

V = 23



def tiny(seed: int = 0, vocab: tuple[int, int] = (V, V), **kw) -> Transformer:
    opts = dict(d_model=32, heads=4, ffn_dim=64, layers=2, decoder_layers=0, dropout=0.1, max_positions=64)
    opts.update(kw)
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**opts), *vocab).eval()


def sentences(lengths: list[int], vocab: int = V, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (n - 1,), generator=g).tolist() + [EOS] for n in lengths]


def pad(rows: list[list[int]], width: int | None = None) -> torch.Tensor:
    width = width or max(map(len, rows))
    return torch.tensor([r + [PAD] * (width - len(r)) for r in rows])


def test_shapes():
    model = tiny()
    src = pad(sentences([5, 7, 3]))
    tgt = pad([[BOS] + s for s in sentences([4, 6, 2], seed=2)])
    memory = model.encode(src)
    assert isinstance(memory, Memory)
    assert memory.out.shape == (3, 7, 32)
    assert memory.src_pad.dtype == torch.bool and memory.src_pad.shape == (3, 7)
    assert torch.equal(memory.src_pad, src.eq(PAD))
    logits = model(src, tgt)
    assert logits.shape == (3, 7, V) and logits.is_contiguous()
    assert torch.equal(logits, model.decode(tgt, memory))


def test_decoder_layers_and_vocab_sizes():
    model = tiny(layers=2, decoder_layers=3, vocab=(V, 31), tie_embeddings=False)
    assert len(model.encoder) == 2 and len(model.decoder) == 3
    src, tgt = pad(sentences([4, 6])), pad(sentences([5, 2], vocab=31))
    assert model(src, tgt).shape == (2, 5, 31)


@pytest.mark.parametrize("pre_norm", [True, False])
def test_causal(pre_norm):
    model = tiny(pre_norm=pre_norm)
    src = pad(sentences([6, 4]))
    tgt = pad(sentences([8, 8], seed=3))
    logits = model(src, tgt)
    for j in (0, 3, 7):
        changed = tgt.clone()
        changed[:, j] = (changed[:, j] + 1 - 4) % (V - 4) + 4
        other = model(src, changed)
        torch.testing.assert_close(other[:, :j], logits[:, :j], rtol=0, atol=1e-6)
        assert not torch.allclose(other[:, j:], logits[:, j:])


@pytest.mark.parametrize("pre_norm", [True, False])
def test_padding_invariance(pre_norm):
    model = tiny(pre_norm=pre_norm, learned_positions=not pre_norm)
    src_rows = sentences([5, 9, 3])
    tgt_rows = [[BOS] + s for s in sentences([4, 7, 6], seed=4)]
    src, tgt = pad(src_rows, 12), pad(tgt_rows, 10)  # more padding than needed
    memory = model.encode(src)
    logits = model.decode(tgt, memory)
    for i, (s, t) in enumerate(zip(src_rows, tgt_rows, strict=True)):
        alone_mem = model.encode(torch.tensor([s]))
        alone = model.decode(torch.tensor([t]), alone_mem)
        torch.testing.assert_close(memory.out[i, : len(s)], alone_mem.out[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(logits[i, : len(t)], alone[0], rtol=0, atol=1e-5)


def test_all_padding_row_is_finite():
    model = tiny()
    src = torch.tensor([[5, 6, EOS], [PAD, PAD, PAD]])
    logits = model(src, torch.tensor([[BOS, 7], [BOS, 8]]))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "opts",
    [dict(pre_norm=True), dict(pre_norm=False), dict(learned_positions=True), dict(activation="gelu")],
)
def test_cached_decode_equals_full(opts, positions_outer):
    model = tiny(**opts)
    src = pad(sentences([5, 8, 3]))
    tgt = pad([[BOS] + s for s in sentences([7, 7, 7], seed=5)])
    memory = model.encode(src)
    full = model.decode(tgt, memory)  # (3, 8, V)

    cache = model.new_cache()
    steps = [model.decode(tgt[:, t : t + 1], memory, cache) for t in range(tgt.size(1))]
    assert cache.length == tgt.size(1)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5)

    # Several new tokens at once, also after a cached prefix (needs an offset causal mask).
    cache = DecoderCache()
    chunks = [model.decode(tgt[:, a:b], memory, cache) for a, b in [(0, 3), (3, 4), (4, 8)]]
    torch.testing.assert_close(torch.cat(chunks, 1), full, rtol=0, atol=1e-5)


def test_cache_groups_and_reorder(positions_outer):
    """Rows grouped per sentence (beam search) and reordering, against full decoding."""
    model = tiny()
    src = pad(sentences([5, 8, 3]))
    g = 4
    memory = model.encode(src)
    prefixes = torch.randint(4, V, (3 * g, 9), generator=torch.Generator().manual_seed(6))
    prefixes[:, 0] = BOS

    def full(rows: torch.Tensor, t: int) -> torch.Tensor:
        # Non-cached reference: each row's whole prefix, its sentence's memory repeated.
        sent = torch.arange(3).repeat_interleave(g)[rows]
        return model.decode(prefixes[rows, : t + 1], memory.index_select(sent))[:, -1]

    cache = model.new_cache()
    rows = torch.arange(3 * g)
    reorders = {
        2: torch.tensor([1, 1, 0, 3, 6, 4, 4, 5, 8, 11, 10, 9]),  # within sentences: stays grouped
        4: torch.tensor([0, 2, 3, 3, 8, 8, 9, 11]),  # drop sentence 1
        6: torch.tensor([5, 0, 2, 7, 1, 3, 4, 6]),  # mixes sentences: one cross entry per row
    }
    for t in range(9):
        if t in reorders:
            cache.reorder(reorders[t])
            rows = rows[reorders[t]]
        step = model.decode(prefixes[rows, t : t + 1], memory, cache)[:, -1]
        torch.testing.assert_close(step, full(rows, t), rtol=0, atol=1e-5)
        if t < 4:
            assert cache.group == g and cache.cross_kv[0][0].size(0) == 3
    assert cache.group == 1 and cache.cross_kv[0][0].size(0) == 8


def test_moving_the_last_rows_into_dropped_places_equals_reordering_by_the_same_index(positions_outer):
    """Greedy search drops finished rows by moving the last ones into their places: the cache
    then continues exactly as after `reorder` with the index those moves make, and only the
    moved rows were copied (the rows that stay keep their memory)."""
    model = tiny()
    src = pad(sentences([5, 8, 3, 6, 4]))
    memory = model.encode(src)
    tokens = torch.randint(4, V, (5, 4), generator=torch.Generator().manual_seed(3))
    moved, reordered = model.new_cache(), model.new_cache()
    with torch.inference_mode():
        for cache in (moved, reordered):
            for t in range(2):
                model.decode(tokens[:, t : t + 1], memory, cache)
        dst, src_rows, keep = torch.tensor([1]), torch.tensor([4]), torch.tensor([0, 4, 2, 3])  # drop row 1
        row0 = moved.self_kv[0].view()[0][0]
        kept, at = row0.clone(), row0.data_ptr()
        moved.move_rows(dst, src_rows, 4)
        moved.move_entries(dst, src_rows, 4)
        reordered.reorder(keep)
        row0 = moved.self_kv[0].view()[0][0]
        assert row0.data_ptr() == at and torch.equal(row0, kept)  # row 0 stayed where it was
        for t in range(2, 4):
            a = model.decode(tokens[keep, t : t + 1], memory, moved)
            b = model.decode(tokens[keep, t : t + 1], memory, reordered)
            assert torch.equal(a, b)


def test_beam_reordering_leaves_one_position_that_the_next_step_fills_in_place(positions_outer):
    """Beam search reorders the cache at every step: the gather leaves room for one more
    position and the next step writes its keys and values there (no concatenation). When a
    step does not fit, rows outer makes whole buffers again (attention reads them whole:
    strided views were 4x slower), positions outer leaves room for a few more steps."""
    model = tiny()
    src = pad(sentences([5, 8, 3]))
    memory, cache = model.encode(src), model.new_cache()
    with torch.inference_mode():
        model.decode(torch.full((3, 1), BOS), memory, cache)
        cache.reorder(torch.arange(3).repeat_interleave(2), within=2)  # one row becomes two
        kv = cache.self_kv[0]
        at = kv.view()[0].data_ptr()
        assert kv.view()[0].shape == (6, 4, 1, 8)
        model.decode(torch.full((6, 1), 7), memory, cache)
        assert kv.view()[0].data_ptr() == at and kv.length == 2  # filled in place
        k, v = kv.append(torch.zeros(6, 4, 1, 8), torch.zeros(6, 4, 1, 8))  # no room: new buffers
        assert k.data_ptr() != at and v.shape == (6, 4, 3, 8) and k.is_contiguous() != positions_outer
        k2, _ = kv.append(torch.ones(6, 4, 1, 8), torch.ones(6, 4, 1, 8))
        assert (k2.data_ptr() == k.data_ptr()) == positions_outer  # room kept, or whole again
        assert torch.equal(k2[:, :, :3], k) and torch.equal(k2[:, :, 3], torch.ones(6, 4, 8))


def test_tied_weights_share_storage():
    joint = tiny(tie_embeddings=True)
    ptr = joint.tgt_embed.weight.data_ptr()
    assert joint.src_embed.weight.data_ptr() == ptr and joint.out_proj.weight.data_ptr() == ptr
    assert joint.tgt_embed.weight[PAD].abs().sum() == 0

    split = tiny(tie_embeddings=True, vocab=(V, 31))
    assert split.out_proj.weight.data_ptr() == split.tgt_embed.weight.data_ptr()
    assert split.src_embed.weight.data_ptr() != split.tgt_embed.weight.data_ptr()

    untied = tiny(tie_embeddings=False)
    ptrs = {untied.src_embed.weight.data_ptr(), untied.tgt_embed.weight.data_ptr()}
    assert len(ptrs | {untied.out_proj.weight.data_ptr()}) == 3
    n_joint = sum(p.numel() for p in joint.parameters())
    assert n_joint == sum(p.numel() for p in untied.parameters()) - 2 * V * 32


def test_dropout_only_in_training():
    model = tiny(dropout=0.3, attention_dropout=0.2, activation_dropout=0.2)
    src, tgt = pad(sentences([5, 4])), pad(sentences([6, 3], seed=7))
    assert torch.equal(model(src, tgt), model(src, tgt))
    model.train()
    assert not torch.equal(model(src, tgt), model(src, tgt))


def test_overfits_a_few_pairs():
    model = tiny(seed=3, dropout=0.0).train()
    src_rows = sentences([6, 5, 7, 4], seed=8)
    tgt_rows = sentences([5, 7, 4, 6], seed=9)
    src = pad(src_rows)
    tgt_in = pad([[BOS] + t[:-1] for t in tgt_rows])
    tgt_out = pad(tgt_rows)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(200):
        loss = F.cross_entropy(model(src, tgt_in).view(-1, V), tgt_out.view(-1), ignore_index=PAD)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.02
    model.eval()
    assert torch.equal(model(src, tgt_in).argmax(-1)[tgt_out.ne(PAD)], tgt_out[tgt_out.ne(PAD)])


@pytest.mark.low_precision
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_attention_matches_sdpa(dtype):
    """At inference on CPU, attention is two matmuls (`_attend`); it computes what sdpa does,
    with a key-padding mask, with a causal mask, and folded queries of several rows."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(3, 2, t, 8, generator=g) for t in (5, 7, 7))
    mask = torch.rand(3, 1, 1, 7, generator=g) > 0.4
    mask[..., 0] = True  # every query sees a key
    tol = dict(rtol=0, atol=1e-6) if dtype == torch.float32 else dict(rtol=0, atol=3e-2)
    cases = [(q, mask, False), (k, None, True), (q, None, False)]
    for query, m, causal in cases:
        ref = F.scaled_dot_product_attention(query, k, v, attn_mask=m, is_causal=causal)
        with torch.inference_mode():
            out = _attend(query.to(dtype), k.to(dtype), v.to(dtype), m, causal, 0.0)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref, **tol)


def test_inference_decoding_equals_training_path():
    """Cached incremental decoding under inference_mode (the matmul attention) gives the
    logits of one teacher-forced pass with autograd on (sdpa)."""
    model = tiny()
    src = pad(sentences([5, 8, 3]))
    tgt = pad([[BOS] + s for s in sentences([6, 6, 6], seed=7)])
    full = model.decode(tgt, model.encode(src))
    with torch.inference_mode():
        memory, cache = model.encode(src), model.new_cache()
        steps = torch.cat([model.decode(tgt[:, t : t + 1], memory, cache) for t in range(tgt.size(1))], 1)
    torch.testing.assert_close(steps, full.detach(), rtol=0, atol=1e-5)


@pytest.mark.low_precision
def test_bf16_model_stays_close_to_fp32():
    model = tiny()
    src = pad(sentences([5, 8, 3]))
    tgt = pad([[BOS] + s for s in sentences([6, 6, 6], seed=7)])
    with torch.inference_mode():
        ref = torch.log_softmax(model.decode(tgt, model.encode(src)), -1)
        half = model.to(torch.bfloat16)
        out = torch.log_softmax(half.decode(tgt, half.encode(src)).float(), -1)
    # bf16 keeps 8 bits of mantissa: log-probabilities within a few hundredths.
    torch.testing.assert_close(out, ref, rtol=0, atol=0.1)


def test_inference_on_an_accelerator_never_selects_cudnn_attention(monkeypatch):
    """cuDNN's attention plans for every new key length (each decoding step's): inference off the
    CPU must call sdpa with that kernel disabled, and training leaves the choice to torch. The
    model runs on the meta device, which takes the accelerator path without a GPU."""
    cudnn_enabled: list[tuple[bool, bool]] = []  # (grad enabled, cuDNN allowed) of each sdpa call
    sdpa = F.scaled_dot_product_attention

    def recording(*args, **kwargs):
        cudnn_enabled.append((torch.is_grad_enabled(), torch.backends.cuda.cudnn_sdp_enabled()))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    model = tiny().to("meta")
    src = pad(sentences([5, 8, 3])).to("meta")
    with torch.inference_mode():
        memory, cache = model.encode(src), model.new_cache()
        for _ in range(3):  # decoding steps, each with a longer self-attention key
            model.decode(torch.full((3, 1), BOS, device="meta"), memory, cache)
    assert len(cudnn_enabled) == 2 * 1 + 3 * 2 * 2  # encoder layers, then self and cross per step
    assert not any(allowed for _, allowed in cudnn_enabled)
    assert torch.backends.cuda.cudnn_sdp_enabled()  # restored after each call
    cudnn_enabled.clear()
    model.train()(src, torch.full((3, 2), BOS, device="meta"))
    assert cudnn_enabled and all(grad and allowed for grad, allowed in cudnn_enabled)


@pytest.mark.parametrize("library", ["mkl", "onednn", "torch"])
def test_inference_linear_on_a_cpu_equals_f_linear_and_follows_weight_updates(library, monkeypatch):
    """At inference on a CPU in float32, Linear computes with MKL (Intel CPUs), oneDNN (other
    CPUs) or F.linear (neither, or a layer being trained): the same numbers as F.linear up to
    float32 rounding, with ReLU applied. A frozen layer lays its weight out once; that copy
    follows load_state_dict and stays out of state dicts and copies. A trainable layer never
    makes one: a fused AdamW step changes the weight without counting a version."""
    onednn = hasattr(torch.ops.mkldnn, "_linear_pointwise") and torch.backends.mkldnn.is_available()
    if not {"mkl": torch.backends.mkl.is_available(), "onednn": onednn, "torch": True}[library]:
        pytest.skip(f"torch has no {library} here")
    monkeypatch.setattr(mt.model, "_MKL_LINEAR", library == "mkl")
    monkeypatch.setattr(mt.model, "_ONEDNN_LINEAR", library == "onednn")
    torch.manual_seed(0)
    x = torch.randn(5, 3, 16)
    for lin in (Linear(16, 24), Linear(16, 24, bias=False), Linear(16, 24).requires_grad_(False)):
        ref = F.linear(x, lin.weight, lin.bias).detach()
        assert torch.equal(lin(x), ref)  # with autograd on: F.linear itself
        with torch.inference_mode():
            torch.testing.assert_close(lin(x), ref, rtol=0, atol=1e-5)
            torch.testing.assert_close(lin(x, relu=True), F.relu(ref), rtol=0, atol=1e-5)
            strided = x.transpose(0, 1)  # (3, 5, 16), not contiguous
            torch.testing.assert_close(lin(strided), ref.transpose(0, 1), rtol=0, atol=1e-5)
            assert lin(x[:0]).shape == (0, 3, 24)  # no rows
        assert (lin._packed is not None) == (library != "torch" and not lin.weight.requires_grad)

    layer = Linear(16, 24)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1, fused=True)
    for _ in range(2):
        layer(x).sum().backward()
        opt.step()
        with torch.no_grad():
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=0, atol=1e-5)

    frozen = Linear(16, 24).requires_grad_(False)
    with torch.no_grad():
        frozen(x)
        frozen.load_state_dict({"weight": torch.ones(24, 16), "bias": torch.zeros(24)})
        torch.testing.assert_close(frozen(x), x.sum(-1, keepdim=True).expand(5, 3, 24), rtol=0, atol=1e-5)
    assert set(frozen.state_dict()) == {"weight", "bias"}
    twin = copy.deepcopy(frozen)
    assert twin._packed is None
    with torch.inference_mode():
        torch.testing.assert_close(twin(x), frozen(x), rtol=0, atol=0)


@pytest.mark.parametrize("library", ["mkl", "onednn", "torch"])
def test_packing_lays_out_the_frozen_weights_before_any_use(library, monkeypatch):
    """What decoder processes are forked after: the parent's copies, which they then share."""
    onednn = hasattr(torch.ops.mkldnn, "_linear_pointwise") and torch.backends.mkldnn.is_available()
    if not {"mkl": torch.backends.mkl.is_available(), "onednn": onednn, "torch": True}[library]:
        pytest.skip(f"torch has no {library} here")
    monkeypatch.setattr(mt.model, "_MKL_LINEAR", library == "mkl")
    monkeypatch.setattr(mt.model, "_ONEDNN_LINEAR", library == "onednn")
    model = Transformer(ModelConfig(d_model=16, heads=2, ffn_dim=32, layers=1), 40, 40)
    model.decoder.requires_grad_(False)  # the encoder stays trainable: never packed
    pack_linear_weights(model)
    for name, m in model.named_modules():
        if isinstance(m, Linear):
            assert (m._packed is not None) == (library != "torch" and not m.weight.requires_grad), name
    if library != "torch":
        ours = model.decoder[0].ffn.fc1
        kept = ours._packed
        with torch.inference_mode():
            ours(torch.randn(2, 16))
        assert ours._packed is kept  # used as it is
