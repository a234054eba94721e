"""Run the mt CLI with one fault injected: python tests/fault_driver.py FAULT MT-ARGS...

FAULT is KIND[@STEP][:FILE]. Each kind monkeypatches one function of `mt` (or of torch or os
as `mt` calls them); "die" is SIGKILL, which no handler, `finally` or atexit sees:

    update@N          die inside the update that makes step N, after the weights changed in memory
    validate@N        die mid-validation at step N: loss done, greedy decoding for BLEU under way
    save@N:FILE       die with half of checkpoint FILE of step N on disk
    saved@N:FILE      die just after checkpoint FILE of step N is complete
    metrics@N         die with half of the metrics.jsonl line of step N written
    interrupt@N       before the update after step N, wait (up to 120 s) for the caller's Ctrl-C or
                      SIGTERM; the file WAITING in the working directory says it is waiting
    prepare           die while the token arrays of the first split are written
    swap              die after the old prepared cache was moved aside, before the new one is moved in
    translate         die in the middle of translating

The tests (tests/helpers.py: run_mt) run it as a script, with `mt` installed in the interpreter.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import time
from collections.abc import Callable

import torch

import mt.data.prepare
import mt.train.metrics_log
import mt.train.trainer
import mt.train.validation
import mt.translate.translator
from mt.cli import main

Trainer = mt.train.trainer.Trainer


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def die_in_update(at: int | None, name: str) -> None:
    real_update = Trainer.update

    def update(self, batches):
        out = real_update(self, batches)
        if self.state.step + 1 == at:
            die()
        return out

    Trainer.update = update


def die_in_validation(at: int | None, name: str) -> None:
    real_validate, real_translate = Trainer.validate, mt.train.validation.translate_ids
    current = {}

    def validate(self):
        current["step"] = self.state.step
        return real_validate(self)

    def translate_ids(*args, **kwargs):
        if current.get("step") == at:
            die()
        return real_translate(*args, **kwargs)

    Trainer.validate = validate
    mt.train.validation.translate_ids = translate_ids


def die_while_saving(at: int | None, name: str) -> None:
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        target = os.path.basename(getattr(f, "name", str(f)))
        if target.startswith(name + ".tmp-") and obj["state"]["step"] == at:
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            os.fsync(f.fileno())
            die()
        return real_save(obj, f, *args, **kwargs)

    torch.save = save


def die_after_saving(at: int | None, name: str) -> None:
    real_save_checkpoint = mt.train.trainer.save_checkpoint

    def save_checkpoint(path, state):
        real_save_checkpoint(path, state)
        if os.path.basename(str(path)) == name and state["state"]["step"] == at:
            die()

    mt.train.trainer.save_checkpoint = save_checkpoint


def die_mid_metrics_line(at: int | None, name: str) -> None:
    real_write = mt.train.metrics_log.MetricsLog.write

    def write(self, **record):
        if record["step"] == at:
            line = json.dumps(record) + "\n"
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line[: len(line) // 2])
            die()
        real_write(self, **record)

    mt.train.metrics_log.MetricsLog.write = write


WAITING = "WAITING"


def wait_for_ctrl_c(at: int | None, name: str) -> None:
    real_update = Trainer.update

    def update(self, batches):
        if self.state.step == at:
            open(WAITING, "w").close()  # the test may send its signal now
            deadline = time.time() + 120
            while not self.stop_requested and time.time() < deadline:
                time.sleep(0.02)
        return real_update(self, batches)

    Trainer.update = update


def die_while_preparing(at: int | None, name: str) -> None:
    def write_arrays(*args, **kwargs):
        die()

    mt.data.prepare._write_arrays = write_arrays


def die_between_cache_swaps(at: int | None, name: str) -> None:
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if ".tmp-" in os.path.basename(str(src)) and os.path.isdir(src):
            die()
        return real_replace(src, dst, *args, **kwargs)

    os.replace = replace


def die_while_translating(at: int | None, name: str) -> None:
    def translate_nbest(self, *args, **kwargs):
        die()

    mt.translate.translator.Translator.translate_nbest = translate_nbest


FAULTS: dict[str, Callable[[int | None, str], None]] = {
    "update": die_in_update,
    "validate": die_in_validation,
    "save": die_while_saving,
    "saved": die_after_saving,
    "metrics": die_mid_metrics_line,
    "interrupt": wait_for_ctrl_c,
    "prepare": die_while_preparing,
    "swap": die_between_cache_swaps,
    "translate": die_while_translating,
}


def run(argv: list[str]) -> int:
    """Inject the fault argv[0] names, then run `mt` with the rest."""
    kind, _, rest = argv[0].partition("@")
    at_text, _, name = rest.partition(":")
    if kind not in FAULTS:
        raise SystemExit(f"unknown fault {argv[0]}")
    FAULTS[kind](int(at_text) if at_text else None, name)
    return main(argv[1:])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
