"""Greedy and beam search on the Transformer's incremental decoder.

Both encode the batch once and then run the decoder one token at a time on a
`DecoderCache`. Finished sentences are dropped from the active batch, so late
steps only pay for the sentences still being decoded; the last sentences take the
places of the finished ones (`drop_order`), so a drop copies the cache of those
few, not of every sentence kept.

Lengths. `src_len` is the number of non-PAD source tokens (the source EOS
included). A sentence may produce at most max_len = max(1, int(max_len_a *
src_len + max_len_b)) tokens, EOS included; a hypothesis that reaches max_len
tokens without EOS ends there (it is returned truncated, without EOS). EOS is
forbidden until `min_len` tokens have been produced. PAD and BOS are never
produced. Returned token lists contain neither BOS nor EOS.

Every sentence is decoded independently of the others in its batch (padding is
masked, lengths are per sentence), so results do not depend on how sentences
are grouped into batches, up to floating-point rounding.

The caller puts the model in eval mode (as for nanoGPT's `generate`): the search
runs without autograd and leaves the model's mode alone, so batches may be
searched on several threads at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from mt.model import Transformer
from mt.special import BOS, EOS, PAD
from mt.translate.lines import max_output_length

# Beam search splits batches so that one step scores at most this many (hypothesis, token)
# pairs (rows * vocabulary): 6M float32 scores = 24 MB per (rows, V) tensor.
MAX_SCORES_PER_STEP = 6_000_000


@dataclass
class Hypothesis:
    tokens: list[int]  # without BOS and EOS
    score: float  # length-normalised log-probability, used for ranking
    logprob: float  # sum of the token log-probabilities (EOS included when produced)


def max_lengths(src: Tensor, max_len_a: float, max_len_b: int, cap: int) -> Tensor:
    """(B, S) source ids -> (B,) long: the most tokens (EOS included) each sentence may produce.

    `cap` is the model's max_positions: producing token k feeds the decoder k positions,
    so no output may be longer, whatever a * src_len + b says.
    """
    src_lens = src.ne(PAD).sum(1).tolist()
    return torch.tensor([max_output_length(n, max_len_a, max_len_b, cap) for n in src_lens], dtype=torch.long)


def _forbid(scores: Tensor, step: int, min_len: int) -> Tensor:
    """Set the (N, V) scores of tokens that may not come next to -inf, in place."""
    scores[:, PAD] = float("-inf")
    scores[:, BOS] = float("-inf")
    if step < min_len:
        scores[:, EOS] = float("-inf")
    return scores


def _block_size(width: int) -> int:
    """The size of the blocks `top_k` and `argmax` cut rows of `width` scores into, 0 for none:
    a divisor of the width (a vocabulary of 8,000 or 32,000 takes 64), so that blocks are views."""
    return next((b for b in (64, 50, 48, 40, 32, 25, 24, 20, 16) if width % b == 0 and width >= 8 * b), 0)


def top_k(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """`scores.topk(k, dim=1)` for (n, W) scores: (n, k) values, best first, and their indices.

    In two stages, 3-4x faster than topk's CPU kernel over a vocabulary: the maximum of each
    block of the row (a fast reduction), the k best blocks, then the k best scores among
    their k * block scores. Exact: the k best scores lie in the k blocks with the best maxima.
    """
    n, width = scores.shape
    b = _block_size(width)
    if b == 0 or b * k >= width // 2:
        return scores.topk(k, dim=1)
    blocks = scores.view(n, width // b, b)
    best_blocks = blocks.amax(-1).topk(k, dim=1).indices  # (n, k)
    inside = blocks.gather(1, best_blocks[:, :, None].expand(n, k, b)).view(n, k * b)
    values, at = inside.topk(k, dim=1)
    return values, best_blocks.gather(1, at // b) * b + at % b


def argmax(scores: Tensor) -> Tensor:
    """`scores.argmax(1)` for (n, W) scores (the first of equal maxima), by blocks as `top_k`:
    argmax's CPU kernel is 5x slower than a maximum over the same scores."""
    n, width = scores.shape
    b = _block_size(width)
    if b == 0:
        return scores.argmax(1)
    blocks = scores.view(n, width // b, b)
    best_block = blocks.amax(-1).argmax(1)  # (n,) the first block holding the maximum
    inside = blocks.gather(1, best_block[:, None, None].expand(n, 1, b)).view(n, b)
    return best_block * b + inside.argmax(1)


def drop_order(done: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """How to drop the `done` rows of a batch (n,) bool by moving rows, not copying them all:
    (keep, dst, src). The rows that go on keep their places among the first n' = len(keep);
    those beyond move into the places of the done ones there, row dst[i] taking row src[i].
    Row j of the result continues what row keep[j] was (see DecoderCache.move_rows)."""
    alive = (~done).nonzero().squeeze(1)  # ascending
    n = alive.numel()
    dst = done[:n].nonzero().squeeze(1)  # the places to fill, as many as survivors from n on
    src = alive[n - dst.numel() :]
    keep = torch.arange(n, device=done.device)
    keep[dst] = src
    return keep, dst, src


@torch.inference_mode()
def greedy(
    model: Transformer,
    src: Tensor,
    *,
    max_len_a: float = 1.2,
    max_len_b: int = 10,
    min_len: int = 1,
    length_penalty: str = "fairseq",
    alpha: float = 1.0,
) -> list[Hypothesis]:
    """Greedy decoding of a (B, S) right-padded source batch -> one hypothesis per sentence.

    Each hypothesis carries its log-probability and its score as beam search computes them
    (see `beam_search`), so greedy search and beam search with beam=1 return the same.
    """
    _penalty(1, length_penalty, alpha)  # validate the kind early
    B = src.size(0)
    device = src.device
    limit = max_lengths(src, max_len_a, max_len_b, model.cfg.max_positions).to(device)  # (B,)
    memory = model.encode(src)
    cache = model.new_cache()
    out: list[Hypothesis] = [Hypothesis([], 0.0, 0.0) for _ in range(B)]
    sent = torch.arange(B, device=device)  # sentence of each active row
    tokens = torch.empty(B, 0, dtype=torch.long, device=device)  # (n, step) produced so far
    logprob = torch.zeros(B, device=device)  # (n,) of the tokens produced so far
    prev = torch.full((B, 1), BOS, dtype=torch.long, device=device)
    for step in range(int(limit.max())):
        # float32 scores whatever the model's dtype (argmax over bfloat16 is slow on CPU).
        logits = model.decode(prev, memory, cache)[:, -1].float()  # (n, V)
        # The model's own distribution, masked (not renormalised) where tokens are forbidden, in
        # place on a CPU as in beam search; the argmax over log-probabilities is beam 1's choice.
        logp = torch.log_softmax(logits, -1, out=logits if logits.device.type == "cpu" else None)
        nxt = argmax(_forbid(logp, step, min_len))  # (n,)
        logprob += logp.gather(1, nxt[:, None]).squeeze(1)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        done = nxt.eq(EOS) | limit.le(step + 1)
        if bool(done.any()):
            pen = _penalty(step + 1, length_penalty, alpha)
            ended = sent[done].tolist(), tokens[done].tolist(), logprob[done].tolist()
            for s, toks, lp in zip(*ended, strict=True):
                out[s] = Hypothesis(toks[:-1] if toks[-1] == EOS else toks, lp / pen, lp)
            keep, dst, src = drop_order(done)
            if keep.numel() == 0:
                break
            # One row per sentence: rows and cross-attention entries move alike.
            cache.move_rows(dst, src, keep.numel())
            cache.move_entries(dst, src, keep.numel())
            sent, tokens, limit, logprob = sent[keep], tokens[keep], limit[keep], logprob[keep]
            nxt = nxt[keep]
        prev = nxt[:, None]
    return out


def _penalty(length: int, kind: str, alpha: float) -> float:
    if kind == "fairseq":
        return float(length) ** alpha
    if kind == "gnmt":
        return ((5.0 + length) / 6.0) ** alpha
    raise ValueError(f"unknown length penalty {kind!r}; expected 'fairseq' or 'gnmt'")


@torch.inference_mode()
def beam_search(
    model: Transformer,
    src: Tensor,
    *,
    beam: int = 5,
    nbest: int = 1,
    max_len_a: float = 1.2,
    max_len_b: int = 10,
    min_len: int = 1,
    length_penalty: str = "fairseq",
    alpha: float = 1.0,
) -> list[list[Hypothesis]]:
    """Beam search of a (B, S) right-padded source batch -> per sentence its `nbest` best hypotheses.

    Scores. `logprob` is the sum of the float32 log-probabilities of the produced
    tokens, EOS included when produced; hypotheses are ranked by
    `score = logprob / lp(len)` with len the number of those tokens (EOS counted):

        length_penalty="fairseq":  lp(len) = len ** alpha
        length_penalty="gnmt":     lp(len) = ((5 + len) / 6) ** alpha   (Wu et al., 2016)

    alpha = 0 ranks by raw log-probability; larger alpha favours longer outputs.

    Search. The B * beam hypotheses are decoded together, `beam` rows per sentence.
    At each step the 2 * beam best extensions of a sentence are taken; those that
    end in EOS and rank within the first `beam` become finished hypotheses, the
    `beam` best others stay active (the cache is reordered to follow them). A
    sentence is done when it has `beam` finished hypotheses and its best active one,
    scored as if it ended now, does not beat the `beam`-th best of them (log-probs
    only fall as tokens are added; with alpha > 0 a longer hypothesis could in
    principle still gain from the length normalisation, which, as in fairseq and
    Hugging Face, is not waited for). With beam=1 this is exactly greedy search.
    At a sentence's max length its active hypotheses are finished as they are.
    Done sentences are dropped from the batch.
    """
    K, V = beam, model.out_proj.out_features
    if not 1 <= nbest <= K:
        raise ValueError(f"nbest must be in [1, beam={K}], got {nbest}")
    if V < 2 * K:
        raise ValueError(f"beam {K} needs a vocabulary of at least {2 * K} tokens, got {V}")
    _penalty(1, length_penalty, alpha)  # validate the kind early
    # Large batches are searched in slices on a CPU: per step the search holds a few (rows, V)
    # float tensors, and keeping those within the CPU cache (and below the size at which malloc
    # maps fresh, page-faulting memory) is faster than the fewer, bigger matmuls. A GPU wants
    # the bigger ones.
    per_call = max(1, MAX_SCORES_PER_STEP // (K * V))
    if src.device.type == "cpu" and src.size(0) > per_call:
        slices = (src[i : i + per_call] for i in range(0, src.size(0), per_call))
        # Each option by name: a dict of them would hold a union type that mypy cannot check.
        return [
            hyps
            for part in slices
            for hyps in beam_search(
                model, part, beam=beam, nbest=nbest, max_len_a=max_len_a, max_len_b=max_len_b,
                min_len=min_len, length_penalty=length_penalty, alpha=alpha
            )
        ]
    B = src.size(0)
    device = src.device
    limit = max_lengths(src, max_len_a, max_len_b, model.cfg.max_positions).to(device)  # (n,)
    memory = model.encode(src)
    cache = model.new_cache()
    finished: list[list[Hypothesis]] = [[] for _ in range(B)]
    sent = torch.arange(B, device=device)  # (n,) sentence of each active group of rows
    # Cumulative log-probs of the active hypotheses, (n, k) with k rows per sentence: the
    # first step extends the BOS prefix once per sentence (k = 1), later steps K beams.
    scores = torch.zeros(B, 1, device=device)
    fin_top = torch.full((B, K), float("-inf"), device=device)  # (n, K) best finished scores
    tokens = torch.empty(B, 0, dtype=torch.long, device=device)  # (n*k, step)
    prev = torch.full((B, 1), BOS, dtype=torch.long, device=device)
    ranks = torch.arange(2 * K, device=device)

    for step in range(int(limit.max())):
        n, k = scores.shape
        length = step + 1  # tokens scored by every candidate of this step
        pen = _penalty(length, length_penalty, alpha)
        logits = model.decode(prev, memory, cache)[:, -1].float()  # (n*k, V)
        # The model's distribution, masked (not renormalised) where tokens are forbidden. In place
        # on a CPU: there a fresh (rows, V) tensor at every step made log_softmax 1.5x slower
        # (750 rows; the memory was new to the process each time). GPUs keep freed memory.
        logp = torch.log_softmax(logits, -1, out=logits if logits.device.type == "cpu" else None)
        cand = _forbid(logp.add_(scores.view(-1, 1)), step, min_len)
        c_scores, c_idx = top_k(cand.view(n, k * V), 2 * K)  # (n, 2K), best first
        c_parent, c_tok = c_idx // V, c_idx % V
        is_eos = c_tok.eq(EOS)

        # EOS among the first K candidates: finished hypotheses. Their scores enter fin_top on
        # the device, so that one read-back per step (below) decides what ended.
        eos_top = is_eos[:, :K] & c_scores[:, :K].isfinite()
        new = torch.where(eos_top, c_scores[:, :K] / pen, float("-inf"))
        fin_top = torch.cat([fin_top, new], dim=1).topk(K, dim=1).values

        # The K best non-EOS candidates stay active (there are at most K EOS among 2K).
        sel = (ranks + is_eos * (2 * K)).topk(K, dim=1, largest=False).indices  # (n, K) in rank order
        scores = c_scores.gather(1, sel)  # (n, K), best first
        rows = (torch.arange(n, device=device)[:, None] * k + c_parent.gather(1, sel)).view(-1)  # (n*K,)
        # Sentences at their max length end here, their active hypotheses without EOS.
        at_max = limit.le(length)
        done = at_max | (scores[:, 0] / pen <= fin_top[:, K - 1])
        any_eos, any_at_max, any_done = torch.stack([eos_top.any(), at_max.any(), done.any()]).tolist()

        if any_eos:
            si, ki = eos_top.nonzero(as_tuple=True)
            parent_rows = si * k + c_parent[si, ki]
            lps = c_scores[si, ki]
            for s, toks, lp in zip(
                sent[si].tolist(), tokens[parent_rows].tolist(), lps.tolist(), strict=True
            ):
                finished[s].append(Hypothesis(toks, lp / pen, lp))
        tokens = torch.cat([tokens[rows], c_tok.gather(1, sel).view(-1, 1)], dim=1)  # (n*K, step+1)
        if any_at_max:
            ended = sent[at_max].tolist(), tokens.view(n, K, -1)[at_max].tolist(), scores[at_max].tolist()
            for s, beams, lps in zip(*ended, strict=True):
                for toks, lp in zip(beams, lps, strict=True):
                    if lp > -math.inf:
                        finished[s].append(Hypothesis(toks, lp / pen, lp))
        if any_done:
            keep, dst, src = drop_order(done)  # the sentences still searched
            if keep.numel() == 0:
                break
            rows = rows.view(n, K)[keep].view(-1)
            tokens = tokens.view(n, K, -1)[keep].view(keep.numel() * K, -1)
            sent, limit, scores, fin_top = sent[keep], limit[keep], scores[keep], fin_top[keep]
            cache.move_entries(dst, src, keep.numel())
        cache.reorder(rows, within=K)  # each sentence's K rows come from its own
        prev = tokens[:, -1:]

    return [sorted(hyps, key=lambda h: -h.score)[:nbest] for hyps in finished]
