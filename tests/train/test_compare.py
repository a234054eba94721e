"""mt compare: two tiny real runs (a base config and a variant that extends it), the keys that differ,
the table, a significance test equal to sacreBLEU's own on the same hypotheses, --split, --json,
--output, and one-line errors for runs that cannot be compared."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import corpus_config, error_line, one_thread

from mt.cli import main
from mt.config import Config, SourceConfig, load_config
from mt.errors import ConfigError
from mt.train.compare import (
    SIGNIFICANCE,
    Run,
    best_validation,
    compare,
    config_differences,
    paired_bootstrap,
    read_run,
    table,
    to_json,
)
from mt.train.trainer import train

# `corpus` and `prepared_dir` are conftest's, shared by the module (read only).


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus, prepared_dir) -> tuple[Path, Path]:
    """Two finished runs of `mt train`: a base config and a variant with another learning rate."""
    root = tmp_path_factory.mktemp("runs")
    base = corpus_config(root / "base", corpus)
    variant = root / "variant" / "exp.yaml"
    variant.parent.mkdir()
    variant.write_text(f"base: ../base/exp.yaml\ntrain: {{lr: 0.01, out_dir: {root / 'variant' / 'run'}}}\n")
    overrides = [f"data.prepared_dir={prepared_dir}", "train.max_steps=6", "train.valid_every=3"]
    with one_thread():
        for config in (base, variant):
            train(load_config(config, overrides))
    return root / "base" / "run", root / "variant" / "run"


def sacrebleu_paired_bs(references: Path, *hypotheses: Path) -> list[dict[str, tuple[float, ...]]]:
    """`sacrebleu REF -i SYS... -m bleu chrf --paired-bs`, its own process and code: per system
    {metric: (score, mean, ci[, p-value, significant])} from its table, printed with 6 decimals."""
    out = subprocess.run(
        [sys.executable, "-m", "sacrebleu", str(references), "-i", *map(str, hypotheses),
         "-m", "bleu", "chrf", "--paired-bs", "-f", "text", "-w", "6", "--no-color"],
        capture_output=True, text=True, check=True,
    ).stdout
    rows = [line for line in out.splitlines() if line.startswith("│")]
    systems: list[dict[str, tuple[float, ...]]] = []
    for row in rows[1:]:  # rows[0]: the header
        cells = [c.strip() for c in row.strip("│").split("│")]
        if cells[0]:  # a system's scores
            systems.append({})
            for name, cell in zip(("bleu", "chrf"), cells[1:], strict=True):
                systems[-1][name] = tuple(map(float, re.fullmatch(r"(\S+) \((\S+) ± (\S+)\)", cell).groups()))
        else:  # the line below: each metric's p-value, marked * when significant
            for name, cell in zip(("bleu", "chrf"), cells[1:], strict=True):
                p = re.fullmatch(r"\(p = (\S+)\)(\*?)", cell)
                systems[-1][name] += (float(p.group(1)), p.group(2) == "*")
    return systems


# --------------------------------------------------------------------------- the comparison


def test_the_table_shows_the_keys_that_differ_training_validation_and_test_scores(runs):
    a, b = runs
    c = compare([a, b])
    assert c.differences == {"train.lr": [0.003, 0.01], "train.out_dir": [str(a), str(b)]}
    text = table(c)
    lines = text.splitlines()
    assert lines[0].split() == ["run", str(a), str(b)]
    assert re.search(r"^  train\.lr +0\.003 +0\.01$", text, re.M)
    assert "model.d_model" not in text  # a key both runs share
    summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
    assert re.search(rf"^  steps +{summaries[0]['steps']} +{summaries[1]['steps']}$", text, re.M)
    for run, summary, test in zip(c.runs, summaries, c.tests, strict=True):
        # the translations mt train scored at its end: their scores as it recorded them
        assert test["bleu"].score == pytest.approx(summary["test"]["best_beam2"]["bleu"], abs=1e-9)
        assert test["chrf"].score == pytest.approx(summary["test"]["best_beam2"]["chrf"], abs=1e-9)
        valid = [json.loads(line) for line in (run.directory / "metrics.jsonl").read_text().splitlines()]
        bleu = max(r["valid_bleu"] for r in valid if r["kind"] == "valid")
        step = min(r["step"] for r in valid if r["kind"] == "valid" and r["valid_bleu"] == bleu)
        assert best_validation(run, "bleu") == (bleu, step)
    best = [f"{v:.2f} @ {s}" for v, s in (best_validation(r, "bleu") for r in c.runs)]
    assert re.search(rf"^  best BLEU +{best[0]} +{best[1]}$", text, re.M)
    bleu = c.tests[1]["bleu"]
    mark = "significant" if bleu.significant else "not significant"
    shown = f"{bleu.delta:+.2f}, p = {bleu.p_value:.4f}, {mark}"
    assert re.search(rf"^  BLEU vs first +baseline +{re.escape(shown)}$", text, re.M)
    assert bleu.delta == pytest.approx(c.tests[1]["bleu"].score - c.tests[0]["bleu"].score)
    assert "BLEU: nrefs:1|bs:1000|seed:12345|" in text


def test_the_significance_test_equals_sacrebleus_own_on_the_same_hypotheses(runs, prepared_dir):
    c = compare(list(runs))
    theirs = sacrebleu_paired_bs(prepared_dir / "test.tgt.txt", *(t.hypotheses_file for t in c.translations))
    assert len(theirs) == 2
    for ours, their in zip(c.tests, theirs, strict=True):
        for metric in ("bleu", "chrf"):
            s = ours[metric]
            assert their[metric][:3] == pytest.approx((s.score, s.mean, s.ci), abs=5e-7)
    for metric in ("bleu", "chrf"):
        p, significant = theirs[1][metric][3:]
        assert round(c.tests[1][metric].p_value, 4) == p
        assert c.tests[1][metric].significant == significant


def test_a_significant_difference_is_marked_as_sacrebleu_marks_it(tmp_path):
    refs = [f"the {w} dog runs in the park with a red ball" for w in ("big", "small", "old", "young")] * 25
    good = list(refs)
    good[::7] = ["a cat"] * len(good[::7])
    poor = [r.replace("dog", "cat").replace("park", "snow") for r in refs]
    files = {}
    for name, lines in (("refs", refs), ("good", good), ("poor", poor), ("same", good)):
        files[name] = tmp_path / f"{name}.txt"
        files[name].write_text("".join(line + "\n" for line in lines))
    tests, signatures = paired_bootstrap([("good", good), ("poor", poor), ("same", good)], refs)
    assert tests[1]["bleu"].significant is True and tests[1]["bleu"].p_value < SIGNIFICANCE
    assert tests[0]["bleu"].significant is None  # the baseline is not tested against itself
    theirs = sacrebleu_paired_bs(files["refs"], files["good"], files["poor"], files["same"])
    for metric in ("bleu", "chrf"):
        assert (round(tests[1][metric].p_value, 4), tests[1][metric].significant) == theirs[1][metric][3:]
        # The baseline's own translations: sacreBLEU calls them significantly different (its smallest
        # p-value, 1/1001); their difference is exactly 0, and so is not significant here.
        assert theirs[2][metric][3:] == (0.001, True)
        same = tests[2][metric]
        assert (same.delta, same.p_value, same.significant) == (0, 1.0, False)
    assert signatures["BLEU"].startswith("nrefs:1|bs:1000|seed:12345|")


def test_a_checkpoint_stands_for_its_own_translations_and_none_are_made_again(runs, tmp_path):
    a, b = runs
    copy = shutil.copytree(b, tmp_path / "b")
    for checkpoint in copy.glob("*.pt"):  # the recorded translations are all it needs
        checkpoint.unlink()
    c = compare([a / "checkpoint_best.pt", copy], beam=1)
    assert [t.hypotheses_file.name for t in c.translations] == ["checkpoint_best.test.beam1.hyp.txt"] * 2
    summary = json.loads((b / "summary.json").read_text())
    assert c.tests[1]["bleu"].score == pytest.approx(summary["test"]["best_beam1"]["bleu"], abs=1e-9)


def test_split_translates_each_checkpoint_now(runs, tmp_path):
    a, b = runs
    copies = [shutil.copytree(r, tmp_path / name) for r, name in ((a, "a"), (b, "b"))]
    c = compare(copies, split="valid")
    for run, t in zip(c.runs, c.translations, strict=True):
        written = json.loads((run.directory / "checkpoint_best.valid.beam2.json").read_text())
        assert t.hypotheses_file == run.directory / "checkpoint_best.valid.beam2.hyp.txt"
        assert written["bleu"] == pytest.approx(c.tests[c.runs.index(run)]["bleu"].score, abs=1e-9)
    assert c.split == "valid" and "valid (20 sentences)" in table(c)


def test_config_differences_are_the_keys_that_differ_and_only_those():
    one, two = Config(), Config()
    assert config_differences([one, two]) == {}
    only = SourceConfig(name="y", hub="h")
    one.data.sources = [SourceConfig(name="x", local_dir="d"), only]
    two.data.sources = [SourceConfig(name="x", local_dir="d", weight=2.0)]
    two.model.layers = 6
    assert config_differences([one, two]) == {
        "data.sources": [["x", "y"], ["x"]],
        "data.sources.x.weight": [1.0, 2.0],
        # a source only one run has: its settings, except those that are null anyway
        **{f"data.sources.y.{k}": [v, None] for k, v in vars(only).items() if v is not None},
        "model.layers": [3, 6],
    }


def test_best_validation_is_the_first_step_that_reached_the_best_value():
    valid = [
        {"step": 2, "valid_bleu": 5.0, "valid_loss": 3.0},
        {"step": 4, "valid_bleu": 7.0, "valid_loss": 2.5},
        {"step": 6, "valid_bleu": 7.0, "valid_loss": 2.7},
    ]
    run = Run("r", Path("r"), Path("r/checkpoint_best.pt"), Config(), {}, valid)
    assert best_validation(run, "bleu") == (7.0, 4)
    assert best_validation(run, "loss") == (2.5, 4)
    assert best_validation(run, "chrf") is None  # never measured: shown as "-"


# --------------------------------------------------------------------------- the command


def test_json_and_curves_through_the_cli(runs, tmp_path, capsys):
    a, b = runs
    assert main(["compare", str(a), str(b), "--json", "--output", str(tmp_path / "curves.png")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["baseline"] == str(a) and out["split"] == "test" and out["sentences"] == 20
    assert out["differences"]["train.lr"] == [0.003, 0.01]
    second = out["runs"][1]
    assert set(second["test"]["bleu"]) == {"score", "mean", "ci", "p_value", "delta", "significant"}
    assert second["best_valid"]["bleu"]["step"] in (3, 6)
    assert out["runs"][0]["test"]["bleu"]["p_value"] is None
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert main(["compare", str(a), str(b), "--output", str(tmp_path / "compare.html")]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("run ") and "BLEU vs first" in printed
    page = (tmp_path / "compare.html").read_text()
    assert page.count("<svg") == 1 and "<td>train.lr</td><td>0.003</td><td>0.01</td>" in page
    assert "<?xml" not in page


def _copy_run(run: Path, to: Path, prepared: Path | None = None) -> Path:
    """A copy of a run directory, reading its references from `prepared` when given."""
    copy = shutil.copytree(run, to)
    if prepared is not None:
        config = copy / "config.yaml"
        config.write_text(re.sub(r"prepared_dir: .*", f"prepared_dir: {prepared}", config.read_text()))
    return copy


def _other_references(prepared_dir: Path, to: Path, change) -> Path:
    copy = shutil.copytree(prepared_dir, to)
    refs = (copy / "test.tgt.txt").read_text().splitlines()
    (copy / "test.tgt.txt").write_text("".join(line + "\n" for line in change(refs)))
    return copy


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "{x}: no such run directory or checkpoint"),
        ("not a run", "{x}: not a run directory of `mt train` (no {x}/config.yaml)"),
        ("incomplete", "{x}: the run is incomplete (no {x}/summary.json: it is still training"),
        ("resumed", "{x}: the run is incomplete (it was resumed: {x}/metrics.jsonl goes to step 7, "
                    "{x}/summary.json ends at step 6)"),
        ("no test translations", "{x}: no test translations of checkpoint_best.pt with beam 2"),
        ("beam not scored", "no test translations of checkpoint_best.pt with beam 3"),
        ("different references", "{a} and {x} were scored on different references"),
        ("fewer references", "{x}: 20 translations in {x}/checkpoint_best.test.beam2.hyp.txt but 19 refer"),
        ("references changed", "{x}: {x}/checkpoint_best.test.beam2.hyp.txt was scored BLEU"),
        ("no references", "{x}: no prepared data at {p} to score against"),
        ("split not prepared", "{a}: no split 'nope' in {prepared}; its splits are train, valid, test"),
        ("split without text", "{a}: split 'train' of {prepared} keeps no raw text to score against"),
        ("torn metrics", "{x}: {x}/metrics.jsonl, line 2: not a JSON record"),
        ("resamples", "--resamples must be >= 1, got 0"),
        ("output", "--output {x}: name a .png, .svg, .pdf, .html file"),
    ],
)
def test_runs_that_cannot_be_compared_are_one_line_errors(runs, prepared_dir, tmp_path, capsys,
                                                          case, message):
    a, b = runs
    x = tmp_path / "x"
    args = [str(a), str(x)]
    if case == "not a run":
        x.mkdir()
    elif case == "incomplete":
        (_copy_run(b, x) / "summary.json").unlink()
    elif case == "resumed":  # a run that ended, resumed with a larger budget: still training
        with open(_copy_run(b, x) / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": 7, "epoch": 0, "kind": "train", "loss": 4.0}) + "\n")
    elif case == "no test translations":
        for f in _copy_run(b, x).glob("*.test.*"):
            f.unlink()
    elif case == "beam not scored":
        _copy_run(b, x)
        args.append("--beam=3")
    elif case == "different references":
        _copy_run(b, x, _other_references(prepared_dir, tmp_path / "p", lambda r: [s.upper() for s in r]))
    elif case == "fewer references":
        _copy_run(b, x, _other_references(prepared_dir, tmp_path / "p", lambda r: r[:-1]))
        args = [str(x)]
    elif case == "references changed":
        _copy_run(b, x, _other_references(prepared_dir, tmp_path / "p", lambda r: [s.upper() for s in r]))
        args = [str(x)]
    elif case == "no references":
        _copy_run(b, x, tmp_path / "p")
    elif case in ("split not prepared", "split without text"):
        args = [str(a), "--split", "nope" if case == "split not prepared" else "train"]
    elif case == "torn metrics":
        metrics = _copy_run(b, x) / "metrics.jsonl"
        lines = metrics.read_text().splitlines()
        metrics.write_text("\n".join([lines[0], lines[1][:10], *lines[2:]]) + "\n")
    elif case == "resamples":
        args.append("--resamples=0")
        _copy_run(b, x)
    elif case == "output":
        _copy_run(b, x)
        args = [str(a), "--output", str(x)]
    assert main(["compare", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    expected = message.format(a=a, x=x, p=tmp_path / "p", prepared=prepared_dir)
    assert expected in error_line(captured.err, "compare")


def test_a_config_that_mt_did_not_write_is_an_error(runs, tmp_path):
    copy = _copy_run(runs[0], tmp_path / "x")
    config = copy / "config.yaml"
    config.write_text(config.read_text().split("\n", 1)[1])  # without its first line
    with pytest.raises(ConfigError, match=re.escape(f"{config}: not a config written by mt")):
        read_run(copy)


def test_one_run_alone_is_the_baseline_and_its_json_round_trips(runs):
    assert json.loads(json.dumps(to_json(compare([runs[0]]))))["runs"][0]["test"]["bleu"]["p_value"] is None
