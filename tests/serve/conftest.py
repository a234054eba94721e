"""Fixtures of the serve tests: the tiny checkpoint's Translator."""

from __future__ import annotations

import pytest

from mt.translate.translator import Translator


@pytest.fixture(scope="module")
def translator(checkpoint) -> Translator:
    return Translator.from_checkpoint(checkpoint, "cpu")
