"""Experiment configs: the shipped ones load, overrides, and every mistake is one error line that
names the key, in `load_config` and through the CLI."""

import re
from pathlib import Path

import pytest
from helpers import REPO

from mt.cli import main
from mt.config import (
    Config,
    SourceConfig,
    load_config,
    load_saved_config,
    parse_override,
    save_config,
    to_dict,
)
from mt.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return p


def test_shipped_configs_load():
    shipped = ("multi30k_de_en", "multi30k_de_en_dropout", "iwslt2017_de_en", "iwslt14_de_en", "wmt14_en_de")
    for name in (*shipped, "tiny"):
        cfg = load_config(REPO / "configs" / f"{name}.yaml")
        assert cfg.name == name
    wmt = load_config(REPO / "configs" / "wmt14_en_de.yaml")  # Transformer base, shared 32k vocabulary
    m = wmt.model
    assert (m.layers, m.decoder_layers or m.layers, m.d_model, m.heads, m.ffn_dim) == (6, 6, 512, 8, 2048)
    assert (wmt.data.vocab_size, wmt.data.joint_vocab, m.tie_embeddings) == (32000, True, True)
    iwslt14 = load_config(REPO / "configs" / "iwslt14_de_en.yaml")  # fairseq's transformer_iwslt_de_en
    m = iwslt14.model
    assert (m.layers, m.d_model, m.heads, m.ffn_dim, m.dropout) == (6, 512, 4, 1024, 0.3)
    iwslt = load_config(REPO / "configs" / "iwslt2017_de_en.yaml")
    assert (iwslt.model.layers, iwslt.model.d_model, iwslt.model.heads, iwslt.model.ffn_dim) == (
        6,
        512,
        4,
        1024,
    )
    assert iwslt.model.dropout == 0.3 and iwslt.train.max_tokens == 4096


def test_configs_begin_with_their_command():
    for p in (REPO / "configs").glob("*.yaml"):
        head = p.read_text().splitlines()[:4]
        assert head[0].startswith("#") and any("Run:" in line for line in head), p


def test_defaults_and_overrides(tmp_path):
    p = write(tmp_path, "data:\n  local_dir: x\ntrain:\n  lr: 1.0e-3\n")
    cfg = load_config(p, ["train.lr=5e-4", "model.layers=4", "model.pre_norm=false", "data.hub=foo/bar"])
    assert cfg.train.lr == 5e-4
    assert cfg.model.layers == 4
    assert cfg.model.pre_norm is False
    assert cfg.data.hub == "foo/bar"
    assert cfg.train.warmup_steps == Config().train.warmup_steps  # untouched default
    assert cfg.prepared_dir == Path("data/prepared/exp") and cfg.out_dir == Path("runs/exp")


def test_int_widens_to_float_and_dicts(tmp_path):
    p = write(tmp_path, "data:\n  local_dir: x\n  local_splits: {train: tr, valid: va}\ntrain:\n  lr: 1\n")
    cfg = load_config(p)
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.data.local_splits == {"train": "tr", "valid": "va"}


