"""Token-budget batching: which sentence pairs go together, and the padded tensors.

`TokenBatcher` decides batch membership from sentence lengths alone; `make_batch`
turns the chosen pairs into padded id tensors.

Resuming: `TokenBatcher.epoch_batches(epoch)` is a pure function of
(seed, epoch, lengths, max_tokens, rank, world_size) and the batcher holds no other
state. A trainer resumes mid-epoch by saving (epoch, position of the next batch within
that epoch's list) and, after restarting, iterating `epoch_batches(epoch)[position:]`.
Nothing about the batcher needs to go into a checkpoint beyond those two ints.

Several corpora: a `Mixture` says which pairs an epoch draws from (each source's pairs
int(weight) times, plus a random share of the fraction), a pure function of (seed, epoch)
as well; the batcher sorts and cuts that multiset as it does the whole split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch

from mt.special import BOS, EOS, PAD


@dataclass(eq=False)  # tensor fields make == ambiguous; compare by identity
class Batch:
    src: torch.Tensor  # (B, S) int64: source ids + EOS, right-padded with PAD
    tgt_in: torch.Tensor  # (B, T) int64: BOS + target ids, right-padded
    tgt_out: torch.Tensor  # (B, T) int64: target ids + EOS, right-padded
    indices: torch.Tensor  # (B,) int64: index of each pair in its split, on the CPU
    # Token counts are cached as Python ints, so that reading them after the batch
    # has been moved to a GPU does not force a device synchronisation.
    _n_src: int | None = field(default=None, repr=False, compare=False)
    _n_tgt: int | None = field(default=None, repr=False, compare=False)

    @property
    def n_src_tokens(self) -> int:
        """Non-pad source tokens (EOS included)."""
        if self._n_src is None:
            self._n_src = int((self.src != PAD).sum())
        return self._n_src

    @property
    def n_tgt_tokens(self) -> int:
        """Non-pad tokens in tgt_out (EOS included): the number of tokens the loss is summed over."""
        if self._n_tgt is None:
            self._n_tgt = int((self.tgt_out != PAD).sum())
        return self._n_tgt

    def __len__(self) -> int:
        return self.src.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Move the id tensors to `device`. `indices` stays on the CPU: it is only used
        for bookkeeping (putting translations back in corpus order), where a device copy
        would just cost synchronisations."""
        return Batch(
            src=self.src.to(device, non_blocking=non_blocking),
            tgt_in=self.tgt_in.to(device, non_blocking=non_blocking),
            tgt_out=self.tgt_out.to(device, non_blocking=non_blocking),
            indices=self.indices,
            _n_src=self.n_src_tokens,
            _n_tgt=self.n_tgt_tokens,
        )

    def pin_memory(self) -> Batch:
        """Page-locked copy, so that `to(cuda, non_blocking=True)` is truly asynchronous.

        Without an accelerator, pinning is impossible and pointless; the batch is
        returned unchanged rather than raising, so callers need no device check.
        """
        if not torch.cuda.is_available():
            return self
        return Batch(
            src=self.src.pin_memory(),
            tgt_in=self.tgt_in.pin_memory(),
            tgt_out=self.tgt_out.pin_memory(),
            indices=self.indices,
            _n_src=self.n_src_tokens,
            _n_tgt=self.n_tgt_tokens,
        )


def _fill(seqs: list[np.ndarray], lens: np.ndarray, width: int, offset: int) -> np.ndarray:
    """(B, width) PAD array with seqs[i] written at columns offset .. offset+lens[i]-1.

    A boolean mask selects those cells in row-major order, which is exactly the order
    of the concatenated sequences, so one vectorised assignment fills the whole batch.
    """
    out = np.full((len(seqs), width), PAD, dtype=np.int64)
    cols = np.arange(width)
    mask = (cols >= offset) & (cols < offset + lens[:, None])
    out[mask] = np.concatenate(seqs)
    return out


