"""Training: what a run writes, resuming, non-finite updates, the optimizer and the precision a
run trains in, TensorBoard, and the speed-related paths (deferred reads, compiling).

The end of a run (averaging, checkpoint_final.pt, the final test) is test_finish.py's; the faults
a run survives (SIGKILL, Ctrl-C, full disks, a directory in use) are test_trainer_faults.py's.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, corpus_config, corpus_files, synthetic_pairs
from helpers import run_metrics as _metrics
from helpers import same_contents as _same
from helpers import train_config as _cfg

import mt.train.trainer as trainer_mod
from mt.checkpoint import load_checkpoint
from mt.cli import main
from mt.config import load_config
from mt.data.prepare import prepare
from mt.errors import DataError, MTError
from mt.train.trainer import train

# `corpus` and `prepared_dir` are conftest's, shared by the module (read only).


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]


def test_train_writes_everything(tmp_path, corpus):
    cfg = _cfg(tmp_path, corpus, "train.max_steps=6", "train.valid_every=3")
    result = train(cfg)
    run = cfg.out_dir
    assert result["steps"] == 6
    for name in ("checkpoint_last.pt", "checkpoint_best.pt", "config.yaml", "metrics.jsonl", "curves.png"):
        assert (run / name).exists(), name
    ck = torch.load(run / "checkpoint_last.pt", weights_only=True)
    assert ck["state"]["step"] == 6 and ck["config"]["model"]["d_model"] == 16
    assert isinstance(ck["spm_src"], bytes)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in rows if r["kind"] == "valid"]
    assert [r["step"] for r in valid] == [3, 6]
    assert all(0 <= r["valid_bleu"] <= 100 and math.isfinite(r["valid_loss"]) for r in valid)
    assert "best_beam2" in result["test"] and "best_beam1" in result["test"]


def test_resumed_run_equals_uninterrupted(tmp_path, corpus):
    steps = ["train.valid_every=4", "model.dropout=0.1"]  # dropout: the RNG state must resume too
    full = _cfg(tmp_path / "a", corpus, "train.max_steps=14", *steps)
    train(full)
    part = _cfg(tmp_path / "b", corpus, "train.max_steps=5", *steps)
    train(part)
    assert load_checkpoint(part.out_dir / "checkpoint_last.pt")["state"]["step"] == 5
    rest = _cfg(tmp_path / "b", corpus, "train.max_steps=14", *steps)
    train(rest)
    a, b = (
        load_checkpoint(full.out_dir / "checkpoint_last.pt"),
        load_checkpoint(rest.out_dir / "checkpoint_last.pt"),
    )
    assert a["state"]["epoch"] >= 1, "the run should cross an epoch boundary"
    assert _losses(full.out_dir) == _losses(rest.out_dir)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def test_accumulation_matches_bigger_batches(tmp_path, corpus):
    # Two accumulated half-updates follow the same loss normalisation as one update.
    cfg = _cfg(tmp_path, corpus, "train.max_steps=3", "train.accum_steps=2", "train.valid_every=0")
    result = train(cfg)
    assert result["steps"] == 3
    ck = load_checkpoint(cfg.out_dir / "checkpoint_last.pt")
    assert ck["state"]["batch_pos"] == 6 or ck["state"]["epoch"] >= 1


def test_nonfinite_loss_is_skipped(tmp_path, corpus, monkeypatch, capsys):
    real = trainer_mod.label_smoothed_nll
    calls = {"n": 0}

    def sometimes_nan(logits, target, smoothing):
        calls["n"] += 1
        loss, nll = real(logits, target, smoothing)
        if calls["n"] == 2:
            return loss * float("nan"), nll * float("nan")
        return loss, nll

    monkeypatch.setattr(trainer_mod, "label_smoothed_nll", sometimes_nan)
    cfg = _cfg(tmp_path, corpus, "train.max_steps=4", "train.valid_every=0", "train.valid_bleu=false")
    train(cfg)
    assert "non-finite loss" in capsys.readouterr().err
    ck = load_checkpoint(cfg.out_dir / "checkpoint_last.pt")
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_nonfinite_update_is_skipped_not_saved(tmp_path, corpus, prepared_dir, monkeypatch, capsys, where):
    """test_nonfinite_loss_is_skipped checks the warning and finite saved weights; this checks that the
    bad update really left weights and optimizer alone, also for a finite loss with a NaN gradient."""
    snapshots = []
    real_update = trainer_mod.Trainer.update

    def update(self, batches):
        before = {k: v.clone() for k, v in self.model.state_dict().items()}
        opt_steps = [float(s["step"]) for s in self.optimizer.state.values()]
        out = real_update(self, batches)
        snapshots.append((self.state.step + 1, before, opt_steps, self))
        return out

    real_nll, real_norm = trainer_mod.label_smoothed_nll, torch.nn.utils.get_total_norm
    calls = {"n": 0}

    def nll(logits, target, smoothing):
        calls["n"] += 1
        loss, n = real_nll(logits, target, smoothing)
        return (loss * float("nan"), n * float("nan")) if calls["n"] == 3 else (loss, n)

    def total_norm(grads, *args, **kwargs):  # the gradients' norm is taken once per update
        calls["n"] += 1
        grads = list(grads)
        if calls["n"] == 3:
            grads[0].fill_(float("nan"))
        return real_norm(grads, *args, **kwargs)

    monkeypatch.setattr(trainer_mod.Trainer, "update", update)
    if where == "loss":
        monkeypatch.setattr(trainer_mod, "label_smoothed_nll", nll)
    else:
        monkeypatch.setattr(trainer_mod.torch.nn.utils, "get_total_norm", total_norm)
    rc = main(["train", str(corpus_config(tmp_path, corpus)), "train.max_steps=4", "train.valid_every=0",
               "train.valid_bleu=false", "train.threads=1", f"data.prepared_dir={prepared_dir}"])
    assert rc == 0
    assert "non-finite loss or gradient at step 3" in capsys.readouterr().err
    step, before, opt_steps, trainer = snapshots[2]
    after_step3 = snapshots[3][1]  # the weights before update 4 are those after update 3
    assert step == 3
    for k, v in before.items():
        assert torch.equal(v, after_step3[k]), f"the skipped update changed {k}"
    assert [float(s["step"]) for s in trainer.optimizer.state.values()] == [x + 1 for x in opt_steps]
    ck = load_checkpoint(tmp_path / "run" / "checkpoint_last.pt")
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert all(
        torch.isfinite(t).all() for s in ck["optimizer"]["state"].values() for t in s.values()
        if isinstance(t, torch.Tensor)
    )


def test_diverging_run_stops_with_a_clear_error(tmp_path, corpus, monkeypatch):
    def always_nan(logits, target, smoothing):
        s = logits.float().sum() * float("nan")
        return s, s

    monkeypatch.setattr(trainer_mod, "label_smoothed_nll", always_nan)
    cfg = _cfg(tmp_path, corpus, "train.max_steps=20", "train.valid_every=0")
    with pytest.raises(MTError, match="non-finite losses in a row"):
        train(cfg)


def test_resume_with_other_model_config_is_refused(tmp_path, corpus):
    train(_cfg(tmp_path, corpus, "train.max_steps=2", "train.valid_bleu=false"))
    with pytest.raises(MTError, match="different model config"):
        train(_cfg(tmp_path, corpus, "train.max_steps=4", "model.ffn_dim=48"))


def test_unprepared_data_is_prepared_first(tmp_path, corpus, capsys):
    cfg = _cfg(tmp_path, corpus, "train.max_steps=1", "train.valid_bleu=false")
    assert not cfg.prepared_dir.exists()
    train(cfg)
    assert "preparing it first" in capsys.readouterr().out


FUSED_ADAMW_ON_CPU = (2, 4)  # the first torch whose AdamW(fused=True) runs on the CPU


def test_the_torch_floor_has_the_fused_adamw_the_trainer_builds_on_the_cpu(tmp_path, corpus, prepared_dir):
    cfg = _cfg(tmp_path, corpus, "train.device=cpu", f"data.prepared_dir={prepared_dir}")
    trainer = trainer_mod.Trainer(cfg)
    try:
        fused = trainer.optimizer.defaults.get("fused")
    finally:
        trainer.close()
    floor = re.search(r'"torch>=(\d+)\.(\d+)', (REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert floor is not None
    if fused:  # an older torch allowed by pyproject.toml would fail at the first step
        assert (int(floor[1]), int(floor[2])) >= FUSED_ADAMW_ON_CPU, floor[0]


def test_a_prepared_cache_without_a_valid_split_is_refused(tmp_path, corpus):
    """A cache used as it is (its corpus out of reach) that has no validation split, as older
    versions prepared: training could not validate, so it does not start."""
    moved = shutil.copytree(corpus, tmp_path / "corpus")
    cfg = load_config(corpus_config(tmp_path, moved), ["train.max_steps=1"])
    prepare(cfg, quiet=True)
    meta_path = cfg.prepared_dir / "meta.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    del meta["splits"]["valid"]
    meta_path.write_text(json.dumps(meta), encoding="utf-8")
    shutil.rmtree(moved)
    with pytest.raises(DataError, match=f"the prepared data in {cfg.prepared_dir} has no 'valid' split"):
        train(cfg)
    assert not cfg.out_dir.exists()


def test_fp16_decoding_on_cpu_is_refused_before_training(tmp_path, corpus):
    cfg = _cfg(tmp_path, corpus, "train.device=cpu", "decode.precision=fp16")
    with pytest.raises(MTError, match="decode.precision=fp16 needs a GPU"):
        train(cfg)
    assert not cfg.out_dir.exists() and not cfg.prepared_dir.exists()  # nothing done


def test_training_with_a_valid_line_longer_than_the_model(tmp_path, capsys):
    """The valid split keeps a 20,000-token line; validation must not crash on it."""
    src, tgt = synthetic_pairs(200, seed=0)
    vsrc, vtgt = synthetic_pairs(6, seed=1)
    vsrc[2] = "hund " * 20_000
    vtgt[4] = "dog " * 20_000
    corpus = corpus_files(tmp_path / "corpus", {"train": (src, tgt), "val": (vsrc, vtgt),
                                                "test": (vsrc, vtgt)})
    rc = main(["train", str(corpus_config(tmp_path, corpus)), "train.max_steps=2", "train.threads=1",
               "model.max_positions=64"])
    err = capsys.readouterr().err
    assert rc == 0, err[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "valid"] == [2]


# --------------------------------------------------------------------------- fp16 and the grad scaler


def test_fp16_steps_the_scaler_skips_for_overflow_are_not_divergence(tmp_path, corpus):
    """fp16 training starts at a large loss scale and backs off while gradients overflow; those
    skipped steps are how the scaler finds its scale, so they must not stop the run as
    non-finite losses do (five in a row)."""
    cfg = _cfg(tmp_path, corpus, "train.max_steps=8", "train.valid_every=0", "train.valid_bleu=false")
    trainer = trainer_mod.Trainer(cfg)
    # What an fp16 overflow looks like to the trainer: a finite loss, gradients that are not.
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=1000)
    overflows = {"left": 6}

    def overflow(grad: torch.Tensor) -> torch.Tensor:
        if overflows["left"] > 0:
            overflows["left"] -= 1
            return grad * float("inf")
        return grad

    trainer.raw_model.out_proj.weight.register_hook(overflow)
    before = {k: v.clone() for k, v in trainer.raw_model.state_dict().items()}
    result = trainer.fit()  # six skipped steps in a row: more than MAX_NONFINITE_IN_ROW
    trainer.close()
    assert result["steps"] == 8 and result["stopped"] == "budget reached"
    assert trainer.scaler.get_scale() == 2.0**10  # it backed off once per overflow
    after = trainer.raw_model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # then the two others trained
    assert trainer.state.nonfinite_in_row == 0


def test_an_fp16_run_resumes_a_checkpoint_written_without_a_scaler(tmp_path, corpus):
    """A bf16 or CPU run saves an empty scaler state; an fp16 run resuming it starts its scaler afresh."""
    cfg = _cfg(tmp_path, corpus, "train.max_steps=2", "train.valid_every=0", "train.valid_bleu=false")
    train(cfg)
    assert load_checkpoint(cfg.out_dir / "checkpoint_last.pt")["scaler"] == {}
    resumed = trainer_mod.Trainer(_cfg(tmp_path, corpus, "train.max_steps=3", "train.valid_every=0"))
    try:
        resumed.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        resumed._resume(resumed._read_last_checkpoint())
        assert resumed.state.step == 2 and resumed.scaler.get_scale() == 2.0**16
    finally:
        resumed.close()


# --------------------------------------------------------------------------- TensorBoard


def test_tensorboard_gets_every_metric_and_the_attention_of_validation_sentences(tmp_path, corpus):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(tmp_path, corpus, "train.max_steps=4", "train.valid_every=2", "train.tensorboard=true")
    train(cfg)
    events = EventAccumulator(str(cfg.out_dir / "tensorboard"), size_guidance={"images": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {f"train/{k}" for k in ("loss", "lr", "tok_s", "grad_norm")} <= scalars
    assert {f"valid/{k}" for k in ("valid_loss", "valid_bleu", "valid_chrf")} <= scalars
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("valid/valid_loss")] == [2, 4]
    assert {"attention/valid_0", "attention/valid_1", "attention/valid_2"} <= set(events.Tags()["images"])
    assert [e.step for e in events.Images("attention/valid_0")] == [2, 4]


def test_tensorboard_without_its_extra_is_one_line(tmp_path, corpus, monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "tensorboard" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(MTError, match=r"train.tensorboard needs the `tensorboard` extra: pip install"):
        train(_cfg(tmp_path, corpus, "train.max_steps=1", "train.tensorboard=true"))


# --------------------------------------------------------------------------- speed: figures, reads, compile


def _train_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"]


def test_tokens_per_second_leave_out_validation_and_checkpoints(tmp_path, corpus, monkeypatch):
    real = trainer_mod.Trainer.validate_and_save

    def slow_validation(self):
        time.sleep(1.5)
        real(self)

    monkeypatch.setattr(trainer_mod.Trainer, "validate_and_save", slow_validation)
    cfg = _cfg(tmp_path, corpus, "train.max_steps=4", "train.valid_every=2", "train.log_every=2",
               "train.valid_bleu=false")
    train(cfg)
    rows = _train_rows(cfg.out_dir)
    assert [r["step"] for r in rows] == [2, 4]
    # Steps 3-4 had the validation of step 2 in their window: counted, at most 800 tokens in
    # 1.5 s would be 533 tokens/s; two updates of this model take milliseconds.
    assert rows[1]["tok_s"] > 5 * 800 / 1.5, rows


def test_reading_update_records_late_as_on_a_gpu_trains_the_same_run(tmp_path, corpus, monkeypatch, capsys):
    """On one GPU the update records are read every train.log_every steps; the run, its log and its
    non-finite checks (the step is skipped on the device) are those of reading each record at once."""
    real = trainer_mod.label_smoothed_nll
    calls = {"n": 0}

    def nan_at_step_5(logits, target, smoothing):
        calls["n"] += torch.is_grad_enabled()  # training only, not validation
        loss, nll = real(logits, target, smoothing)
        return (loss * float("nan"), nll * float("nan")) if calls["n"] == 5 else (loss, nll)

    monkeypatch.setattr(trainer_mod, "label_smoothed_nll", nan_at_step_5)
    runs = {}
    for deferred in (False, True):
        calls["n"] = 0
        cfg = _cfg(tmp_path / str(deferred), corpus, "train.max_steps=9", "train.valid_every=4",
                   "train.log_every=3", "train.valid_bleu=false", "model.dropout=0.1")
        trainer = trainer_mod.Trainer(cfg)
        trainer.defer_reads = deferred
        try:
            trainer.fit()
        finally:
            trainer.close()
        assert "non-finite loss or gradient at step 5" in capsys.readouterr().err
        runs[deferred] = cfg.out_dir
    assert _metrics(runs[True]) == _metrics(runs[False])
    assert [r["step"] for r in _train_rows(runs[True])] == [3, 6, 9]
    a, b = (load_checkpoint(runs[d] / "checkpoint_last.pt") for d in (False, True))
    _same(a["model"], b["model"], "model")
    _same(a["optimizer"], b["optimizer"], "optimizer")
    assert a["state"] == {**b["state"], "elapsed": a["state"]["elapsed"]}


def test_gradients_are_scaled_only_when_clip_norm_is_set(tmp_path, corpus, monkeypatch):
    real = torch.nn.utils.clip_grads_with_norm_
    bounds = []

    def clip(params, max_norm, total_norm, *args, **kwargs):
        bounds.append(max_norm)
        return real(params, max_norm, total_norm, *args, **kwargs)

    monkeypatch.setattr(trainer_mod.torch.nn.utils, "clip_grads_with_norm_", clip)
    for clip_norm in (0.0, 0.5):
        trainer = trainer_mod.Trainer(_cfg(tmp_path / str(clip_norm), corpus, f"train.clip_norm={clip_norm}"))
        try:
            idx = trainer.batcher.epoch_batches(0)[0]
            record = trainer.update([trainer_mod._collate(trainer.train_split, idx)])
        finally:
            trainer.close()
        out = dict(zip(trainer_mod.RECORD, record.tolist(), strict=True))
        assert out["finite"] == 1.0 and out["grad_norm"] > 0.5  # the norm before clipping
    assert bounds == [0.5]


def _compiled_run(tmp_path, corpus, monkeypatch, backend, *overrides):
    """A compiled run through `backend`; returns its train rows and the compile counter."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    counter = CompileCounterWithBackend(backend)
    real_compile = torch.compile
    monkeypatch.setattr(trainer_mod.torch, "compile",
                        lambda fn, **kw: real_compile(fn, backend=counter, **kw))
    torch._dynamo.reset()
    counters.clear()
    cfg = _cfg(tmp_path, corpus, "train.compile=true", "train.pad_to_multiple=8", "train.valid_every=0",
               "train.valid_bleu=false", *overrides)
    trainer = trainer_mod.Trainer(cfg)
    try:
        widths = set()
        for epoch in range(2):
            for idx in trainer.batcher.epoch_batches(epoch):
                widths.add(trainer_mod._collate(trainer.train_split, idx, 8, 400).src.shape)
        trainer.fit()
    finally:
        trainer.close()
        monkeypatch.undo()
    breaks = dict(counters["graph_break"])
    torch._dynamo.reset()
    return _train_rows(cfg.out_dir), counter.frame_count, widths, breaks


def test_compiled_training_with_pad_to_multiple_compiles_each_batch_shape_once(tmp_path, corpus, monkeypatch):
    # 7 batches an epoch; two epochs: the second compiles nothing new.
    one_epoch, first, widths, breaks = _compiled_run(tmp_path / "a", corpus, monkeypatch, "aot_eager",
                                                     "train.max_steps=7")
    assert not breaks, breaks
    assert 2 <= first <= 2 * len(widths) <= 6, (first, widths)  # the model and the loss, per shape
    _, both, _, _ = _compiled_run(tmp_path / "b", corpus, monkeypatch, "aot_eager", "train.max_steps=14")
    assert both == first


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_and_eager_training_agree(tmp_path, corpus, monkeypatch, backend):
    common = ["train.pad_to_multiple=8", "train.valid_every=0", "train.valid_bleu=false", "train.max_steps=4"]
    compiled, _, _, _ = _compiled_run(tmp_path / "c", corpus, monkeypatch, backend, "train.max_steps=4")
    eager = _cfg(tmp_path / "e", corpus, *common)
    train(eager)
    losses = [r["loss"] for r in _train_rows(eager.out_dir)]
    assert [r["loss"] for r in compiled] == pytest.approx(losses, rel=1e-4)
