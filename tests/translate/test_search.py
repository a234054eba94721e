"""Tests of mt.translate.search on tiny seeded models (a tiny model is trained once, in ~2 s)."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_agree_up_to_near_ties, divergence_gap

from mt.config import ModelConfig
from mt.model import Transformer
from mt.special import BOS, EOS, PAD
from mt.translate import search
from mt.translate.search import Hypothesis, beam_search, greedy, max_lengths

V = 19



def tiny(seed: int = 0, **kw) -> Transformer:
    opts = dict(d_model=32, heads=4, ffn_dim=64, layers=2, dropout=0.0, max_positions=64)
    opts.update(kw)
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**opts), V, V).eval()


def random_batch(n: int, seed: int, lo: int = 3, hi: int = 9) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(lo, hi, (1,), generator=g))
        rows.append(torch.randint(4, V, (length - 1,), generator=g).tolist() + [EOS])
    width = max(map(len, rows))
    return torch.tensor([r + [PAD] * (width - len(r)) for r in rows])


def unpad(src: torch.Tensor) -> list[torch.Tensor]:
    return [row[row.ne(PAD)][None] for row in src]


def train_tiny() -> Transformer:
    """A tiny model trained on 12 fixed random pairs (target: the source reversed, its tokens
    remapped), so that its distributions are peaked but not trivial."""
    model = tiny(seed=1, dropout=0.1).train()
    src = random_batch(12, seed=2)
    tgt = []
    for row in src:
        words = row[row.ne(PAD)][:-1].flip(0)
        tgt.append(((words * 3) % (V - 4) + 4).tolist() + [EOS])
    width = max(map(len, tgt))
    tgt_out = torch.tensor([t + [PAD] * (width - len(t)) for t in tgt])
    tgt_in = torch.cat([torch.full((12, 1), BOS), tgt_out[:, :-1]], 1).masked_fill(tgt_out.eq(PAD), PAD)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(120):
        loss = F.cross_entropy(model(src, tgt_in).view(-1, V), tgt_out.view(-1), ignore_index=PAD)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()  # the caller's to set: the search assumes it


@pytest.fixture(scope="module")
def trained() -> Transformer:
    return train_tiny()


def greedy_tokens(model: Transformer, src: torch.Tensor, **kw) -> list[list[int]]:
    return [h.tokens for h in greedy(model, src, **kw)]


def score_of(model: Transformer, src: torch.Tensor, tokens: list[int], ended: bool) -> float:
    """Teacher-forced log-probability of `tokens` (+ EOS when `ended`) for a (1, S) source."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = tokens + [EOS] if ended else tokens
        lp = F.log_softmax(model(src, torch.tensor([[BOS] + out[:-1]])).float(), -1)[0]
    model.train(was_training)
    return float(lp[torch.arange(len(out)), torch.tensor(out)].sum())


def test_dropping_rows_moves_the_last_survivors_into_the_places_of_finished_ones():
    done = torch.tensor([False, True, False, True, False, False, True, False])
    keep, dst, src = search.drop_order(done)
    assert keep.tolist() == [0, 5, 2, 7, 4]  # rows 0, 2, 4 stay; 5 and 7 fill places 1 and 3
    assert dst.tolist() == [1, 3] and src.tolist() == [5, 7]
    keep, dst, src = search.drop_order(torch.tensor([False, False, True]))  # only the last ends
    assert keep.tolist() == [0, 1] and dst.numel() == src.numel() == 0
    keep, _, _ = search.drop_order(torch.ones(3, dtype=torch.bool))
    assert keep.numel() == 0


def test_search_leaves_the_mode_to_the_caller_and_returns_token_lists(trained):
    src = random_batch(5, seed=3)
    out = greedy_tokens(trained, src)
    assert not trained.training  # untouched, in either mode
    model = tiny().train()
    greedy(model, src)
    beam_search(model, src, beam=2)
    assert model.training
    assert len(out) == 5 and all(isinstance(t, int) for toks in out for t in toks)
    assert all(EOS not in toks and BOS not in toks and PAD not in toks for toks in out)


def test_greedy_translates_training_pairs(trained):
    src = random_batch(12, seed=2)
    out = greedy_tokens(trained, src)
    correct = 0
    for row, toks in zip(src, out, strict=True):
        words = row[row.ne(PAD)][:-1].flip(0)
        correct += toks == ((words * 3) % (V - 4) + 4).tolist()
    assert correct >= 10


