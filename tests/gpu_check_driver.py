"""scripts/gpu_check.py with one part made to hang:

    GPU_CHECK_HANG=KEY python tests/gpu_check_driver.py ARGS

gpu_check starts each part as `python <the script that was run> --part KEY`, so the parts run
through this driver too, and the one named hangs there (tests/test_gpu_check.py)."""

from __future__ import annotations

import importlib
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
gpu_check = importlib.import_module("gpu_check")  # from scripts/, put on the path just above


def hang(args: object, device: object) -> None:
    print("  hanging on purpose", flush=True)
    time.sleep(3600)


gpu_check.PARTS[os.environ["GPU_CHECK_HANG"]].run = hang

if __name__ == "__main__":
    sys.exit(gpu_check.main())
