"""Experiment configuration: one dataclass per section, loaded from YAML.

An experiment is a YAML file with the sections `data`, `model`, `train` and
`decode`. Every field has a type and a default here, and only here. A file may
extend another with a top-level `base: other.yaml` (a path relative to the file)
and give only the keys that change; bases may have bases. Command-line overrides
use dotted paths (`train.lr=5e-4`), applied last; their values are parsed as YAML
scalars. Unknown keys and wrongly typed values are errors that name the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Hashable
from dataclasses import dataclass, field
from os.path import normpath
from pathlib import Path
from typing import Any, Literal

import yaml

from mt.errors import ConfigError
from mt.files import AtomicFile

Precision = Literal["auto", "fp32", "bf16", "fp16"]


# Our split name -> file stem in a local directory, and -> split name on the hub.
LOCAL_SPLITS = {"train": "train", "valid": "valid", "test": "test"}
HUB_SPLITS = {"train": "train", "valid": "validation", "test": "test"}


@dataclass
class SourceConfig:
    """One corpus of `data.sources`: where it is (its keys mean what the single-source keys of
    DataConfig mean) and how often an epoch sees each of its training pairs."""

    name: str = ""  # required: names the source in data.eval_source, the summary and errors
    local_dir: str | None = None
    local_splits: dict[str, str] = field(default_factory=lambda: dict(LOCAL_SPLITS))
    hub: str | None = None
    hub_config: str | None = None
    hub_revision: str | None = None
    hub_data_dir: str | None = None
    hub_splits: dict[str, str] = field(default_factory=lambda: dict(HUB_SPLITS))
    max_train_pairs: int = 0
    # Each epoch holds every training pair of this source int(weight) times, plus a fresh
    # random share of the fraction (seeded by train.seed and the epoch): 2 up-samples, 0.5
    # shows half of it per epoch. It changes the mixture, not the prepared cache.
    weight: float = 1.0


@dataclass
class DataConfig:
    src_lang: str = "de"
    tgt_lang: str = "en"
    # One corpus, given by the keys below (local_dir ... max_train_pairs), or several in
    # `sources`, which then replaces them.
    # Local parallel text: `{local_dir}/{stem}.{lang}` or `.gz`, one sentence per line.
    # Used when the directory exists; otherwise the hub data set below is loaded.
    local_dir: str | None = None
    # Our split name -> file stem in local_dir (e.g. valid: val).
    local_splits: dict[str, str] = field(default_factory=lambda: dict(LOCAL_SPLITS))
    # Hugging Face hub data set (or a local directory laid out like one); rows have a
    # `translation` column ({lang: text}) or one column per language.
    hub: str | None = None
    hub_config: str | None = None
    # A branch, tag or commit of the hub repository: `refs/convert/parquet` is the hub's
    # parquet conversion, which `datasets` 5 can read where the main branch needs a loading
    # script. The conversion has one folder per config, chosen with hub_data_dir
    # (e.g. iwslt2017-de-en), and no config names (leave hub_config empty).
    hub_revision: str | None = None
    hub_data_dir: str | None = None
    # Our split name -> hub split name.
    hub_splits: dict[str, str] = field(default_factory=lambda: dict(HUB_SPLITS))
    # Use only the first N training pairs (0 = all); for tests and quick experiments.
    max_train_pairs: int = 0
    # Several corpora, each cleaned and counted on its own and mixed by weight in every epoch.
    sources: list[SourceConfig] = field(default_factory=list)
    # The source whose other splits (valid, test, ...) are prepared; empty = the first one.
    eval_source: str = ""
    # Where the encoded corpus is cached; empty means data/prepared/<config name>.
    prepared_dir: str = ""
    # Cleaning, training split only: pairs longer than this many subword tokens on
    # either side, or whose token-length ratio exceeds max_ratio, are dropped.
    max_len: int = 200
    max_ratio: float = 3.0
    # SentencePiece, trained on at most spm_max_sentences sentences sampled from the training
    # pairs of all sources (with a fixed seed). It holds the sample: for sentences of ~140
    # characters about 3 GB per million with unigram, about 0.5 GB with bpe.
    spm_type: Literal["unigram", "bpe"] = "unigram"
    joint_vocab: bool = True
    vocab_size: int = 8000
    character_coverage: float = 1.0
    spm_max_sentences: int = 1_000_000
    num_proc: int = 2


@dataclass
class ModelConfig:
    d_model: int = 256
    heads: int = 4
    ffn_dim: int = 1024
    layers: int = 3  # encoder layers
    decoder_layers: int = 0  # 0 = same as layers
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    activation: Literal["relu", "gelu"] = "relu"
    pre_norm: bool = True
    learned_positions: bool = False
    tie_embeddings: bool = True
    max_positions: int = 1024


@dataclass
class TrainConfig:
    seed: int = 1
    lr: float = 5e-4
    schedule: Literal["inverse_sqrt", "noam"] = "inverse_sqrt"
    warmup_steps: int = 4000
    warmup_init_lr: float = 1e-7
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: float = 0.0  # 0 = no clipping
    label_smoothing: float = 0.1
    max_tokens: int = 4096  # per batch, max(src, tgt) tokens including padding
    accum_steps: int = 1
    max_steps: int = 0  # 0 = no limit
    max_epochs: int = 0  # 0 = no limit
    max_minutes: float = 0.0  # 0 = no limit
    valid_every: int = 1000  # steps; validation also runs at each epoch end
    valid_bleu: bool = True  # greedy-decode the validation split for BLEU/chrF
    best_metric: Literal["bleu", "chrf", "loss"] = "bleu"
    patience: int = 0  # validations without improvement before stopping; 0 = never
    keep_last: int = 0  # keep this many step checkpoints for averaging
    log_every: int = 50
    device: str = "auto"  # auto, cpu, cuda, cuda:1, ...
    precision: Precision = "auto"
    threads: int = 0  # CPU threads for torch; 0 = torch's default
    # torch.compile the model and the loss. Give it pad_to_multiple too: with it, every batch
    # shape is static and compiled once (dynamic=False); without, shapes are dynamic.
    compile: bool = False
    # 0 = a training batch is as wide as its longest pair. N > 0: source and target are padded
    # to one width, a multiple of N, and the rows to max_tokens // width (filler rows carry no
    # loss); the batcher counts pairs at that padded size. Batches then take at most
    # ceil((data.max_len + 1) / N) shapes, which train.compile compiles once each and never
    # again in steady state; the price is the padding (N = 8 pads little, 32 gives few shapes).
    pad_to_multiple: int = 0
    # Fine-tuning: start from this checkpoint's weights (a fresh optimizer and schedule), with
    # the data prepared by its SentencePiece models. The model config must match its shapes.
    init_from: str = ""
    # TensorBoard under <out_dir>/tensorboard: the logged metrics as scalars, and the
    # cross-attention of the first validation sentences as images (the `tensorboard` extra).
    tensorboard: bool = False
    out_dir: str = ""  # empty means runs/<config name>


@dataclass
class DecodeConfig:
    beam: int = 5
    nbest: int = 1
    max_len_a: float = 1.2  # max output length = a * src_len + b
    max_len_b: int = 10
    min_len: int = 1
    # fairseq: score / len**alpha;  gnmt: score / ((5 + len) / 6)**alpha.
    length_penalty: Literal["fairseq", "gnmt"] = "fairseq"
    alpha: float = 1.0
    max_tokens: int = 4096  # source tokens per translation batch
    # Weights and activations when translating (training validation always uses the
    # training model). bf16: 1.2-1.5x faster on CPUs with AVX512-BF16 or AMX and on GPUs,
    # within 0.2 BLEU here (bench_decode.py), but about 5x slower on CPUs that emulate it
    # (it warns there); fp16: GPU only. auto: bf16 where it is native, else fp32.
    precision: Precision = "fp32"
    # CPU: batches translated at once, each on its own thread (CTranslate2's inter_threads);
    # torch's threads are shared out among them (more than torch's threads oversubscribe
    # the cores). 0 = one per torch thread.
    inter_threads: int = 0


def resolve_decoding(
    decode: DecodeConfig, beam: int | None = None, nbest: int = 1, max_tokens: int | None = None
) -> DecodeConfig:
    """`decode` with the options of one call (a command line, a request) applied: the complete
    decoding setting that everything below the edges takes as it is. `beam` None keeps
    decode.beam, raised to `nbest` if it is smaller; `max_tokens` None keeps decode.max_tokens.
    An explicit beam smaller than nbest is an error, not silently widened."""
    for name, value in (("beam", beam), ("nbest", nbest), ("max_tokens", max_tokens)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if beam is None:
        beam = max(decode.beam, nbest)
    elif nbest > beam:
        raise ConfigError(f"nbest ({nbest}) cannot exceed beam ({beam})")
    return dataclasses.replace(
        decode, beam=beam, nbest=nbest, max_tokens=decode.max_tokens if max_tokens is None else max_tokens
    )


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    # Not a YAML key: the experiment's name, taken from the config file's stem.
    # Relative paths in a config are relative to the working directory.
    name: str = "experiment"

    @property
    def prepared_dir(self) -> Path:
        return Path(self.data.prepared_dir or f"data/prepared/{self.name}")

    @property
    def out_dir(self) -> Path:
        return Path(self.train.out_dir or f"runs/{self.name}")


SECTIONS = ("data", "model", "train", "decode")


# --------------------------------------------------------------------------- types


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
        return "a list of mappings"
    if origin in (list, dict):
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key}: {value!r} is not a valid value; expected {_type_name(tp)}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin in (types.UnionType, typing.Union):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise bad
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise bad
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise bad
        return {_coerce(k, kt, key): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: {value!r} is not a valid value; expected a mapping of keys to values")
        obj = tp()
        hints = typing.get_type_hints(tp)
        for k, v in value.items():
            if k not in hints:
                raise ConfigError(f"{key}: unknown key '{k}'{_suggest(str(k), list(hints))}")
            setattr(obj, k, _coerce(v, hints[k], f"{key}.{k}"))
        return obj
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _all_keys() -> list[str]:
    keys = []
    for section in SECTIONS:
        cls = type(getattr(Config(), section))
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(cls)]
    return keys


def _set(cfg: Config, section: str, key: str, value: Any, where: str) -> None:
    full = f"{section}.{key}"
    if section not in SECTIONS:
        raise ConfigError(
            f"{where}unknown config section '{section}'{_suggest(section, list(SECTIONS))}; "
            f"sections are {', '.join(SECTIONS)}"
        )
    obj = getattr(cfg, section)
    hints = typing.get_type_hints(type(obj))
    if key not in hints:
        raise ConfigError(f"{where}unknown config key '{full}'{_suggest(full, _all_keys())}")
    setattr(obj, key, _coerce(value, hints[key], f"{where}{full}"))


# --------------------------------------------------------------------------- validation


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


SOURCE_NAME = re.compile(r"[A-Za-z0-9_-]+")


def _validate_sources(d: DataConfig) -> None:
    """data.sources replaces the single-source keys; each source is complete on its own."""
    single = {k: getattr(d, k) for k in ("local_dir", "hub", "hub_config", "hub_revision", "hub_data_dir")}
    for k, v in single.items():
        _check(v is None, f"data.{k}", "not used with data.sources; give it in a source instead")
    _check(d.max_train_pairs == 0, "data.max_train_pairs", "not used with data.sources; give it per source")
    names = []
    for i, s in enumerate(d.sources):
        key = f"data.sources[{i}]"
        _check(bool(SOURCE_NAME.fullmatch(s.name)), f"{key}.name", f"{s.name!r}: letters, digits, - or _")
        _check(s.name not in names, f"{key}.name", f"'{s.name}' is given twice")
        names.append(s.name)
        _check(s.local_dir is not None or s.hub is not None, key, "set local_dir or hub")
        # inf would pass `> 0` and then end training (an epoch cannot show a pair inf times).
        finite = math.isfinite(s.weight) and s.weight > 0
        _check(finite, f"{key}.weight", f"must be finite and > 0, got {s.weight}")
        _check(s.max_train_pairs >= 0, f"{key}.max_train_pairs", "must be >= 0")
    _check(
        any("train" in s.local_splits or "train" in s.hub_splits for s in d.sources),
        "data.sources",
        "no source has a 'train' split",
    )
    _check(
        not d.eval_source or d.eval_source in names,
        "data.eval_source",
        f"'{d.eval_source}' is not a source; sources are {', '.join(names)}",
    )


def validate(cfg: Config) -> None:
    """Range checks that types alone cannot express."""
    d, m, t, dec = cfg.data, cfg.model, cfg.train, cfg.decode
    _check(bool(d.src_lang) and bool(d.tgt_lang), "data.src_lang", "languages must be set")
    _check(d.src_lang != d.tgt_lang, "data.tgt_lang", "must differ from data.src_lang")
    if d.sources:
        _validate_sources(d)
    else:
        _check(d.local_dir is not None or d.hub is not None, "data", "set data.local_dir or data.hub")
        _check("train" in d.local_splits or "train" in d.hub_splits, "data", "no 'train' split")
        _check(not d.eval_source, "data.eval_source", "names one of data.sources, and there are none")
    _check(d.max_train_pairs >= 0, "data.max_train_pairs", "must be >= 0")
    _check(d.max_len >= 1, "data.max_len", f"must be >= 1, got {d.max_len}")
    _check(d.max_ratio >= 1.0, "data.max_ratio", f"must be >= 1, got {d.max_ratio}")
    _check(d.vocab_size >= 16, "data.vocab_size", f"must be >= 16, got {d.vocab_size}")
    _check(0 < d.character_coverage <= 1, "data.character_coverage", "must be in (0, 1]")
    _check(d.spm_max_sentences > 100, "data.spm_max_sentences", "must be > 100 (SentencePiece's minimum)")
    _check(d.num_proc >= 1, "data.num_proc", "must be >= 1")

    _check(m.d_model >= 1, "model.d_model", "must be >= 1")
    _check(m.heads >= 1, "model.heads", "must be >= 1")
    _check(m.d_model % m.heads == 0, "model.heads", f"d_model {m.d_model} is not divisible by {m.heads}")
    _check(m.ffn_dim >= 1, "model.ffn_dim", "must be >= 1")
    _check(m.layers >= 1, "model.layers", "must be >= 1")
    _check(m.decoder_layers >= 0, "model.decoder_layers", "must be >= 0")
    for k in ("dropout", "attention_dropout", "activation_dropout"):
        v = getattr(m, k)
        _check(0.0 <= v < 1.0, f"model.{k}", f"must be in [0, 1), got {v}")
    _check(m.max_positions > d.max_len, "model.max_positions", f"must exceed data.max_len ({d.max_len})")

    _check(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    _check(t.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
    _check(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas", "two values in [0, 1)")
    _check(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    _check(t.clip_norm >= 0, "train.clip_norm", "must be >= 0")
    _check(0 <= t.label_smoothing < 1, "train.label_smoothing", "must be in [0, 1)")
    _check(
        t.max_tokens >= d.max_len + 1,
        "train.max_tokens",
        f"{t.max_tokens} is smaller than the longest allowed sentence "
        f"(data.max_len {d.max_len} + 1 for end-of-sentence)",
    )
    _check(t.accum_steps >= 1, "train.accum_steps", "must be >= 1")
    _check(t.pad_to_multiple >= 0, "train.pad_to_multiple", f"must be >= 0, got {t.pad_to_multiple}")
    if t.pad_to_multiple:
        widest = -(-(d.max_len + 1) // t.pad_to_multiple) * t.pad_to_multiple
        _check(
            t.max_tokens >= widest,
            "train.max_tokens",
            f"{t.max_tokens} is smaller than the widest padded batch ({widest}: data.max_len "
            f"{d.max_len} + 1, rounded up to train.pad_to_multiple {t.pad_to_multiple})",
        )
    for k in ("max_steps", "max_epochs", "valid_every", "patience", "keep_last", "threads"):
        _check(getattr(t, k) >= 0, f"train.{k}", "must be >= 0")
    _check(t.max_minutes >= 0, "train.max_minutes", "must be >= 0")
    _check(t.log_every >= 1, "train.log_every", "must be >= 1")

    _check(dec.beam >= 1, "decode.beam", f"must be >= 1, got {dec.beam}")
    _check(1 <= dec.nbest <= dec.beam, "decode.nbest", f"must be in [1, beam={dec.beam}]")
    _check(dec.max_len_a >= 0 and dec.max_len_b >= 0, "decode.max_len_a", "must be >= 0")
    _check(dec.min_len >= 0, "decode.min_len", "must be >= 0")
    _check(dec.alpha >= 0, "decode.alpha", "must be >= 0")
    _check(dec.max_tokens >= 1, "decode.max_tokens", "must be >= 1")
    _check(dec.inter_threads >= 0, "decode.inter_threads", "must be >= 0")


# --------------------------------------------------------------------------- loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader, except that a key given twice in one mapping is an error: PyYAML keeps
    the last value, so an edit made to the first of two `train:` sections would do nothing."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):  # the base class reports it
                continue
            if key in first:
                line = first[key].start_mark.line + 1
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}' (first given on line {line})", key_node.start_mark
                )
            first[key] = key_node
        return super().construct_mapping(node, deep)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error on one line: where, and what is wrong."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + " ".join(str(problem or e).split())


def parse_override(arg: str) -> tuple[str, str, Any]:
    """'train.lr=5e-4' -> ('train', 'lr', 0.0005). The value is read as a YAML scalar."""
    if "=" not in arg:
        raise ConfigError(f"override '{arg}' is not of the form section.key=value")
    path, raw = arg.split("=", 1)
    if path.count(".") != 1:
        raise ConfigError(f"override '{arg}': key must be section.key, e.g. train.lr=5e-4")
    section, key = path.split(".")
    try:
        value = _load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{arg}': cannot parse value: {_yaml_problem(e)}") from None
    return section, key, value


def _apply(cfg: Config, raw: dict[str, Any], where: str) -> None:
    """Set the keys of one YAML mapping on `cfg`: each key given replaces the value before it
    (a mapping or a list as a whole); `where` prefixes errors."""
    for section, values in raw.items():
        if section not in SECTIONS:
            _set(cfg, str(section), "", None, where)  # raises the unknown-section error
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{where}section '{section}' must be a mapping of keys to values")
        for key, value in values.items():
            _set(cfg, section, str(key), value, where)


def from_dict(raw: dict[str, Any], where: str = "") -> Config:
    cfg = Config()
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}expected a mapping with sections {', '.join(SECTIONS)}")
    _apply(cfg, raw, where)
    return cfg


BASE_KEY = "base"  # top-level key: the config file this one extends


def _read_mapping(path: Path) -> dict[str, Any]:
    """One YAML file's top-level mapping, as written."""
    try:
        raw = _load_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(e)}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid YAML: not UTF-8 ({e})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror or e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with sections {', '.join(SECTIONS)}")
    return raw