@pytest.mark.parametrize(
    "text, override, message",
    [
        ("train:\n  lrr: 1\n", None, "unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
        ("trian:\n  lr: 1\n", None, "unknown config section 'trian' (did you mean 'train'?)"),
        ("", "model.layer=2", "did you mean 'model.layers'"),
        ("", "model.layers=two", "model.layers: 'two' is not a valid value; expected int"),
        ("", "model.pre_norm=3", "expected bool"),
        ("", "train.precision=fp8", "expected one of 'auto', 'fp32', 'bf16', 'fp16'"),
        ("", "train.betas=0.9", "train.betas"),
        ("", "lr=1", "must be section.key"),
        ("", "train.lr", "not of the form section.key=value"),
        ("model: [1, 2]\n", None, "section 'model' must be a mapping"),
        ("", "model.dropout=-0.1", "model.dropout: must be in [0, 1)"),
        ("", "decode.beam=0", "decode.beam: must be >= 1"),
        ("", "train.warmup_steps=-5", "train.warmup_steps: must be >= 0"),
        ("", "train.max_tokens=50", "smaller than the longest allowed sentence"),
        ("", "model.heads=3", "not divisible"),
        ("", "train.pad_to_multiple=-8", "train.pad_to_multiple: must be >= 0, got -8"),
        # data.max_len 200 + 1, padded to 64: 256 tokens are the widest batch
        ("train:\n  max_tokens: 250\n", "train.pad_to_multiple=64",
         "train.max_tokens: 250 is smaller than the widest padded batch (256: data.max_len 200 + 1, "
         "rounded up to train.pad_to_multiple 64)"),
    ],
)
def test_errors_name_the_key(tmp_path, text, override, message):
    p = write(tmp_path, "data:\n  local_dir: x\n" + text)
    with pytest.raises(ConfigError) as e:
        load_config(p, [override] if override else [])
    assert message in str(e.value)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = write(tmp_path, "data: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = write(tmp_path, "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(listy)


@pytest.mark.parametrize(
    "text, where",
    [
        ("data:\n  local_dir: x\ntrain:\n  lr: 0.1\n  warmup_steps: 3\n  lr: 0.2\n",
         "line 6, column 3: duplicate key 'lr' (first given on line 4)"),
        ("train:\n  lr: 0.1\ndata: {local_dir: x}\ntrain:\n  max_steps: 3\n",
         "line 4, column 1: duplicate key 'train' (first given on line 1)"),
        ("data: {local_dir: x, local_dir: y}\n", "line 1, column 22: duplicate key 'local_dir'"),
    ],
    ids=["key of a section", "section", "in a flow mapping"],
)
def test_a_key_given_twice_is_an_error_naming_file_line_and_key(tmp_path, text, where):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value).startswith(f"{p}: ") and where in str(e.value)


def test_merge_keys_may_still_be_overridden(tmp_path):
    p = write(tmp_path, "data:\n  local_dir: x\n  <<: {max_len: 50}\ntrain: {<<: {lr: 0.1}, lr: 0.2}\n")
    cfg = load_config(p)
    assert cfg.data.max_len == 50 and cfg.train.lr == 0.2


def test_saved_config_reloads_identically(tmp_path):
    p = write(tmp_path, "data:\n  local_dir: x\n")
    cfg = load_config(p, ["train.lr=7e-4", "model.activation=gelu"])
    out = tmp_path / "configs" / "exp.yaml"
    out.parent.mkdir()
    save_config(cfg, out)
    again = load_config(out)
    assert to_dict(again) == to_dict(cfg)


def test_parse_override_reads_yaml_scalars():
    assert parse_override("train.betas=[0.9, 0.99]") == ("train", "betas", [0.9, 0.99])
    assert parse_override("data.hub=null") == ("data", "hub", None)
    assert parse_override("data.src_lang=de") == ("data", "src_lang", "de")
    with pytest.raises(ConfigError, match="duplicate key 'a'"):
        parse_override("data.local_splits={a: b, a: c}")


# --------------------------------------------------------------------------- via the CLI


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("train:\n  lrr: 0.1\n", [], "unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
        ("", ["train.warmup_step=10"], "'train.warmup_step' (did you mean 'train.warmup_steps'?)"),
        ("trian:\n  lr: 0.1\n", [], "unknown config section 'trian' (did you mean 'train'?)"),
        ("", ["decod.beam=2"], "unknown config section 'decod' (did you mean 'decode'?)"),
        ("", ["model.layers=two"], "model.layers: 'two' is not a valid value; expected int"),
        ("model:\n  dropout: high\n", [], "model.dropout: 'high' is not a valid value; expected float"),
        ("", ["train.valid_bleu=maybe"], "train.valid_bleu: 'maybe' is not a valid value; expected bool"),
        ("", ["model.dropout=-0.1"], "model.dropout: must be in [0, 1), got -0.1"),
        ("", ["decode.beam=0"], "decode.beam: must be >= 1, got 0"),
        ("", ["train.warmup_steps=-1"], "train.warmup_steps: must be >= 0, got -1"),
        ("", ["train.max_tokens=40"], "train.max_tokens: 40 is smaller than the longest allowed sentence"),
        ("train: {lr: [1, 2\n", [], "not valid YAML"),
        ("data:\n\tlocal_dir: x\n", [], "not valid YAML"),
        ("", ["train.betas=[0.9"], "override 'train.betas=[0.9': cannot parse value"),
        ("- 1\n- 2\n", None, "expected a mapping with sections"),
        ("model: 3\n", [], "section 'model' must be a mapping"),
    ],
)
@pytest.mark.parametrize("cmd", ["prepare", "train"])
def test_bad_config_is_one_line_via_the_cli(tmp_path, capsys, cmd, text, overrides, message):
    path = tmp_path / "exp.yaml"
    path.write_text(text if overrides is None else "data:\n  local_dir: x\n  max_len: 64\n" + text)
    assert main([cmd, str(path), *(overrides or [])]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith(f"mt {cmd}: error: "), err
    assert message in err


def test_missing_or_undecodable_config_via_the_cli(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err == f"mt train: error: config file not found: {tmp_path / 'nope.yaml'}\n"
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"data:\n  local_dir: caf\xe9\n")
    assert main(["prepare", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "latin1.yaml: not valid YAML" in err


# --------------------------------------------------------------------------- several sources


SOURCES = (
    "data:\n  sources:\n    - {name: a, local_dir: x, weight: 2}\n"
    "    - {name: b, hub: org/set, hub_revision: r}\n"
)


def test_sources_are_a_list_of_source_sections_that_save_and_reload(tmp_path):
    cfg = load_config(write(tmp_path, SOURCES + "  eval_source: b\n"))
    a, b = cfg.data.sources
    assert (a.name, a.local_dir, a.weight, a.local_splits) == ("a", "x", 2.0, SourceConfig().local_splits)
    assert (b.hub, b.hub_revision, b.weight) == ("org/set", "r", 1.0) and cfg.data.eval_source == "b"
    out = tmp_path / "saved" / "exp.yaml"
    out.parent.mkdir()
    save_config(cfg, out)
    assert to_dict(load_config(out)) == to_dict(cfg)


@pytest.mark.parametrize(
    "text, override, message",
    [
        ("", "data.sources=[{name: a, local_dirr: x}]",
         "data.sources[0]: unknown key 'local_dirr' (did you mean 'local_dir'?)"),
        ("", "data.sources=3", "data.sources: 3 is not a valid value; expected a list of mappings"),
        ("", "data.sources=[x]", "data.sources[0]: 'x' is not a valid value; expected a mapping"),
        ("", "data.sources=[{name: a, local_dir: x, weight: heavy}]",
         "data.sources[0].weight: 'heavy' is not a valid value; expected float"),
        ("", "data.sources=[{name: a, local_dir: x}, {name: a, hub: y}]",
         "data.sources[1].name: 'a' is given twice"),
        ("", "data.sources=[{local_dir: x}]", "data.sources[0].name: '': letters, digits"),
        ("", "data.sources=[{name: a}]", "data.sources[0]: set local_dir or hub"),
        ("", "data.sources=[{name: a, local_dir: x, weight: 0}]",
         "data.sources[0].weight: must be finite and > 0"),
        ("", "data.sources=[{name: a, local_dir: x}, {name: b, local_dir: x, weight: .inf}]",
         "data.sources[1].weight: must be finite and > 0, got inf"),
        ("", "data.sources=[{name: a, local_dir: x, weight: .nan}]",
         "data.sources[0].weight: must be finite"),
        ("", "data.sources=[{name: a, local_dir: x, local_splits: {valid: v}, hub_splits: {}}]",
         "data.sources: no source has a 'train' split"),
        ("  eval_source: c\n", None, "data.eval_source: 'c' is not a source; sources are a, b"),
        ("  local_dir: y\n", None, "data.local_dir: not used with data.sources"),
        ("  max_train_pairs: 9\n", None,
         "data.max_train_pairs: not used with data.sources; give it per source"),
    ],
)
def test_source_mistakes_name_the_source_and_key(tmp_path, text, override, message):
    p = write(tmp_path, (SOURCES + text) if override is None else "data:\n  local_dir: x\n")
    overrides = [] if override is None else ["data.local_dir=null", override]
    with pytest.raises(ConfigError) as e:
        load_config(p, overrides)
    assert message in str(e.value)


def test_an_eval_source_needs_sources(tmp_path):
    with pytest.raises(ConfigError, match="data.eval_source: names one of data.sources, and there are none"):
        load_config(write(tmp_path, "data:\n  local_dir: x\n  eval_source: a\n"))


# --------------------------------------------------------------------------- configs that extend others


def write_at(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_the_shipped_variant_differs_from_the_default_in_dropout_only():
    default = to_dict(load_config(REPO / "configs" / "multi30k_de_en.yaml"))
    variant = to_dict(load_config(REPO / "configs" / "multi30k_de_en_dropout.yaml"))
    assert variant["model"].pop("dropout") == 0.3 and default["model"].pop("dropout") == 0.1
    assert variant == default


def test_a_variant_replaces_its_base_keys_and_overrides_come_last(tmp_path):
    write_at(tmp_path / "base.yaml", "data:\n  local_dir: x\n  local_splits: {train: tr, valid: va}\n"
             "model: {layers: 2, d_model: 64}\ntrain: {lr: 1.0e-3, max_steps: 10}\n")
    variant = write_at(tmp_path / "variant.yaml", "base: base.yaml\ndata:\n  local_splits: {train: t}\n"
                       "train: {lr: 2.0e-3}\n")
    cfg = load_config(variant, ["model.layers=5"])
    assert cfg.name == "variant"  # the variant's name: its own runs/ and data/prepared/ directories
    assert (cfg.train.lr, cfg.train.max_steps) == (2e-3, 10)  # the variant's key, the base's key
    assert (cfg.model.layers, cfg.model.d_model) == (5, 64)  # the command line over the base
    assert cfg.data.local_splits == {"train": "t"}  # a mapping is replaced as a whole
    assert load_config(variant, ["train.lr=3e-3"]).train.lr == 3e-3  # the command line over the variant


def test_bases_chain_with_paths_relative_to_each_file(tmp_path, monkeypatch):
    write_at(tmp_path / "common" / "root.yaml", "data: {local_dir: x}\nmodel: {layers: 2, heads: 2}\n")
    write_at(tmp_path / "parent.yaml", "base: common/root.yaml\nmodel: {layers: 3}\ntrain: {lr: 0.1}\n")
    child = write_at(tmp_path / "exp" / "child.yaml", "base: ../parent.yaml\ntrain: {lr: 0.2}\n")
    monkeypatch.chdir(tmp_path / "common")  # not relative to the working directory
    cfg = load_config(child)
    assert (cfg.model.layers, cfg.model.heads, cfg.train.lr, cfg.data.local_dir) == (3, 2, 0.2, "x")


def test_a_cycle_of_bases_is_one_error_naming_the_files(tmp_path):
    a = write_at(tmp_path / "a.yaml", "base: b.yaml\ndata: {local_dir: x}\n")
    write_at(tmp_path / "b.yaml", "base: sub/../a.yaml\n")
    with pytest.raises(ConfigError) as e:
        load_config(a)
    b = tmp_path / "b.yaml"
    assert str(e.value) == f"{b}: base: config files extend each other in a cycle: {a} -> {b} -> {a}"
    itself = write_at(tmp_path / "self.yaml", "base: self.yaml\n")
    with pytest.raises(ConfigError) as e:
        load_config(itself)
    assert str(e.value) == f"{itself}: base: config files extend each other in a cycle: {itself} -> {itself}"


def test_a_missing_base_is_one_error_naming_both_files(tmp_path):
    variant = write_at(tmp_path / "v.yaml", "base: ../nope.yaml\n")
    with pytest.raises(ConfigError) as e:
        load_config(variant)
    assert str(e.value) == f"{variant}: base: config file not found: {tmp_path.parent / 'nope.yaml'}"


@pytest.mark.parametrize("value", ["3", "[a.yaml]", "''"])
def test_a_base_that_is_not_a_path_is_an_error(tmp_path, value):
    variant = write_at(tmp_path / "v.yaml", f"base: {value}\ndata: {{local_dir: x}}\n")
    with pytest.raises(ConfigError) as e:
        load_config(variant)
    assert str(e.value).startswith(f"{variant}: base: ")
    assert "expected the path of the config file it extends" in str(e.value)


def test_a_mistake_in_a_base_names_the_base(tmp_path):
    base = write_at(tmp_path / "base.yaml", "data: {local_dir: x}\ntrain: {lrr: 1}\n")
    variant = write_at(tmp_path / "v.yaml", "base: base.yaml\n")
    with pytest.raises(ConfigError, match=re.escape(f"{base}: unknown config key 'train.lrr'")):
        load_config(variant)
    write_at(tmp_path / "base.yaml", "data: [\n")
    with pytest.raises(ConfigError, match=re.escape(f"{base}: not valid YAML")):
        load_config(variant)
    write_at(tmp_path / "base.yaml", "data: {local_dir: x}\n")
    write_at(tmp_path / "v.yaml", "base: base.yaml\nmodel: {layers: many}\n")
    with pytest.raises(ConfigError, match=re.escape(f"{variant}: model.layers: 'many' is not")):
        load_config(variant)


def test_the_written_config_of_a_variant_equals_its_flat_equivalent(tmp_path):
    write_at(tmp_path / "v" / "base.yaml", "data: {local_dir: x, vocab_size: 500}\nmodel: {layers: 2}\n")
    variant = write_at(tmp_path / "v" / "exp.yaml", "base: base.yaml\nmodel: {dropout: 0.3}\n")
    flat = write_at(tmp_path / "flat" / "exp.yaml",
                    "data: {local_dir: x, vocab_size: 500}\nmodel: {layers: 2, dropout: 0.3}\n")
    save_config(load_config(variant, ["train.lr=1e-3"]), tmp_path / "variant.yaml")
    save_config(load_config(flat, ["train.lr=1e-3"]), tmp_path / "flat.yaml")
    written = (tmp_path / "variant.yaml").read_text()
    assert written == (tmp_path / "flat.yaml").read_text()
    assert "base" not in written and written.startswith("# resolved config of 'exp'\n")
    assert load_saved_config(tmp_path / "variant.yaml").name == "exp"  # the name as written


def test_a_base_cycle_via_the_cli_is_one_line(tmp_path, capsys):
    a = write_at(tmp_path / "a.yaml", "base: a.yaml\n")
    assert main(["prepare", str(a)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"mt prepare: error: {a}: base: ") and "cycle" in err