@pytest.mark.parametrize("model_kind", ["trained", "random"])
def test_beam_1_equals_greedy(trained, model_kind):
    model = trained if model_kind == "trained" else tiny(seed=4)
    src = random_batch(9, seed=5)
    for alpha in (0.0, 1.0):
        hyps = [hs[0] for hs in beam_search(model, src, beam=1, max_len_a=1.0, max_len_b=3, alpha=alpha)]
        ours = greedy(model, src, max_len_a=1.0, max_len_b=3, alpha=alpha)
        assert [h.tokens for h in hyps] == [h.tokens for h in ours]
        assert [h.score for h in hyps] == pytest.approx([h.score for h in ours], abs=1e-5)
        assert [h.logprob for h in hyps] == pytest.approx([h.logprob for h in ours], abs=1e-5)


def test_beam_scores_at_least_greedy(trained):
    src = random_batch(12, seed=6)  # unseen sources: less peaked distributions
    limits = max_lengths(src, 1.2, 10, 1024).tolist()
    for alpha in (0.0, 1.0):
        hyps = beam_search(trained, src, beam=5, alpha=alpha)
        ours = greedy(trained, src, alpha=alpha)
        for row, g, hs, limit in zip(unpad(src), ours, hyps, limits, strict=True):
            ended = len(g.tokens) < limit
            lp = score_of(trained, row, g.tokens, ended)
            assert g.logprob == pytest.approx(lp, abs=1e-4)  # greedy computes its log-probability
            assert g.score == pytest.approx(lp / (len(g.tokens) + ended) ** alpha, abs=1e-4)
            assert hs[0].score >= g.score - 1e-4


def test_hypothesis_scores_match_model(trained):
    src = random_batch(6, seed=7)
    limits = max_lengths(src, 1.2, 10, 1024).tolist()
    for kind in ("fairseq", "gnmt"):
        for row, hs, limit in zip(
            unpad(src),
            beam_search(trained, src, beam=4, nbest=4, length_penalty=kind, alpha=0.7),
            limits,
            strict=True,
        ):
            for h in hs:
                assert isinstance(h, Hypothesis)
                ended = len(h.tokens) < limit
                n = len(h.tokens) + ended
                assert h.logprob == pytest.approx(score_of(trained, row, h.tokens, ended), abs=1e-4)
                lp = n**0.7 if kind == "fairseq" else ((5 + n) / 6) ** 0.7
                assert h.score == pytest.approx(h.logprob / lp, abs=1e-5)


@pytest.mark.parametrize("model_kind", ["trained", "random"])
def test_batch_invariance(trained, model_kind, monkeypatch, positions_outer):
    model = trained if model_kind == "trained" else tiny(seed=8, pre_norm=False, learned_positions=True)
    src = random_batch(10, seed=9, lo=2, hi=12)
    kw = dict(max_len_a=0.8, max_len_b=4)
    one_by_one = [greedy_tokens(model, row, **kw)[0] for row in unpad(src)]
    assert greedy_tokens(model, src, **kw) == one_by_one
    padded = torch.cat([src, torch.zeros(10, 3, dtype=torch.long)], 1)
    assert greedy_tokens(model, padded, **kw) == one_by_one
    batch = beam_search(model, src, beam=4, nbest=2, **kw)
    for row, hs in zip(unpad(src), batch, strict=True):
        alone = beam_search(model, row, beam=4, nbest=2, **kw)[0]
        assert [h.tokens for h in hs] == [h.tokens for h in alone]
        assert [h.score for h in hs] == pytest.approx([h.score for h in alone], abs=1e-5)
    # Big batches are searched in slices (here of 3 sentences): the same results.
    monkeypatch.setattr(search, "MAX_SCORES_PER_STEP", 3 * 4 * V)
    sliced = beam_search(model, src, beam=4, nbest=2, **kw)
    assert [[h.tokens for h in hs] for hs in sliced] == [[h.tokens for h in hs] for hs in batch]


def test_nbest_sorted(trained):
    src = random_batch(6, seed=10)
    for hs in beam_search(trained, src, beam=5, nbest=3):
        assert len(hs) == 3
        assert [h.score for h in hs] == sorted((h.score for h in hs), reverse=True)
        assert len({tuple(h.tokens) for h in hs}) == 3
    with pytest.raises(ValueError):
        beam_search(trained, src, beam=2, nbest=3)
    with pytest.raises(ValueError):
        beam_search(trained, src, length_penalty="wu")


