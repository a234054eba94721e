"""`mt` with the `datasets` package made unimportable: python without_datasets.py MT-ARGS...

The GPU machine has torch but not `datasets`; training and translating from a prepared cache
must not need it (tests/test_gpu_check.py).
"""

import importlib
import sys

sys.modules["datasets"] = None  # from here on, `import datasets` raises ImportError
cli = importlib.import_module("mt.cli")  # imported after the line above, whatever sorts imports
sys.exit(cli.main(sys.argv[1:]))
