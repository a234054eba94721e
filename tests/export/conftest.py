"""Fixtures of the export tests: tiny checkpoints in every model layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import build_checkpoint, tiny_config, tiny_spm_pair


@pytest.fixture(scope="module")
def checkpoint_of(tmp_path_factory: pytest.TempPathFactory):
    """A function: model layout (ModelConfig fields, plus `separate`) -> a tiny trained checkpoint."""
    made: dict[str, Path] = {}

    def make(**layout: object) -> Path:
        key = json.dumps(layout, sort_keys=True)
        if key not in made:
            fields = dict(layout)
            src, tgt = tiny_spm_pair() if fields.pop("separate", False) else (None, None)
            path = tmp_path_factory.mktemp("ck") / "tiny.pt"
            made[key] = build_checkpoint(path, tiny_config(**fields), src, tgt)
        return made[key]

    return make