def test_max_and_min_length(trained):
    model = tiny(seed=11)
    src = random_batch(8, seed=12)
    limits = max_lengths(src, 0.5, 1, 1024)
    assert limits.tolist() == [max(1, int(0.5 * n + 1)) for n in src.ne(PAD).sum(1).tolist()]
    for toks, limit in zip(greedy_tokens(model, src, max_len_a=0.5, max_len_b=1), limits, strict=True):
        assert len(toks) <= limit
    for hs, limit in zip(beam_search(model, src, nbest=3, max_len_a=0.5, max_len_b=1), limits, strict=True):
        assert all(len(h.tokens) <= limit for h in hs)
    # The trained model ends its outputs early; min_len forces them longer.
    src = random_batch(8, seed=13, lo=2, hi=5)
    assert min(len(t) for t in greedy_tokens(trained, src)) < 6
    assert min(len(t) for t in greedy_tokens(trained, src, min_len=6)) >= 6
    assert min(len(h.tokens) for hs in beam_search(trained, src, nbest=5, min_len=6) for h in hs) >= 6


def reference_beam(model, src, beam, nbest, max_len, min_len, alpha):
    """Beam search for one (1, S) sentence without a cache: every step re-decodes all prefixes."""
    memory = model.encode(src)
    mem = memory.index_select(torch.zeros(beam, dtype=torch.long))
    active = [[] for _ in range(beam)]
    scores = torch.tensor([0.0] + [float("-inf")] * (beam - 1))
    finished = []
    for step in range(max_len):
        prefixes = torch.tensor([[BOS] + toks for toks in active])
        lprobs = F.log_softmax(model.decode(prefixes, mem)[:, -1].float(), -1)
        lprobs[:, [PAD, BOS]] = float("-inf")
        if step < min_len:
            lprobs[:, EOS] = float("-inf")
        cand = (scores[:, None] + lprobs).view(-1)
        order = cand.argsort(descending=True, stable=True)[: 2 * beam].tolist()
        pen = (step + 1) ** alpha
        new_active, new_scores = [], []
        for rank, i in enumerate(order):
            k, v, s = i // V, i % V, cand[i]
            if v == EOS:
                if rank < beam and torch.isfinite(s):
                    finished.append((float(s) / pen, active[k]))
            elif len(new_active) < beam:
                new_active.append(active[k] + [v])
                new_scores.append(s)
        active, scores = new_active, torch.stack(new_scores)
        if step + 1 == max_len:
            finished += [
                (float(s) / pen, a) for a, s in zip(active, scores, strict=True) if torch.isfinite(s)
            ]
            break
        kth = sorted((f[0] for f in finished), reverse=True)[beam - 1] if len(finished) >= beam else -1e30
        if float(scores[0]) / pen <= kth:
            break
    finished.sort(key=lambda f: -f[0])
    return [toks for _, toks in finished[:nbest]]


@pytest.mark.parametrize("model_kind", ["trained", "random"])
def test_cached_beam_equals_uncached_reference(trained, model_kind, positions_outer):
    model = trained if model_kind == "trained" else tiny(seed=14)
    src = random_batch(6, seed=15)
    limits = max_lengths(src, 1.2, 2, 1024).tolist()
    for alpha in (0.0, 1.0):
        batch = beam_search(model, src, beam=3, nbest=3, max_len_a=1.2, max_len_b=2, min_len=2, alpha=alpha)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            refs = [
                reference_beam(model, row, beam=3, nbest=3, max_len=limit, min_len=2, alpha=alpha)
                for row, limit in zip(unpad(src), limits, strict=True)
            ]
        model.train(was_training)
        assert [[h.tokens for h in hs] for hs in batch] == refs


@pytest.mark.low_precision
def test_bf16_search_agrees_with_fp32_up_to_near_ties(trained):
    """A bf16 copy of the trained model finds the fp32 translations, and its beam 1 its greedy
    search, except where two tokens were within bf16's rounding of each other."""
    src = random_batch(12, seed=2)  # the training sources: peaked distributions
    half = copy.deepcopy(trained).to(torch.bfloat16)
    fp32, bf16 = greedy_tokens(trained, src, max_len_b=4), greedy_tokens(half, src, max_len_b=4)
    assert_agree_up_to_near_ties(trained, unpad(src), fp32, bf16, min_equal=10)
    beams = beam_search(half, src, beam=1, max_len_b=4)
    assert_agree_up_to_near_ties(trained, unpad(src), [hs[0].tokens for hs in beams], bf16, min_equal=10)
    assert all(math.isfinite(hs[0].score) for hs in beam_search(half, src, beam=3, max_len_b=4))
    assert next(half.parameters()).dtype == torch.bfloat16


