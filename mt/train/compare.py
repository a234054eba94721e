"""`mt compare`: which of several training runs is better, and whether the difference is real.

A run is a directory that `mt train` wrote (config.yaml, metrics.jsonl, summary.json, and the
test translations of its checkpoints next to them), or one of its checkpoints; a directory
stands for its best checkpoint. For each run the comparison holds the config keys that differ
between the runs, its steps, epochs and training time, its best validation scores with their
steps, and its scores on a test split: BLEU and chrF of the translations `mt train` wrote at
the end (or, with a split named, translations made now), with sacreBLEU's paired bootstrap
resampling against the first run (`sacrebleu.significance.PairedTest`, the code behind
`sacrebleu --paired-bs`): each score's bootstrap mean and 95% confidence interval, and the
p-value of its difference from the first run's, significant below 0.05.

The translations are scored again against the references of the prepared split, which must be
the same for every run, and must be those each run's translations were scored on when they were
written: anything else is an error, as are incomplete runs and runs without test translations.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.significance import PairedTest, Result

from mt.config import Config, load_saved_config, to_dict
from mt.errors import MTError
from mt.files import read_lines
from mt.train.resume import flatten
from mt.translate.evaluate import output_paths

SIGNIFICANCE = 0.05  # sacreBLEU's threshold: a p-value below it is marked significant
RESAMPLES = 1000  # sacreBLEU's default number of bootstrap resamples
PRECISIONS = ("fp32", "bf16", "fp16")  # in the order their translations are looked for
METRICS = {"bleu": "BLEU", "chrf": "chrF2"}  # our key -> the name sacreBLEU's scores carry
VALIDATION = {"bleu": "valid_bleu", "chrf": "valid_chrf", "loss": "valid_loss"}  # metrics.jsonl keys


@dataclass
class Run:
    """What `mt train` wrote for one run, as read back."""

    label: str  # the argument that named it
    directory: Path
    checkpoint: Path  # whose test translations are compared
    config: Config
    summary: dict[str, Any]  # summary.json: steps, epochs, minutes, stopped, ...
    valid: list[dict[str, Any]]  # the validation records of metrics.jsonl, in order


@dataclass
class Translations:
    """One run's translations of the compared split, and the references they are scored on."""

    hypotheses: list[str]
    references: list[str]
    references_file: Path
    hypotheses_file: Path
    beam: int
    precision: str
    recorded: dict[str, float]  # the scores written when the translations were made


@dataclass
class TestScore:
    """A score on the test split with sacreBLEU's paired bootstrap against the first run."""

    score: float
    mean: float  # of the bootstrap resamples
    ci: float  # half the width of the 95% confidence interval around the mean
    p_value: float | None = None  # None for the first run, the baseline
    delta: float | None = None  # score minus the baseline's

    @property
    def significant(self) -> bool | None:
        return None if self.p_value is None else self.p_value < SIGNIFICANCE


@dataclass
class Comparison:
    runs: list[Run]
    translations: list[Translations]
    tests: list[dict[str, TestScore]]  # per run, by key of METRICS
    differences: dict[str, list[Any]]  # config key -> each run's value (None: no such key)
    split: str
    resamples: int
    signatures: dict[str, str]  # sacreBLEU's, with the bootstrap's seed and resamples


# --------------------------------------------------------------------------- reading runs


