import numpy as np
import pytest
import torch

from mt.special import BOS, EOS, PAD
from mt.train.batching import Batch, TokenBatcher, make_batch


def test_make_batch_layout():
    src = [np.array([10, 11, 12], dtype=np.uint16), np.array([20], dtype=np.uint16)]
    tgt = [np.array([30], dtype=np.int32), np.array([40, 41], dtype=np.int32)]
    b = make_batch(src, tgt, [7, 3])
    assert b.src.dtype == b.tgt_in.dtype == b.tgt_out.dtype == b.indices.dtype == torch.int64
    assert b.src.tolist() == [[10, 11, 12, EOS], [20, EOS, PAD, PAD]]
    assert b.tgt_in.tolist() == [[BOS, 30, PAD], [BOS, 40, 41]]
    assert b.tgt_out.tolist() == [[30, EOS, PAD], [40, 41, EOS]]
    assert b.indices.tolist() == [7, 3]
    assert (b.n_src_tokens, b.n_tgt_tokens) == (6, 5)
    assert len(b) == 2


def test_make_batch_empty_sequences_and_counts_match_tensors():
    b = make_batch([np.array([], dtype=np.int64), np.array([5])], [np.array([], dtype=np.int64)] * 2, [0, 1])
    assert b.src.tolist() == [[EOS, PAD], [5, EOS]]
    assert b.tgt_in.tolist() == [[BOS], [BOS]]
    assert b.tgt_out.tolist() == [[EOS], [EOS]]
    fresh = Batch(b.src, b.tgt_in, b.tgt_out, b.indices)  # counts computed from the tensors
    assert (fresh.n_src_tokens, fresh.n_tgt_tokens) == (b.n_src_tokens, b.n_tgt_tokens) == (3, 2)


def test_make_batch_rejects_mismatch():
    with pytest.raises(ValueError):
        make_batch([np.array([1])], [], [0])


def test_batch_to_and_pin_memory():
    b = make_batch([np.array([4, 5])], [np.array([6])], [0])
    moved = b.to("cpu")
    assert torch.equal(moved.src, b.src) and moved.n_tgt_tokens == b.n_tgt_tokens
    assert moved.indices.device.type == "cpu"
    pinned = b.pin_memory()  # a no-op without CUDA
    assert torch.equal(pinned.tgt_out, b.tgt_out)


def _lens(n=300, seed=0):
    rng = np.random.default_rng(seed)
    src = rng.integers(0, 40, n)
    tgt = np.clip(src + rng.integers(-5, 6, n), 0, None)
    return src, tgt


def _cost(batcher, batch):
    return len(batch) * int(batcher.sizes[batch].max())


def test_every_pair_once_and_budget_respected():
    src, tgt = _lens()
    tb = TokenBatcher(src, tgt, max_tokens=128, seed=1)
    for epoch in (0, 1):
        batches = tb.epoch_batches(epoch)
        assert len(batches) == tb.num_batches(epoch) == len(tb)
        allidx = np.concatenate(batches)
        assert sorted(allidx.tolist()) == list(range(len(src)))
        assert all(_cost(tb, b) <= 128 for b in batches)
        assert all(b.dtype == np.int64 for b in batches)


def test_batches_are_reasonably_full():
    src, tgt = _lens(1000)
    tb = TokenBatcher(src, tgt, max_tokens=256, seed=1)
    batches = tb.epoch_batches(0)
    real = (np.maximum(src, tgt) + 1).sum()
    padded = sum(_cost(tb, b) for b in batches)
    assert real / padded > 0.9  # sorting keeps padding small
    # greedy: no batch could have taken the next-longer pair in sorted order
    assert len(batches) <= real / 256 * 1.25 + 1


