"""The end of a training run: average the end checkpoints and validate the average, point
checkpoint_final.pt at the better of it and the best checkpoint, score both on the test split,
and write curves.png and summary.json."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mt.checkpoint import Checkpoint, step_checkpoints
from mt.config import Config
from mt.errors import MTError
from mt.files import temp_path, write_atomic
from mt.model import Transformer
from mt.train.plot import plot_metrics
from mt.train.validation import best_key

if TYPE_CHECKING:  # the trainer calls finish(); this module only reads what it built
    from mt.train.trainer import Trainer


AVERAGED = "checkpoint_avg.pt"
FINAL = "checkpoint_final.pt"  # a link to the better of checkpoint_best.pt and checkpoint_avg.pt


def finish(cfg: Config, trainer: Trainer, result: dict[str, Any]) -> None:
    """What rank 0 does after a run that was not interrupted; adds to `result` and writes it to
    summary.json."""
    plot_metrics(trainer.out / "metrics.jsonl", trainer.out / "curves.png")
    average = average_last(trainer)
    if average is not None:
        result["average"] = average
    result["final_checkpoint"] = choose_final(trainer, average)
    result["test"] = final_test(cfg, trainer, trainer.out / AVERAGED if average else None)
    write_atomic(trainer.out / "summary.json", json.dumps(result, indent=2) + "\n")


def end_checkpoints(trainer: Trainer) -> list[Path]:
    """The step checkpoints averaged at the end: the last train.keep_last of those from the last
    quarter of the run's steps. Older ones (a run that a time limit stopped early keeps step
    checkpoints from long before its end) would pull the average back towards a weaker model."""
    steps = trainer.state.step
    late = [p for step, p in step_checkpoints(trainer.out) if 4 * step >= 3 * steps and step <= steps]
    return late[-trainer.cfg.train.keep_last :] if trainer.cfg.train.keep_last else []


def average_last(trainer: Trainer) -> dict[str, Any] | None:
    """Average the end checkpoints (end_checkpoints) into checkpoint_avg.pt and validate it as
    the run validates its checkpoints; None when there are fewer than two to average."""
    from mt.train.average import average_checkpoints  # looked up now: tests replace it

    paths = end_checkpoints(trainer)
    if len(paths) < 2:
        return None
    out = trainer.out / AVERAGED
    average_checkpoints([str(p) for p in paths], str(out), quiet=True)
    tok = trainer.data.tokenizer
    model = Transformer(trainer.cfg.model, tok.src_vocab_size, tok.tgt_vocab_size).to(trainer.device)
    model.load_state_dict(Checkpoint.read(out, map_location=trainer.device).model)
    valid = trainer.valid_metrics(model)
    key = best_key(valid, trainer.cfg.train.best_metric)
    best = trainer.state.best
    worse = best is not None and (valid[key] > best if key == "valid_loss" else valid[key] < best)
    names = ", ".join(p.name for p in paths)
    step = trainer.state.best_step
    against = "" if best is None else f" against {best:.4g} for the best checkpoint (step {step})"
    print(
        f"averaged {len(paths)} checkpoints ({names}) into {out}: {key} {valid[key]:.4g}{against}"
        + ("; the average is worse than the best on the validation set" if worse else "")
    )
    return {
        "checkpoints": [p.name for p in paths],
        "valid": valid,
        "metric": key,
        "best": best,
        "best_step": trainer.state.best_step,
        "worse_than_best": worse,
    }


def choose_final(trainer: Trainer, average: dict[str, Any] | None) -> str | None:
    """Point checkpoint_final.pt (a symbolic link, made atomically) at the averaged checkpoint,
    unless it is worse than the best on the validation set; `make translate` and `make evaluate`
    use it. Returns the name it points at."""
    name = AVERAGED if average is not None and not average["worse_than_best"] else trainer.best_path.name
    if not (trainer.out / name).exists():
        return None
    link = trainer.out / FINAL
    tmp = temp_path(link)
    tmp.unlink(missing_ok=True)
    try:
        os.symlink(name, tmp)
        os.replace(tmp, link)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise MTError(f"cannot write {link}: {e.strerror or e}") from None
    print(f"{link} -> {name} (what `make translate` and `make evaluate` use)")
    return name


def final_test(cfg: Config, trainer: Trainer, averaged: Path | None) -> dict[str, Any]:
    """Score the best (and averaged) checkpoint on the test split, beam and greedy; print all."""
    from mt.translate.evaluate import evaluate_checkpoint

    if "test" not in trainer.data.meta["splits"] or not trainer.best_path.exists():
        return {}
    src, ref = trainer.data.text("test", "src"), trainer.data.text("test", "tgt")
    candidates = {"best": trainer.best_path}
    if averaged is not None:
        candidates["averaged"] = averaged
    results = {}
    for label, path in candidates.items():
        for beam in sorted({cfg.decode.beam, 1}, reverse=True):
            r = evaluate_checkpoint(path, src, ref, beam=beam, device=str(trainer.device), name="test")
            results[f"{label}_beam{beam}"] = r
            print(
                f"test BLEU {r['bleu']:.2f} chrF {r['chrf']:.2f} ({label} checkpoint {path.name}, "
                f"{'greedy' if beam == 1 else f'beam {beam}'}, {r['precision']}, {r['seconds']:.1f}s; "
                f"{r['bleu_signature']})"
            )
    return results
