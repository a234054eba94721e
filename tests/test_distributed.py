"""Two CPU processes through torchrun (gloo): the same training as one process."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import corpus_config, make_corpus

from mt.checkpoint import load_checkpoint
from mt.config import load_config
from mt.prepare import prepare

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
    driver = tmp_path / "driver.py"
    driver.write_text(
        textwrap.dedent("""
        import os, sys
        import mt.trainer as T
        real = T.Trainer.update
        def update(self, batches):
            if self.dist.rank == 1 and self.state.step == 1:
                raise RuntimeError("rank 1 exploded on purpose")
            return real(self, batches)
        T.Trainer.update = update
        from mt.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    )
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