def make_batch(
    src_seqs: list[np.ndarray],
    tgt_seqs: list[np.ndarray],
    indices: np.ndarray | list[int],
    pad_to_multiple: int = 0,
    max_tokens: int = 0,
) -> Batch:
    """Padded tensors for the given raw id sequences (no special tokens in the input).

    With pad_to_multiple N > 0, source and target take one width, the smallest multiple of N
    that holds every pair, and the batch gets max_tokens // width rows (at least its own):
    the shape then depends on the width alone, so a compiled model sees few shapes. A filler
    row is a source of EOS alone and a target of PAD alone: attention stays finite and the
    loss ignores it; its index is -1 and the token counts leave it out.
    """
    if not src_seqs or len(src_seqs) != len(tgt_seqs) or len(src_seqs) != len(indices):
        raise ValueError(
            f"make_batch needs equally many (>0) sources, targets and indices, "
            f"got {len(src_seqs)}, {len(tgt_seqs)}, {len(indices)}"
        )
    n = len(src_seqs)
    rows = np.arange(n)
    src_lens = np.fromiter((len(s) for s in src_seqs), dtype=np.int64, count=n)
    tgt_lens = np.fromiter((len(t) for t in tgt_seqs), dtype=np.int64, count=n)
    s_width, t_width = int(src_lens.max()) + 1, int(tgt_lens.max()) + 1
    idx = np.asarray(indices, dtype=np.int64)
    if pad_to_multiple:
        s_width = t_width = padded_size(max(s_width, t_width), pad_to_multiple)
        extra = max(max_tokens // s_width - n, 0)
        if extra:  # filler rows: an empty source (EOS alone) and an empty, ignored target
            empty = np.zeros(0, dtype=np.int64)
            src_seqs = [*src_seqs, *([empty] * extra)]
            tgt_seqs = [*tgt_seqs, *([empty] * extra)]
            idx = np.concatenate([idx, np.full(extra, -1, dtype=np.int64)])
    all_rows = np.arange(len(src_seqs))
    all_src = np.fromiter((len(s) for s in src_seqs), dtype=np.int64, count=len(src_seqs))
    all_tgt = np.fromiter((len(t) for t in tgt_seqs), dtype=np.int64, count=len(tgt_seqs))

    src = _fill(src_seqs, all_src, s_width, offset=0)
    src[all_rows, all_src] = EOS
    tgt_in = _fill(tgt_seqs, all_tgt, t_width, offset=1)
    tgt_in[:, 0] = BOS
    tgt_out = _fill(tgt_seqs, all_tgt, t_width, offset=0)
    tgt_out[rows, tgt_lens] = EOS  # real rows only: a filler's target is PAD throughout

    return Batch(
        src=torch.from_numpy(src),
        tgt_in=torch.from_numpy(tgt_in),
        tgt_out=torch.from_numpy(tgt_out),
        indices=torch.from_numpy(idx),
        _n_src=int(src_lens.sum()) + n,
        _n_tgt=int(tgt_lens.sum()) + n,
    )


_Size = TypeVar("_Size", int, np.ndarray)  # one length, or an array of them


def padded_size(size: _Size, multiple: int) -> _Size:
    """`size` rounded up to a multiple of `multiple` (unchanged for 0)."""
    return -(-size // multiple) * multiple if multiple else size


@dataclass(frozen=True)
class Mixture:
    """How an epoch mixes the sources of a training split, stored one after the other:
    `counts[k]` pairs of source k, each seen `weights[k]` times per epoch on average."""

    counts: tuple[int, ...]
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.counts) != len(self.weights) or min(self.weights, default=1.0) <= 0:
            raise ValueError(f"need one weight > 0 per source, got {self.weights} for {len(self.counts)}")

    @property
    def trivial(self) -> bool:
        """Every pair once per epoch: the same as no mixture."""
        return all(w == 1.0 for w in self.weights)

    def epoch_pairs(self, seed: int, epoch: int) -> np.ndarray:
        """The indices an epoch draws from, in source order: source k's pairs int(w) times,
        then round(frac(w) * count) of them, chosen afresh for each (seed, epoch, source)."""
        parts, start = [], 0
        for k, (n, w) in enumerate(zip(self.counts, self.weights, strict=True)):
            whole, frac = int(w), w - int(w)
            ids = np.arange(start, start + n, dtype=np.int64)
            parts += [ids] * whole
            extra = round(frac * n)
            if extra:
                rng = np.random.default_rng([seed, epoch, 1, k])  # not the batch-shuffle stream
                parts.append(np.sort(rng.choice(ids, extra, replace=False)))
            start += n
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


class TokenBatcher:
    """Groups sentence pairs into batches of at most `max_tokens` padded tokens.

    A pair's size is max(src_len + 1, tgt_len + 1) (the +1 is EOS, or BOS on the decoder
    input), rounded up to a multiple of `pad_to_multiple` when that is set; a batch
    costs n_pairs * (largest size in it), i.e. padding is counted, and
    never exceeds `max_tokens`.

    Each epoch (fairseq's recipe): shuffle the pairs, stable-sort them by
    (size, tgt_len, src_len), so that equal lengths keep the random order, cut the
    sorted list greedily into the largest batches that fit, then shuffle the batch
    order. Sorting globally keeps padding minimal; the random tie-break gives different
    batch contents each epoch. With shuffle=False (validation) the pairs are sorted
    with ties in corpus order and the batches come shortest first.

    Because the cut points depend only on the sorted sizes, the number of batches is
    the same in every epoch.

    Distributed: every rank builds the same global list; rank r takes batches
    r, r + world_size, ... The list is first padded by repeating batches from its
    start, so all ranks get the same number of batches (a few pairs are then seen
    twice in that epoch; for validation, dedupe by `Batch.indices` or score on one rank).
    """

    def __init__(
        self,
        src_lens: np.ndarray,
        tgt_lens: np.ndarray,
        max_tokens: int,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        mixture: Mixture | None = None,
        pad_to_multiple: int = 0,
    ) -> None:
        src_lens = np.asarray(src_lens, dtype=np.int64)
        tgt_lens = np.asarray(tgt_lens, dtype=np.int64)
        if src_lens.ndim != 1 or src_lens.shape != tgt_lens.shape:
            raise ValueError(
                f"src_lens {src_lens.shape} and tgt_lens {tgt_lens.shape} must be equal-length 1-D"
            )
        if len(src_lens) and min(src_lens.min(), tgt_lens.min()) < 0:
            raise ValueError("sentence lengths must be >= 0")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")  # numpy seed sequences need it
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")

        self.src_lens, self.tgt_lens = src_lens, tgt_lens
        # Padded to a multiple (train.pad_to_multiple), a pair costs what make_batch makes of it.
        self.sizes = padded_size(np.maximum(src_lens, tgt_lens) + 1, pad_to_multiple)
        too_long = np.flatnonzero(self.sizes > max_tokens)
        if len(too_long):
            i = int(too_long[0])
            raise ValueError(
                f"pair {i} (src_len {src_lens[i]}, tgt_len {tgt_lens[i]}) needs {self.sizes[i]} tokens, "
                f"more than max_tokens={max_tokens}; {len(too_long)} pair(s) are too long"
            )
        self.max_tokens, self.seed, self.shuffle = max_tokens, seed, shuffle
        self.rank, self.world_size = rank, world_size
        if mixture is not None and sum(mixture.counts) != len(self.sizes):
            raise ValueError(
                f"the mixture's sources hold {sum(mixture.counts)} pairs, the split {len(self.sizes)}"
            )
        # A trivial mixture is no mixture: the batches stay exactly those of the whole split.
        self.mixture = None if mixture is None or mixture.trivial else mixture
        self._bounds = self._cut(np.sort(self.sizes))

    def _cut(self, sorted_sizes: np.ndarray) -> np.ndarray:
        """Start offsets of the batches (plus the end) for ascending sizes.

        A batch starting at i with k pairs costs k * sorted_sizes[i + k - 1], which grows
        with k, so the pairs that fit form a prefix of the window of at most
        max_tokens // sorted_sizes[i] pairs: one vectorised test per batch.
        """
        n, i, bounds = len(sorted_sizes), 0, [0]
        while i < n:
            window = sorted_sizes[i : i + self.max_tokens // int(sorted_sizes[i])]
            k = int(np.count_nonzero(np.arange(1, len(window) + 1) * window <= self.max_tokens))
            i += k
            bounds.append(i)
        return np.asarray(bounds, dtype=np.int64)

    def _global_batches(self, epoch: int) -> list[np.ndarray]:
        if self.mixture is None:
            pool, bounds = np.arange(len(self.sizes)), self._bounds
        else:  # the multiset differs from epoch to epoch (fractional weights): so do the cuts
            pool, bounds = self.mixture.epoch_pairs(self.seed, epoch), None
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch])  # independent stream per (seed, epoch)
            order = pool[rng.permutation(len(pool))]
        else:
            order = pool
        # lexsort is stable and sorts by its last key first: size, then tgt, then src.
        keys = (self.src_lens[order], self.tgt_lens[order], self.sizes[order])
        order = order[np.lexsort(keys)]
        if bounds is None:
            bounds = self._cut(self.sizes[order])
        batches = [order[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        if self.shuffle:
            batches = [batches[j] for j in rng.permutation(len(batches))]
        return batches

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's batches for `epoch`, each an int64 array of pair indices.

        Deterministic for (seed, epoch); see the module docstring for resuming.
        """
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        batches = self._global_batches(epoch)
        if self.world_size > 1 and batches:
            total = -(-len(batches) // self.world_size) * self.world_size
            batches = [batches[j % len(batches)] for j in range(total)]
        return batches[self.rank :: self.world_size]

    def num_batches(self, epoch: int = 0) -> int:
        """len(epoch_batches(epoch)); without a mixture the same for every epoch, and known
        without building them."""
        n = len(self._bounds) - 1 if self.mixture is None else len(self._global_batches(epoch))
        return -(-n // self.world_size)

    def __len__(self) -> int:
        return self.num_batches()
