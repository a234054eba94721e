"""Exporting a trained model to the engines users deploy with, computing exactly our function.

    mt export ctranslate2 --checkpoint CK --output DIR [--quantization Q] [--length-penalty fairseq]
    mt export hf --checkpoint CK --output DIR [--length-penalty fairseq]

`ct2.py` builds a CTranslate2 model through ctranslate2's own converter API; `hf.py` a Hugging
Face Transformers model (Marian for post-norm models, Pegasus for pre-norm ones); and
`ct2_translator.py` translates with a CTranslate2 export under `mt translate`'s contract
(`mt translate --model DIR`). This module holds what they share: the optional dependencies
(the `export` extra), the manifest that marks a directory as one of ours, and writing the
directory whole.

An export directory is self-contained: the model, its vocabularies, the SentencePiece models
(`source.spm`, `target.spm`), a README with a runnable example, and `mt_export.json`: the
engine, the checkpoint it came from, that checkpoint's resolved config (its decode section
gives `mt translate --model` its defaults) and the size and sha256 of each vocabulary and
SentencePiece model, checked whenever the export is read: another model's files would
translate into nonsense without any error (exports written before these were recorded load
unchecked). It is built in a temporary directory beside DIR and
put in its place whole (mt.files.replace_dir), so an interrupted export leaves the previous
one or none. An existing DIR is replaced only when it is an export of ours.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from mt.config import Config, DecodeConfig, from_dict, to_dict
from mt.errors import ConfigError, ExportError, MTError
from mt.files import file_above, remove_stale, replace_dir, temp_path, write_atomic

if TYPE_CHECKING:  # torch is imported only when a checkpoint is loaded
    from mt.checkpoint import LoadedModel

INSTALL = "pip install -e '.[export]'"  # what installs the extra, in a checkout of this repository
MANIFEST = "mt_export.json"
FORMAT = "mt-export"
VERSION = 1
# The files that turn text into ids and back (CTranslate2's and Transformers' names): the
# manifest records their sizes and checksums, and reading an export checks them.
PARTS = (
    "source.spm", "target.spm", "shared_vocabulary.json", "source_vocabulary.json",
    "target_vocabulary.json", "vocab.json", "target_vocab.json",
)


def require(module: str, what: str) -> ModuleType:
    """Import `module`, a dependency of the `export` extra; when it is missing, stop with a line
    that says what needs it and how to install it. `what` names the command or feature."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:  # installed but broken (one of its own imports failed): a real error
            raise
        raise MTError(
            f"{what} needs {module}, which is not installed: {INSTALL} (the export extra)"
        ) from None


def load_checkpoint_model(checkpoint: str | Path) -> LoadedModel:
    """The checkpoint's config, tokenizer and model (fp32, on the CPU, eval mode)."""
    from mt.checkpoint import load_model

    return load_model(checkpoint, "cpu", "fp32")


def penalty_note(decode: DecodeConfig, engine: str) -> str:
    """What an export's README says when it replaced the checkpoint's GNMT penalty ('' if not)."""
    if decode.length_penalty == "fairseq":
        return ""
    return (
        f"\n**Length penalty.** The checkpoint's beam search uses GNMT's length penalty, which {engine} "
        f"lacks; this export uses fairseq's len**alpha instead (`--length-penalty fairseq`), so beam "
        f"search can choose other translations than the checkpoint does (greedy search is unaffected).\n"
    )


def decode_for_export(decode: DecodeConfig, length_penalty: str | None, engine: str) -> DecodeConfig:
    """The decode settings an export records. CTranslate2 and Transformers divide beam scores by
    len**alpha (fairseq's penalty); GNMT's ((5 + len) / 6)**alpha cannot be expressed in either,
    so a GNMT checkpoint is refused unless `length_penalty` "fairseq" says to export with
    fairseq's instead (recorded in the manifest, so every tool then uses it)."""
    if decode.length_penalty == "fairseq" or length_penalty == "fairseq":
        return replace(decode, length_penalty="fairseq")
    raise ExportError(
        f"decode.length_penalty {decode.length_penalty!r} has no {engine} equivalent (its beam search "
        f"divides by len**alpha); pass --length-penalty fairseq to export with that penalty instead"
    )


# --------------------------------------------------------------------------- the manifest


