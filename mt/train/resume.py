"""The rules for resuming a run with a changed config: what may change (budgets, validation, batch
size, learning rate, source weights, ...), what may not (the model, and what gives the token ids
their meaning), and when changed source weights take effect."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from mt.checkpoint import Checkpoint
from mt.config import Config, to_dict
from mt.errors import CheckpointError

if TYPE_CHECKING:  # mt compare reads flatten() without torch
    from mt.train.distributed import Dist

# The data settings that decide what a checkpoint's token ids mean: a run may not resume with
# others (mt.config.DataConfig documents each).
DATA_KEYS_OF_IDS = {
    f"data.{k}"
    for k in (
        "src_lang", "tgt_lang", "local_dir", "local_splits", "hub", "hub_config", "hub_revision",
        "hub_data_dir", "hub_splits", "max_train_pairs", "sources", "eval_source", "spm_type",
        "joint_vocab", "vocab_size", "character_coverage", "spm_max_sentences",
    )
} | {"train.init_from"}  # whose subword models encode the data


def flatten(sections: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """{'train': {'lr': 1}} -> {'train.lr': 1}; data.sources becomes its list of names and one
    key per source setting (data.sources.<name>.<key>), so that a changed weight is told apart
    from a changed corpus."""
    flat = {}
    for s, values in sections.items():
        for k, v in values.items():
            if (s, k) == ("data", "sources"):
                flat["data.sources"] = [src["name"] for src in v]
                flat |= {f"data.sources.{src['name']}.{sk}": sv for src in v for sk, sv in src.items()}
            else:
                flat[f"{s}.{k}"] = v
    return flat


def source_weights(config: dict[str, Any]) -> dict[str, float]:
    """{source name: weight} of a config's data.sources (as to_dict gives it); {} for one corpus."""
    return {src["name"]: float(src["weight"]) for src in config["data"].get("sources", [])}


def changes_ids(key: str) -> bool:
    """Whether a flattened setting changes what the token ids of the prepared data mean. A source's
    weight does not: it changes how often an epoch shows its pairs, like a batch size would."""
    if key.startswith("data.sources."):
        return not key.endswith(".weight")
    return key in DATA_KEYS_OF_IDS


def check_resumable(ck: Checkpoint, cfg: Config, path: Path, dist: Dist) -> None:
    """A resumed run keeps what gives the checkpoint `path`'s weights and token ids their meaning:
    the model, the languages, the corpus and the subword settings. Other changes (budgets,
    validation, batch size, learning rate, ...) are allowed and named in the log."""
    then, now = flatten(ck.config), flatten(to_dict(cfg))
    changed = {k: (then[k], v) for k, v in now.items() if k in then and then[k] != v}
    model = {k: c for k, c in changed.items() if k.startswith("model.")}
    data = {k: c for k, c in changed.items() if changes_ids(k)}
    for fixed, what in ((model, "a different model config"), (data, "other data")):
        if fixed:
            shown = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in fixed.items())
            raise CheckpointError(
                f"{path} was trained with {what} ({shown}, checkpoint -> now), which "
                f"changes what its weights or token ids mean; resume with the checkpoint's values, "
                f"or use another train.out_dir (or delete the directory) to start over"
            )
    assert ck.training is not None  # _read_last_checkpoint refuses a checkpoint without
    if (world_size := ck.training.world_size) != dist.world_size:
        raise CheckpointError(
            f"{path} was written by a run on {world_size} processes; resume with the "
            f"same number (now {dist.world_size}) to continue exactly"
        )
    if changed and dist.is_main:
        shown = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
        print(f"mt train: resuming with changed settings: {shown}")


def kept_epoch_weights(
    ck: Checkpoint, cfg: Config, epoch: int, batch_pos: int, is_main: bool
) -> tuple[int, dict[str, float]] | None:
    """New source weights take effect at the next epoch: the epoch being resumed keeps the
    batch list it began with (its weights are in the checkpoint), so that the position in it
    still means the batches not yet seen, none skipped and none repeated. Returns (epoch, its
    weights) when the resumed epoch keeps other weights than the config's."""
    assert ck.training is not None
    then = ck.training.epoch_weights
    if then is None:  # older checkpoints: their config's
        then = source_weights(ck.config)
    now = source_weights(to_dict(cfg))
    if then == now:
        return None
    kept = None
    if batch_pos:
        kept = (epoch, then)
        when = (f"epoch {epoch} goes on with the weights it began with; the new ones take effect at "
                f"epoch {epoch + 1}")
    else:
        when = f"the new ones take effect now, at the start of epoch {epoch}"
    if is_main:
        print(f"mt train: source weights changed ({then} -> {now}): {when}")
    return kept