def _read_json(path: Path, label: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MTError(f"{label}: cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    if not isinstance(value, dict):
        raise MTError(f"{label}: {path} is not a JSON object")
    return value


def _metrics(path: Path, label: str) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise MTError(f"{label}: cannot read {path}: {e.strerror or e}") from None
    records = []
    for i, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            raise MTError(f"{label}: {path}, line {i}: not a JSON record") from None
    return records


def read_run(arg: str | Path) -> Run:
    """A run directory or a checkpoint in one, checked to be a finished run of `mt train`."""
    label = os.path.normpath(arg)
    path = Path(arg)
    if path.is_dir():
        directory, checkpoint = path, path / "checkpoint_best.pt"
    elif path.is_file():
        directory, checkpoint = path.parent, path
    else:
        raise MTError(f"{label}: no such run directory or checkpoint")
    config = directory / "config.yaml"
    if not config.is_file():
        raise MTError(f"{label}: not a run directory of `mt train` (no {config})")
    cfg = load_saved_config(config)
    summary = directory / "summary.json"
    if not summary.is_file():
        raise MTError(
            f"{label}: the run is incomplete (no {summary}: it is still training, was interrupted or "
            f"failed); finish it with the `mt train` command that started it"
        )
    metrics = directory / "metrics.jsonl"
    if not metrics.is_file():
        raise MTError(f"{label}: not a complete run of `mt train` (no {metrics})")
    records, finished = _metrics(metrics, label), _read_json(summary, label)
    logged = max((r.get("step", 0) for r in records), default=0)
    if logged > finished.get("steps", 0):  # summary.json is of an earlier end
        raise MTError(
            f"{label}: the run is incomplete (it was resumed: {metrics} goes to step {logged}, {summary} "
            f"ends at step {finished.get('steps', 0)}); finish it with the `mt train` command that resumed it"
        )
    valid = [r for r in records if r.get("kind") == "valid"]
    return Run(label, directory, checkpoint, cfg, finished, valid)


def config_differences(configs: list[Config]) -> dict[str, list[Any]]:
    """The config keys (dotted, as on the command line) whose values are not the same in all
    configs, with each config's value; a key one config lacks (a setting of a source the other
    configs do not have) counts as None."""
    flat = [flatten(to_dict(c)) for c in configs]
    keys = dict.fromkeys(k for f in flat for k in f)  # in order of first appearance
    return {k: [f.get(k) for f in flat] for k in keys if any(f.get(k) != flat[0].get(k) for f in flat)}


def best_validation(run: Run, metric: str) -> tuple[float, int] | None:
    """The best validation value of `metric` (bleu, chrf, loss) and the first step that reached
    it; None when the run never measured it."""
    key = VALIDATION[metric]
    values = [(r[key], r["step"]) for r in run.valid if key in r]
    if not values:
        return None
    best = min(v for v, _ in values) if metric == "loss" else max(v for v, _ in values)
    return best, next(step for v, step in values if v == best)


# --------------------------------------------------------------------------- translations


def _references(run: Run, split: str) -> tuple[Path, list[str]]:
    """The references of a prepared split, from the run's config (paths relative to where it ran)."""
    directory = run.config.prepared_dir
    if not (directory / "meta.json").is_file():
        raise MTError(
            f"{run.label}: no prepared data at {directory} to score against: run `mt compare` where the run "
            f"was trained (paths in its config.yaml are relative to that directory), or prepare its data"
        )
    splits = list(_read_json(directory / "meta.json", run.label).get("splits", {}))
    if split not in splits:
        raise MTError(f"{run.label}: no split '{split}' in {directory}; its splits are {', '.join(splits)}")
    path = directory / f"{split}.tgt.txt"
    if not path.is_file():
        raise MTError(
            f"{run.label}: split '{split}' of {directory} keeps no raw text to score against (only "
            f"validation and test splits do)"
        )
    return path, read_lines(path)


def recorded_translations(run: Run, split: str, beam: int | None) -> Translations:
    """The translations of `split` written next to the run's checkpoint when it was scored (by
    `mt train` at its end, or `mt evaluate`), with the references of the prepared split."""
    beam = beam or run.config.decode.beam
    for precision in PRECISIONS:
        hyp_file, json_file = output_paths(run.checkpoint, split, beam, precision)
        if json_file.is_file() and hyp_file.is_file():
            break
    else:
        hyp_file, _ = output_paths(run.checkpoint, split, beam)
        raise MTError(
            f"{run.label}: no {split} translations of {run.checkpoint.name} with beam {beam} ({hyp_file} "
            f"not found); `mt train` writes them when the data has a test split, or translate them "
            f"now with --split {split}"
        )
    record = _read_json(json_file, run.label)
    refs_file, refs = _references(run, split)
    return Translations(
        read_lines(hyp_file), refs, refs_file, hyp_file, beam, precision,
        {k: float(record[k]) for k in METRICS if k in record},
    )


def translate_split(run: Run, split: str, beam: int | None, device: str | None) -> Translations:
    """Translate the prepared `split` with the run's checkpoint now, as `mt evaluate` does (the
    hypotheses and scores are written next to the checkpoint)."""
    from mt.translate.evaluate import evaluate_checkpoint

    if not run.checkpoint.is_file():
        raise MTError(f"{run.label}: no checkpoint {run.checkpoint} to translate split '{split}' with")
    refs_file, refs = _references(run, split)
    src = read_lines(refs_file.with_name(f"{split}.src.txt"))
    result = evaluate_checkpoint(
        run.checkpoint, src, refs, beam, device=device, name=split, decode=run.config.decode
    )
    hyp_file = Path(result["hyp_file"])
    recorded = {k: result[k] for k in METRICS}
    return Translations(
        read_lines(hyp_file), refs, refs_file, hyp_file, result["beam"], result["precision"], recorded
    )


def check_references(runs: list[Run], translations: list[Translations]) -> None:
    """Every run's translations line up with the references, and the references are the same."""
    for run, t in zip(runs, translations, strict=True):
        if len(t.hypotheses) != len(t.references):
            raise MTError(
                f"{run.label}: {len(t.hypotheses)} translations in {t.hypotheses_file} but "
                f"{len(t.references)} references in {t.references_file}: they were scored on other references"
            )
    first, t0 = runs[0], translations[0]
    for run, t in zip(runs[1:], translations[1:], strict=False):
        if t.references != t0.references:
            if len(t.references) != len(t0.references):
                where = f"{len(t0.references)} and {len(t.references)} lines"
            else:
                pairs = zip(t0.references, t.references, strict=True)
                where = f"first at line {next(i for i, (a, b) in enumerate(pairs, 1) if a != b)}"
            raise MTError(
                f"{first.label} and {run.label} were scored on different references ({t0.references_file} "
                f"and {t.references_file} differ: {where}); compare runs on the same test set"
            )


# --------------------------------------------------------------------------- significance


def paired_bootstrap(
    systems: list[tuple[str, list[str]]], references: list[str], resamples: int = RESAMPLES
) -> tuple[list[dict[str, TestScore]], dict[str, str]]:
    """sacreBLEU's paired bootstrap resampling of BLEU and chrF, each system against the first:
    per system {bleu, chrf} scores, and the metrics' signatures (with seed and resamples). The
    seed is sacreBLEU's: 12345, or the SACREBLEU_SEED environment variable. One departure: a
    system whose translations are the baseline's has p-value 1 (see below)."""
    # As `sacrebleu REF -i SYS... --paired-bs` builds them: references cached in the metrics.
    metrics = {"BLEU": BLEU(references=[references]), "CHRF": CHRF(references=[references])}
    named: list[tuple[str, Sequence[str]]] = list(systems)  # PairedTest's list type is invariant
    signatures, results = PairedTest(named, metrics, None, test_type="bs", n_samples=resamples)()
    scores: list[dict[str, TestScore]] = [{} for _ in systems]
    for key, name in METRICS.items():
        # sacreBLEU types every column str | Result: only its "System" column holds names.
        column = cast(list[Result], results[name])
        baseline = column[0].score
        for i, r in enumerate(column):
            delta = None if i == 0 else r.score - baseline
            p_value = r.p_value
            if i and systems[i][1] == systems[0][1]:
                # Translations equal to the baseline's differ by exactly 0 in every resample, and
                # sacreBLEU, counting resampled differences strictly above the observed one, finds
                # none and reports its smallest p-value, 1 / (resamples + 1): "significant".
                p_value = 1.0
            assert r.mean is not None and r.ci is not None, "the bootstrap gives every system both"
            scores[i][key] = TestScore(float(r.score), float(r.mean), float(r.ci), p_value, delta)
    return scores, {name: signatures[name].format() for name in METRICS.values()}


# --------------------------------------------------------------------------- the comparison


def compare(
    paths: list[str | Path],
    split: str | None = None,
    beam: int | None = None,
    resamples: int = RESAMPLES,
    device: str | None = None,
) -> Comparison:
    """Compare runs (directories or checkpoints) on the test translations `mt train` wrote, or,
    with `split`, on translations of that prepared split made now."""
    if resamples < 1:
        raise MTError(f"--resamples must be >= 1, got {resamples}")
    runs = [read_run(p) for p in paths]
    if split is None:
        translations = [recorded_translations(r, "test", beam) for r in runs]
    else:
        translations = [translate_split(r, split, beam, device) for r in runs]
    check_references(runs, translations)
    systems = [(r.label, t.hypotheses) for r, t in zip(runs, translations, strict=True)]
    tests, signatures = paired_bootstrap(systems, translations[0].references, resamples)
    for run, t, test in zip(runs, translations, tests, strict=True):
        for key, recorded in t.recorded.items():
            if not math.isclose(recorded, test[key].score, abs_tol=1e-6):
                raise MTError(
                    f"{run.label}: {t.hypotheses_file} was scored {METRICS[key]} {recorded:.2f} when it was "
                    f"written but scores {test[key].score:.2f} against {t.references_file}: the references "
                    f"changed since; translate again with --split {split or 'test'}"
                )
    differences = config_differences([r.config for r in runs])
    return Comparison(runs, translations, tests, differences, split or "test", resamples, signatures)


# --------------------------------------------------------------------------- output


def _value(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (dict, list)):
        return json.dumps(v, ensure_ascii=False)
    return str(v)


def _minutes(minutes: float | None) -> str:
    if minutes is None:
        return "-"
    return f"{minutes:.1f} min" if minutes >= 1 else f"{minutes * 60:.1f} s"


def _best(run: Run, metric: str) -> str:
    best = best_validation(run, metric)
    if best is None:
        return "-"
    return f"{best[0]:.{3 if metric == 'loss' else 2}f} @ {best[1]}"


def _versus(s: TestScore) -> str:
    if s.p_value is None:
        return "baseline"
    mark = "significant" if s.significant else "not significant"
    return f"{s.delta:+.2f}, p = {s.p_value:.4f}, {mark}"


def rows(c: Comparison) -> list[tuple[str, list[str]] | str]:
    """The table: section titles (str) and rows (name, one cell per run)."""
    out: list[tuple[str, list[str]] | str] = ["config (the keys that differ)"]
    out += [(k, [_value(v) for v in values]) for k, values in c.differences.items()] or [
        ("(none)", ["same" for _ in c.runs])
    ]
    out += ["training"]
    out += [
        ("steps", [_value(r.summary.get("steps")) for r in c.runs]),
        ("epochs", [_value(r.summary.get("epochs")) for r in c.runs]),
        ("time", [_minutes(r.summary.get("minutes")) for r in c.runs]),
        ("stopped", [_value(r.summary.get("stopped")) for r in c.runs]),
    ]
    out += ["validation (greedy), best @ step"]
    for metric, name in (("bleu", "BLEU"), ("chrf", "chrF"), ("loss", "loss")):
        out.append((f"best {name}", [_best(r, metric) for r in c.runs]))
    sentences = len(c.translations[0].references)
    out += [f"{c.split} ({sentences} sentences), against the first run"]
    beams = [f"{t.beam}" if t.precision == "fp32" else f"{t.beam}, {t.precision}" for t in c.translations]
    out += [("checkpoint", [r.checkpoint.name for r in c.runs]), ("beam", beams)]
    for key, name in (("bleu", "BLEU"), ("chrf", "chrF")):
        out += [
            (name, [f"{t[key].score:.2f}" for t in c.tests]),
            (f"{name} mean ± 95% CI", [f"{t[key].mean:.2f} ± {t[key].ci:.2f}" for t in c.tests]),
            (f"{name} vs first", [_versus(t[key]) for t in c.tests]),
        ]
    return out


def _notes(c: Comparison) -> list[str]:
    return [
        f"Paired bootstrap resampling (sacreBLEU, {c.resamples} resamples) of each run against "
        f"{c.runs[0].label}; p < {SIGNIFICANCE} is significant.",
        f"References: {c.translations[0].references_file}.",
        *(f"{name}: {sig}" for name, sig in c.signatures.items()),
    ]


def table(c: Comparison) -> str:
    """The comparison as a plain-text table, then how it was tested."""
    table_rows = rows(c)
    names = [r[0] for r in table_rows if isinstance(r, tuple)]
    first = max(len(n) + 2 for n in [*names, "run"]) + 2  # names are indented under their section
    cells = [[r.label for r in c.runs]] + [r[1] for r in table_rows if isinstance(r, tuple)]
    widths = [max(len(row[i]) for row in cells) + 2 for i in range(len(c.runs))]

    def line(name: str, values: list[str]) -> str:
        return (name.ljust(first) + "".join(v.ljust(w) for v, w in zip(values, widths, strict=True))).rstrip()

    out = [line("run", [r.label for r in c.runs])]
    for r in table_rows:
        out.append(r if isinstance(r, str) else line("  " + r[0], r[1]))
    return "\n".join([*out, "", *_notes(c)]) + "\n"


def to_json(c: Comparison) -> dict[str, Any]:
    """The comparison for scripts."""
    runs = []
    for run, t, test in zip(c.runs, c.translations, c.tests, strict=True):
        best = {m: best_validation(run, m) for m in VALIDATION}
        runs.append({
            "run": run.label,
            "directory": str(run.directory),
            "checkpoint": str(run.checkpoint),
            "steps": run.summary.get("steps"),
            "epochs": run.summary.get("epochs"),
            "minutes": run.summary.get("minutes"),
            "stopped": run.summary.get("stopped"),
            "best_valid": {m: None if b is None else {"value": b[0], "step": b[1]} for m, b in best.items()},
            "beam": t.beam,
            "precision": t.precision,
            "hypotheses": str(t.hypotheses_file),
            "test": {k: {**dataclasses.asdict(s), "significant": s.significant} for k, s in test.items()},
        })
    return {
        "split": c.split,
        "sentences": len(c.translations[0].references),
        "references": str(c.translations[0].references_file),
        "baseline": c.runs[0].label,
        "resamples": c.resamples,
        "significance": SIGNIFICANCE,
        "signatures": c.signatures,
        "differences": c.differences,
        "runs": runs,
    }


def curves(c: Comparison) -> dict[str, list[dict[str, Any]]]:
    """Each run's validation records, by label."""
    return {r.label: r.valid for r in c.runs}


def to_html(c: Comparison, svg: str) -> str:
    """A page with the table, the validation curves (an SVG) and how it was tested."""
    e = html.escape
    body = ["<tr><th>run</th>" + "".join(f"<th>{e(r.label)}</th>" for r in c.runs) + "</tr>"]
    for r in rows(c):
        if isinstance(r, str):
            body.append(f'<tr class="section"><th colspan="{len(c.runs) + 1}">{e(r)}</th></tr>')
        else:
            body.append(f"<tr><td>{e(r[0])}</td>" + "".join(f"<td>{e(v)}</td>" for v in r[1]) + "</tr>")
    notes = "".join(f"<p>{e(n)}</p>" for n in _notes(c))
    return (
        '<!doctype html>\n<html><head><meta charset="utf-8"><title>mt compare</title>\n<style>'
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{padding:.2em .8em;text-align:left;border-bottom:1px solid #ddd}"
        "tr.section th{padding-top:1em;background:#f4f4f4}p{font-size:.85em;color:#444}</style></head>\n"
        f"<body><h1>mt compare</h1>\n<table>{''.join(body)}</table>\n{notes}\n{svg}\n</body></html>\n"
    )