def _config_chain(path: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    """The files a config consists of, the root base first and `path` last, each with its own
    mapping (without `base`). A missing base or a cycle is a ConfigError naming the files."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    chain: list[tuple[Path, dict[str, Any]]] = []
    seen: list[Path] = []  # resolved, to find a cycle however the paths are spelt
    while True:
        raw = _read_mapping(path)
        seen.append(path.resolve())
        chain.append((path, raw))
        base = raw.pop(BASE_KEY, None)
        if base is None:
            return chain[::-1]
        if not isinstance(base, str) or not base.strip():
            raise ConfigError(f"{path}: {BASE_KEY}: {base!r} is not a valid value; expected the path "
                              f"of the config file it extends, relative to {path.name}")
        base_path = Path(normpath(path.parent / base))  # shown in messages: no a/../b
        if not base_path.is_file():
            raise ConfigError(f"{path}: {BASE_KEY}: config file not found: {base_path}")
        if base_path.resolve() in seen:
            files = " -> ".join(str(p) for p, _ in chain) + f" -> {base_path}"
            raise ConfigError(f"{path}: {BASE_KEY}: config files extend each other in a cycle: {files}")
        path = base_path


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML experiment file, on top of the files it extends (`base:`), and apply
    `section.key=value` overrides."""
    path = Path(path)
    cfg = Config()
    for file, raw in _config_chain(path):
        _apply(cfg, raw, where=f"{file}: ")
    for arg in overrides:
        section, key, value = parse_override(arg)
        _set(cfg, section, key, value, where="command line: ")
    cfg.name = path.stem
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    """The YAML-able sections of a config (without the name)."""
    return {s: dataclasses.asdict(getattr(cfg, s)) for s in SECTIONS}


SAVED_HEADER = re.compile(r"# resolved config of '(.*)'")  # the first line save_config writes


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config, so a run can be reproduced from what it wrote; a failed write
    (a full disk) is an MTError naming the file."""
    text = f"# resolved config of '{cfg.name}'\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False)
    with AtomicFile(path, "write config") as out:
        out.commit(text.encode("utf-8"))


def load_saved_config(path: str | Path) -> Config:
    """A config that save_config wrote (a run's config.yaml), with the experiment's name of its
    first line, on which the default paths depend (data/prepared/<name>)."""
    cfg = load_config(path)
    first = Path(path).read_text(encoding="utf-8").split("\n", 1)[0]
    match = SAVED_HEADER.fullmatch(first)
    if match is None:
        raise ConfigError(f"{path}: not a config written by mt (its first line should be "
                          f"\"# resolved config of 'NAME'\")")
    cfg.name = match.group(1)
    return cfg
