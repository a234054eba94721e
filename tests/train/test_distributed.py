"""Several processes through torchrun (gloo on CPUs): the same training as one process; and the
collectives as NCCL needs them, checked in one process."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import corpus_config, make_corpus
from torch.nn.parallel import DistributedDataParallel

from mt.checkpoint import load_checkpoint
from mt.config import load_config
from mt.data.prepare import prepare
from mt.train.distributed import Dist
from mt.train.trainer import Trainer, _collate

pytestmark = pytest.mark.slow

BASE = ["train.max_tokens=400", "train.valid_every=0", "train.valid_bleu=false", "train.threads=1"]


def _run(args, cwd, timeout=240, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    p = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def _torchrun(n, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), *args]


@pytest.fixture
def exp(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", n_train=300, n_valid=20, n_test=20)
    path = corpus_config(tmp_path, corpus)
    prepare(load_config(path), quiet=True)  # once, so both runs read the same cache
    return path


def _weights(run_dir):
    return load_checkpoint(run_dir / "checkpoint_last.pt")["model"]


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], round(r["loss"], 5)) for r in rows if r["kind"] == "train"]


def test_two_ranks_equal_one_rank_with_accumulation(exp, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _run(
        [
            sys.executable,
            "-m",
            "mt",
            "train",
            str(exp),
            *BASE,
            "train.max_steps=3",
            "train.accum_steps=2",
            f"train.out_dir={one}",
        ],
        tmp_path,
    )
    _run(
        _torchrun(2, "-m", "mt", "train", str(exp), *BASE, "train.max_steps=3", f"train.out_dir={two}"),
        tmp_path,
    )
    a, b = _weights(one), _weights(two)
    assert load_checkpoint(two / "checkpoint_last.pt")["world_size"] == 2
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    assert [s for s, _ in _losses(one)] == [s for s, _ in _losses(two)]


def test_two_rank_resume_equals_uninterrupted(exp, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    common = [*BASE, "model.dropout=0.1", "train.valid_every=2"]
    _run(
        _torchrun(2, "-m", "mt", "train", str(exp), *common, "train.max_steps=5", f"train.out_dir={full}"),
        tmp_path,
    )
    _run(
        _torchrun(2, "-m", "mt", "train", str(exp), *common, "train.max_steps=2", f"train.out_dir={part}"),
        tmp_path,
    )
    p = _run(
        _torchrun(2, "-m", "mt", "train", str(exp), *common, "train.max_steps=5", f"train.out_dir={part}"),
        tmp_path,
    )
    assert "resuming from" in p.stdout
    assert _losses(full) == _losses(part)
    a, b = _weights(full), _weights(part)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_failing_rank_ends_the_job(exp, tmp_path):
    driver = Path(__file__).with_name("rank_failure_driver.py")
    p = _run(
        _torchrun(
            2, str(driver), "train", str(exp), *BASE, "train.max_steps=6", f"train.out_dir={tmp_path / 'run'}"
        ),
        tmp_path,
        timeout=180,
        check=False,
    )
    assert p.returncode != 0
    assert "rank 1 exploded on purpose" in p.stderr + p.stdout


# --------------------------------------------------------------------------- in one process


class RecordingDist(Dist):
    """Two ranks as far as the trainer can tell; records the device of every collective's tensor."""

    def __init__(self) -> None:
        super().__init__(rank=0, world_size=2)
        self.devices: list[torch.device] = []

    def all_reduce_sum(self, t: torch.Tensor) -> None:
        self.devices.append(t.device)

    def barrier(self) -> None:
        pass

    def gather(self, obj: object) -> list[object]:
        return [obj, obj]

    def broadcast(self, obj: object) -> object:
        return obj


class OtherRankGotSigterm(RecordingDist):
    """The other rank's share of each update's sums says it was asked to stop."""

    def all_reduce_sum(self, t: torch.Tensor) -> None:
        super().all_reduce_sum(t)
        if t.numel() == 3:  # loss, nll, stop flag
            t[2] += 1.0


def test_every_collective_gets_tensors_on_the_models_device(exp):
    """NCCL takes only CUDA tensors: a CPU tensor in a collective fails the first multi-GPU update.
    A model on the `meta` device stands in for a GPU, so a tensor left on the CPU shows."""
    trainer = Trainer(load_config(exp, ["train.device=cpu"]))
    trainer.dist = RecordingDist()
    meta = torch.device("meta")
    trainer.model = trainer.raw_model.to(meta)
    trainer.device = meta
    batches = [_collate(trainer.train_split, idx) for idx in trainer.batcher.epoch_batches(0)[:2]]
    record = trainer.update(batches)  # the update's record stays on the device until it is read
    assert trainer.dist.devices == [meta, meta]  # the update's tokens, then its loss sums
    assert record.device == meta


def test_no_sync_reaches_ddp_through_torch_compile(tmp_path):
    """With accum_steps > 1 the gradient all-reduce is skipped on all but the last batch, also
    when the DDP module is wrapped by torch.compile."""
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        ddp = DistributedDataParallel(torch.nn.Linear(2, 2))
        compiled = torch.compile(ddp)
        d = Dist(rank=0, world_size=2)
        with d.no_sync(compiled, sync=False):
            assert not ddp.require_backward_grad_sync
        assert ddp.require_backward_grad_sync
        with d.no_sync(compiled, sync=True):
            assert ddp.require_backward_grad_sync
    finally:
        torch.distributed.destroy_process_group()


def test_a_stop_asked_of_one_rank_stops_every_rank_after_the_same_update(exp):
    """torchrun forwards SIGTERM to every rank, but not at the same instant; a rank that stopped
    alone would leave the others waiting in a collective. The stop is summed with the update."""
    trainer = Trainer(load_config(exp, ["train.device=cpu", "train.max_steps=5", "train.valid_bleu=false"]))
    trainer.dist = OtherRankGotSigterm()
    try:
        result = trainer.fit()
    finally:
        trainer.close()
    assert result["stopped"] == "interrupted" and result["steps"] == 1
    assert result["signal"] == signal.SIGTERM