@dataclass
class Manifest:
    """What `mt_export.json` records about an export."""

    engine: str  # "ctranslate2" or "transformers"
    checkpoint: str  # the checkpoint it was exported from, as given
    config: Config  # that checkpoint's resolved config
    quantization: str | None = None  # CTranslate2's weight type, None for the checkpoint's (fp32)
    # PARTS present in the export -> {"size": bytes, "sha256": hex}; None in older exports.
    parts: dict[str, dict[str, Any]] | None = None

    def write(self, directory: Path) -> None:
        """Write the manifest into the complete export `directory`, recording its PARTS."""
        self.parts = {name: _fingerprint(directory / name) for name in PARTS if (directory / name).is_file()}
        data = {
            "format": FORMAT,
            "version": VERSION,
            "engine": self.engine,
            "checkpoint": self.checkpoint,
            "name": self.config.name,
            "quantization": self.quantization,
            "config": to_dict(self.config),
            "parts": self.parts,
        }
        write_atomic(directory / MANIFEST, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def read_manifest(directory: str | Path) -> Manifest:
    """The manifest of an export directory; anything else is an ExportError that says what it is."""
    directory = Path(directory)
    if not directory.exists():
        raise ExportError(f"{directory}: no such directory")
    if not directory.is_dir():
        raise ExportError(
            f"{directory} is a file, not an export directory (a checkpoint goes with --checkpoint)"
        )
    path = directory / MANIFEST
    if not path.is_file():
        raise ExportError(
            f"{directory} is not an mt export (it has no {MANIFEST}); make one with `mt export`"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("version"), int):
        raise ExportError(f"{path} is not an mt export manifest (no 'format': '{FORMAT}')")
    if data["version"] > VERSION:
        raise ExportError(
            f"{path} is export version {data['version']}; this code reads up to version {VERSION}"
        )
    try:
        config = from_dict(data["config"], where=f"{path}: ")
        config.name = str(data.get("name", config.name))
        manifest = Manifest(
            str(data["engine"]), str(data["checkpoint"]), config, data.get("quantization"), data.get("parts")
        )
    except (KeyError, ConfigError) as e:
        raise ExportError(f"{path} is incomplete or from another version of mt ({e})") from None
    check_parts(directory, manifest)
    return manifest


def _fingerprint(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def check_parts(directory: Path, manifest: Manifest) -> None:
    """Each vocabulary and SentencePiece model the manifest records is there, of its size and
    checksum; anything else is an ExportError naming the file."""
    for name, recorded in (manifest.parts or {}).items():
        path = directory / name
        try:
            found = _fingerprint(path)
        except OSError as e:
            raise ExportError(
                f"{path}: cannot read it ({e.strerror or e}); it is part of this export: export again"
            ) from None
        if found != recorded:
            what = (
                f"{found['size']} bytes where {MANIFEST} records {recorded.get('size')}"
                if found["size"] != recorded.get("size") else f"its sha256 is not the one {MANIFEST} records"
            )
            raise ExportError(
                f"{path} is not the file this export was made with ({what}): another model's "
                f"vocabulary or subword model translates into nonsense; export again from the checkpoint"
            )


# --------------------------------------------------------------------------- the directory


def write_export(output: str | Path, fill: Callable[[Path], None]) -> Path:
    """Make the export directory `output`: `fill` writes everything into a fresh temporary
    directory beside it, which then replaces `output` whole. An existing `output` that is not
    an export of ours (or not a directory) is left alone, with an ExportError."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise ExportError(f"--output {output} is a file; give a directory for the export")
    blocker = file_above(output)
    if blocker is not None:
        raise ExportError(f"--output {output}: its parent {blocker} is a file, not a directory")
    if output.is_dir() and any(output.iterdir()) and not (output / MANIFEST).is_file():
        raise ExportError(
            f"--output {output} exists and is not an mt export; give a new directory (or remove it)"
        )
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(output.parent, f".{output.name}.tmp-*")  # left by exports that were killed
        tmp = temp_path(output, "tmp", hidden=True)
        tmp.mkdir()
    except OSError as e:
        raise ExportError(f"cannot write {output}: {e.strerror or e}") from None
    try:
        fill(tmp)
        replace_dir(tmp, output)
    except OSError as e:
        raise ExportError(f"cannot write {output}: {e.strerror or e}") from None
    finally:
        if tmp.exists():  # anything but success: the temporary directory goes, `output` stays
            shutil.rmtree(tmp, ignore_errors=True)
    return output


def readme_text(title: str, body: str, checkpoint: str | Path, config: Config) -> str:
    """An export's README.md: what it is, where it came from, then `body`."""
    m = config.model
    shape = (
        f"{m.layers}+{m.decoder_layers or m.layers} layers, d_model {m.d_model}, {m.heads} heads, "
        f"ffn {m.ffn_dim}, {m.activation}, {'pre' if m.pre_norm else 'post'}-norm, "
        f"{'learned' if m.learned_positions else 'sinusoidal'} positions"
    )
    return (
        f"# {config.name}: {config.data.src_lang}->{config.data.tgt_lang}, {title}\n\n"
        f"Exported by `mt export` from `{checkpoint}` ({shape}).\n"
        f"`{MANIFEST}` holds that checkpoint's config; `source.spm` and `target.spm` are its "
        f"SentencePiece models.\n\n{body}"
    )
