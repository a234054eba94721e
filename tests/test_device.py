"""Device and precision choices (mt.device): what runs where, and what a user is told."""

from __future__ import annotations

import pytest
import torch

from mt import device
from mt.device import decode_precision, pick_device, train_autocast_dtype
from mt.errors import ConfigError, MTError

CPU = torch.device("cpu")


@pytest.fixture
def cpu_bf16(monkeypatch: pytest.MonkeyPatch):
    """Pretend the CPU has native bf16 or not; the once-only warning starts afresh."""
    device._warn_emulated_bf16.cache_clear()

    def set_native(native: bool) -> None:
        monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: native)

    yield set_native
    device._warn_emulated_bf16.cache_clear()


def test_auto_decodes_in_bf16_only_where_the_cpu_has_it(cpu_bf16):
    cpu_bf16(True)
    assert decode_precision("auto", CPU) == "bf16"
    cpu_bf16(False)
    assert decode_precision("auto", CPU) == "fp32"


def test_bf16_on_a_cpu_that_emulates_it_warns_once_naming_the_faster_choice(cpu_bf16, capsys):
    cpu_bf16(False)
    assert decode_precision("bf16", CPU) == "bf16"  # asked for: still honoured
    assert decode_precision("bf16", CPU) == "bf16"
    err = capsys.readouterr().err
    assert err.count("warning: bf16 on this CPU is emulated") == 1
    assert "use precision fp32" in err


def test_bf16_on_a_native_cpu_and_fp32_anywhere_say_nothing(cpu_bf16, capsys):
    cpu_bf16(True)
    assert decode_precision("bf16", CPU) == "bf16"
    cpu_bf16(False)
    assert decode_precision("fp32", CPU) == "fp32"
    assert capsys.readouterr().err == ""


def test_fp16_decoding_on_a_cpu_is_refused():
    with pytest.raises(ConfigError, match="fp16 needs a GPU; on CPU use bf16"):
        decode_precision("fp16", CPU)
    with pytest.raises(ConfigError, match="precision must be one of auto, fp32, bf16, fp16"):
        decode_precision("fp8", CPU)


def test_training_autocasts_only_on_a_gpu(capsys):
    assert train_autocast_dtype("auto", CPU) is None
    assert train_autocast_dtype("bf16", CPU) is None
    assert "train.precision=bf16 needs a GPU; using fp32 on cpu" in capsys.readouterr().err


def test_device_names_resolve_or_say_what_to_type():
    assert pick_device("cpu") == CPU
    assert pick_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(MTError, match="--device gpu0: not a device name.*use cpu, cuda or cuda:N"):
        pick_device("gpu0")
    with pytest.raises(MTError, match="train.device cuda:99: "):
        pick_device("cuda:99", "train.device")


def test_the_cpu_description_names_the_model_and_flags():
    text = device.cpu_description()
    assert "flags:" in text and text.split(";")[0].strip()


def test_the_cpu_maker_and_flags_are_read_from_cpuinfo(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    monkeypatch.setattr(device, "CPUINFO", str(info))
    core = "vendor_id\t: {}\nmodel name\t: {}\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\n"
    info.write_text(core.format("GenuineIntel", "Xeon") * 2)
    assert device.cpu_is_intel.__wrapped__()
    assert device._cpu_flags() == {"fpu", "avx2", "avx512f", "avx512_bf16"}
    assert device.cpu_description.__wrapped__() == "Xeon; flags: avx2 avx512f avx512_bf16"
    info.write_text(core.format("AuthenticAMD", "EPYC"))
    assert not device.cpu_is_intel.__wrapped__()
    info.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")  # Arm
    assert not device.cpu_is_intel.__wrapped__() and device._cpu_flags() == {"fp", "asimd", "bf16"}
    info.unlink()  # not Linux
    assert not device.cpu_is_intel.__wrapped__() and device._cpu_flags() == set()