def test_divergence_gap_measures_the_first_difference(trained):
    """The measure the bf16 test relies on: 0 for equal outputs, the fp32 gap where they part."""
    src = random_batch(1, seed=2)
    out = greedy_tokens(trained, src, max_len_b=4)[0]
    assert divergence_gap(trained, src, out, out) == 0.0
    with torch.no_grad():
        lp = F.log_softmax(trained.decode(torch.tensor([[BOS]]), trained.encode(src))[0, -1], -1)
    lp[[PAD, BOS]] = float("-inf")
    first, second = lp.topk(2).indices.tolist()
    assert out[0] == first  # greedy takes the best first token
    gap = divergence_gap(trained, src, [first], [second])
    assert gap == pytest.approx(float(lp[first] - lp[second]), abs=1e-6) and gap > 0


def test_each_decoding_step_reads_one_value_back_from_the_device(monkeypatch):
    """On a GPU every read-back (`.tolist()`, `bool()`, ...) waits for the device: a step of
    greedy or beam search in which nothing ends reads back once (what ended), no more."""
    model = tiny()
    src = random_batch(4, seed=3, lo=6, hi=7)  # one length: every sentence may make 5 tokens
    events: list[str] = []
    for name in ("tolist", "item", "__bool__", "__int__", "__float__"):
        real = getattr(torch.Tensor, name)

        def reading(self, *args, _real=real, **kwargs):
            events.append("read")
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, reading)
    decode = model.decode

    def stepping(*args, **kwargs):
        events.append("step")
        return decode(*args, **kwargs)

    monkeypatch.setattr(model, "decode", stepping)
    for search_one in (greedy, functools.partial(beam_search, beam=3)):
        events.clear()
        search_one(model, src, max_len_a=0.0, max_len_b=5, min_len=5)  # no EOS before the 5th token
        steps = "".join("|" if e == "step" else "r" for e in events).split("|")[1:]
        assert len(steps) == 5
        # Nothing ends before the last step; the first also asks, on a CPU only, whether any
        # source is padded (key_padding_mask).
        assert steps[0] in ("r", "rr") and steps[1:4] == ["r"] * 3, steps


@pytest.mark.parametrize("width", [8000, 5 * 8000, 4096, 7919])  # 7919 is prime: torch's own kernels
def test_two_stage_top_k_and_argmax_equal_torchs(width):
    g = torch.Generator().manual_seed(width)
    scores = torch.randn(6, width, generator=g)
    scores[0, :] = float("-inf")  # a row with nothing allowed
    scores[0, 5] = 0.0
    scores[1, [3, width - 1]] = 100.0  # equal maxima in different blocks: the first wins
    scores[2, 10:20] = 50.0  # ten equal scores inside one block
    scores[3, :] = 1.0  # every score equal
    scores[4, ::64] = float("-inf")  # masked columns, as _forbid makes them
    values, indices = search.top_k(scores, 10)
    expected = scores.topk(10, dim=1)
    assert torch.equal(values, expected.values)
    # Where scores tie, either index is right: each index must hold its value.
    assert torch.equal(scores.gather(1, indices), values)
    assert all(len(set(row)) == 10 for row in indices.tolist())
    assert torch.equal(search.argmax(scores), scores.argmax(1))


def test_search_with_a_vocabulary_cut_in_blocks_equals_plain_topk_and_argmax(monkeypatch):
    """A vocabulary of 640 tokens is searched through the two-stage top-k and argmax (10 blocks of
    64); the outputs and scores equal those of torch's topk and argmax over the whole rows."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(d_model=32, heads=4, ffn_dim=64, layers=2, max_positions=64), 640, 640)
    model.eval()
    src = random_batch(7, seed=11)
    assert search._block_size(640) == 64 and search._block_size(5 * 640) == 64
    kw = dict(max_len_a=1.0, max_len_b=4)
    blocked = greedy(model, src, **kw), beam_search(model, src, beam=5, nbest=3, **kw)
    monkeypatch.setattr(search, "_block_size", lambda width: 0)
    plain = greedy(model, src, **kw), beam_search(model, src, beam=5, nbest=3, **kw)
    assert [(h.tokens, h.score) for h in blocked[0]] == [(h.tokens, h.score) for h in plain[0]]
    for ours, theirs in zip(blocked[1], plain[1], strict=True):
        assert [(h.tokens, h.score) for h in ours] == [(h.tokens, h.score) for h in theirs]