def test_deterministic_per_seed_and_epoch():
    src, tgt = _lens()
    a = TokenBatcher(src, tgt, 128, seed=3).epoch_batches(2)
    b = TokenBatcher(src, tgt, 128, seed=3).epoch_batches(2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    c = TokenBatcher(src, tgt, 128, seed=3).epoch_batches(3)
    d = TokenBatcher(src, tgt, 128, seed=4).epoch_batches(2)
    assert [x.tolist() for x in a] != [x.tolist() for x in c]
    assert [x.tolist() for x in a] != [x.tolist() for x in d]


def test_no_shuffle_is_length_sorted_and_epoch_independent():
    src, tgt = _lens()
    tb = TokenBatcher(src, tgt, 128, seed=1, shuffle=False)
    batches = tb.epoch_batches(0)
    flat = np.concatenate(batches)
    sizes = tb.sizes[flat]
    assert np.all(np.diff(sizes) >= 0)
    assert [x.tolist() for x in batches] == [x.tolist() for x in tb.epoch_batches(5)]


def test_too_long_pair_names_index():
    with pytest.raises(ValueError, match="pair 2 "):
        TokenBatcher(np.array([3, 4, 50, 60]), np.array([3, 4, 5, 6]), max_tokens=20, seed=0)
    # exactly fitting is fine: size = 19 + 1
    TokenBatcher(np.array([19]), np.array([0]), max_tokens=20, seed=0)


def test_distributed_ranks_partition_padded_list():
    src, tgt = _lens(100)
    world = 3
    single = TokenBatcher(src, tgt, 64, seed=5).epoch_batches(1)
    ranks = [
        TokenBatcher(src, tgt, 64, seed=5, rank=r, world_size=world).epoch_batches(1) for r in range(world)
    ]
    assert len({len(r) for r in ranks}) == 1
    assert all(
        len(r) == TokenBatcher(src, tgt, 64, seed=5, rank=0, world_size=world).num_batches() for r in ranks
    )
    padded = single + single[: len(ranks[0]) * world - len(single)]
    for r in range(world):
        assert [x.tolist() for x in ranks[r]] == [x.tolist() for x in padded[r::world]]
    covered = set(np.concatenate([np.concatenate(r) for r in ranks]).tolist())
    assert covered == set(range(len(src)))


def test_distributed_more_ranks_than_batches():
    tb = [
        TokenBatcher(np.array([1, 1]), np.array([1, 1]), 100, seed=0, rank=r, world_size=4) for r in range(4)
    ]
    out = [t.epoch_batches(0) for t in tb]
    assert [len(o) for o in out] == [1, 1, 1, 1]
    assert all(o[0].tolist() == out[0][0].tolist() for o in out)


def test_empty_dataset():
    tb = TokenBatcher(np.array([], dtype=np.int64), np.array([], dtype=np.int64), 10, seed=0, world_size=2)
    assert tb.epoch_batches(0) == [] and tb.num_batches() == 0


def test_bad_arguments():
    with pytest.raises(ValueError):
        TokenBatcher(np.array([1]), np.array([1, 2]), 10, seed=0)
    with pytest.raises(ValueError):
        TokenBatcher(np.array([1]), np.array([1]), 10, seed=0, rank=2, world_size=2)


# --------------------------------------------------------------------------- padded to a multiple


def test_pad_to_multiple_gives_one_width_a_multiple_and_fills_the_rows():
    src = [np.array([10, 11, 12]), np.array([20])]
    tgt = [np.array([30]), np.array([40, 41, 42, 43, 44])]
    b = make_batch(src, tgt, [7, 3], pad_to_multiple=4, max_tokens=20)
    assert b.src.shape == b.tgt_in.shape == b.tgt_out.shape == (20 // 8, 8)  # width 6 -> 8
    b = make_batch(src, tgt, [7, 3], pad_to_multiple=4, max_tokens=35)
    assert b.src.shape == (4, 8) and b.indices.tolist() == [7, 3, -1, -1]
    # Fillers: a source of EOS alone, a decoder input of BOS alone, no target token to score.
    assert b.src[2:].tolist() == [[EOS] + [PAD] * 7] * 2
    assert b.tgt_in[2:].tolist() == [[BOS] + [PAD] * 7] * 2
    assert (b.tgt_out[2:] == PAD).all()
    assert b.tgt_out[:2].tolist() == [[30, EOS] + [PAD] * 6, [40, 41, 42, 43, 44, EOS, PAD, PAD]]
    assert (b.n_src_tokens, b.n_tgt_tokens) == (6, 8)  # the fillers count for nothing


def test_filler_rows_change_neither_loss_nor_gradients():
    from helpers import tiny_config

    from mt.model import Transformer
    from mt.train.loss import label_smoothed_nll

    rng = np.random.default_rng(0)
    src = [rng.integers(4, 60, n) for n in (3, 7, 5)]
    tgt = [rng.integers(4, 60, n) for n in (4, 2, 6)]
    torch.manual_seed(0)
    model = Transformer(tiny_config().model, 60, 60)
    grads = []
    padded = make_batch(src, tgt, [0, 1, 2], pad_to_multiple=8, max_tokens=64)
    assert padded.src.shape == (8, 8)
    for b in (make_batch(src, tgt, [0, 1, 2]), padded):
        model.zero_grad()
        loss, _ = label_smoothed_nll(model(b.src, b.tgt_in), b.tgt_out, 0.1)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert grads[1][0].item() == pytest.approx(grads[0][0].item(), rel=1e-5)
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_batcher_counts_pairs_at_their_padded_size():
    rng = np.random.default_rng(1)
    src_lens, tgt_lens = rng.integers(0, 40, 500), rng.integers(0, 40, 500)
    batcher = TokenBatcher(src_lens, tgt_lens, max_tokens=200, seed=0, pad_to_multiple=16)
    widths = set()
    for idx in batcher.epoch_batches(0):
        width = -(-int(np.maximum(src_lens[idx], tgt_lens[idx]).max() + 1) // 16) * 16
        assert len(idx) <= 200 // width
        widths.add(width)
    assert widths == {16, 32, 48}  # sizes 1..40 padded: three shapes in all
    assert sorted(np.concatenate(batcher.epoch_batches(0)).tolist()) == list(range(500))
