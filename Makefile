# mt: prepare, train, translate, evaluate.  `make train` and `make test` are all a new user needs.
PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# The CPU build of torch installs from a local file here in seconds; on a GPU machine use
# e.g. `make setup TORCH=torch` to keep or pull a CUDA build.
TORCH   ?= torch==2.13.0
CONFIG  ?= configs/multi30k_de_en.yaml
# Set to use a Multi30k copy elsewhere than the config's data.local_dir.
MULTI30K ?=
NPROC   ?= 1
ARGS    ?=
INPUT   ?=
OUTPUT  ?=
RUN_DIR ?= runs/$(basename $(notdir $(CONFIG)))
# What `translate` and `evaluate` use: checkpoint_final.pt, which the end of training links to the
# better of checkpoint_best.pt and checkpoint_avg.pt on the validation set (summary.json says
# which and why); checkpoint_best.pt while the run has not finished.
CKPT    ?= $(firstword $(wildcard $(RUN_DIR)/checkpoint_final.pt) $(RUN_DIR)/checkpoint_best.pt)

CONFIG_ARGS := $(if $(MULTI30K),data.local_dir=$(MULTI30K)) $(ARGS)
TRAIN_CMD := $(if $(filter 1,$(NPROC)),$(BIN)/mt,$(BIN)/torchrun --standalone --nproc_per_node $(NPROC) -m mt)

.PHONY: setup data train translate evaluate test test-avx2 lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev,plot,serve,tensorboard,export]'
	touch $@

setup: $(VENV)/.installed

data: setup
	$(BIN)/mt prepare $(CONFIG) $(CONFIG_ARGS)

train: data
	$(TRAIN_CMD) train $(CONFIG) $(CONFIG_ARGS)

translate: setup
	$(BIN)/mt translate --checkpoint $(CKPT) $(if $(INPUT),--input $(INPUT)) $(if $(OUTPUT),--output $(OUTPUT))

evaluate: setup
	$(BIN)/mt evaluate $(CONFIG) $(CONFIG_ARGS) --split test --checkpoint $(CKPT)

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# The tests whose results depend on the CPU's instructions (bf16, int8), run as on a CPU with
# AVX2 and no AVX-512, whatever this one has: each library caps its kernels to AVX2.
AVX2_CAPS := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 CT2_FORCE_CPU_ISA=AVX2
test-avx2: setup
	@echo "instruction-set caps: $(AVX2_CAPS)"
	@$(AVX2_CAPS) $(BIN)/python -c "import torch; print('torch runs its', torch.backends.cpu.get_cpu_capability(), 'kernels')"
	HF_HUB_OFFLINE=1 $(AVX2_CAPS) $(BIN)/python -m pytest -q -m low_precision

# ruff, then mypy over mt/ (its settings are [tool.mypy] in pyproject.toml).
lint: setup
	$(BIN)/ruff check mt tests scripts
	$(BIN)/mypy mt

$(VENV)/.bench-installed: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[bench]'
	touch $@

bench: data $(VENV)/.bench-installed
	$(BIN)/python scripts/bench_prepare.py
	$(BIN)/python scripts/bench_train.py $(CONFIG) $(CONFIG_ARGS)
	$(BIN)/python scripts/bench_decode.py $(CONFIG) $(CONFIG_ARGS)

clean:
	rm -rf data/prepared runs
