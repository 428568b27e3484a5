# patchetl: offline WSI ETL into WebDataset shards + streaming tumor-detector training.
# `make setup` once (idempotent), then `make demo` / `make test`.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

# Synthetic data set used by every target when no real data is given.
SYNTH_DIR ?= data/synth
SYNTH_OPTS ?= --slides 4 --width 4000 --height 3000 --seed 0
# Real data: make shards DATASET=/path/dataset_0.json DATA_ROOT=/path/to/slides
DATA_ROOT ?=
DATASET ?= $(if $(DATA_ROOT),$(DATA_ROOT)/dataset_0.json)
SHARDS_DIR ?= shards
EXTRACT_OPTS ?=

.PHONY: setup test synth shards train infer evaluate demo bench bench-gpu clean help

help:
	@echo "make setup      create $(VENV) and install patchetl with its test extras (idempotent)"
	@echo "make test       run the test suite"
	@echo "make synth      write synthetic slides + dataset_0.json to $(SYNTH_DIR)"
	@echo "make shards     extract shards (synthetic data unless DATASET=/DATA_ROOT= are given)"
	@echo "make train | infer | evaluate | demo | bench | bench-gpu   (not built yet)"

setup: $(STAMP)

# Reinstall only when the project definition changes; the editable install picks up code edits.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@

test: setup
	$(BIN)/python -m pytest -q

synth: setup
	$(BIN)/patchetl synth --out $(SYNTH_DIR) $(SYNTH_OPTS)

$(SYNTH_DIR)/dataset_0.json: | setup
	$(BIN)/patchetl synth --out $(SYNTH_DIR) $(SYNTH_OPTS)

ifeq ($(DATASET),)
shards: setup $(SYNTH_DIR)/dataset_0.json
	$(BIN)/patchetl extract --json $(SYNTH_DIR)/dataset_0.json --data-root $(SYNTH_DIR) --out $(SHARDS_DIR) $(EXTRACT_OPTS)
	$(BIN)/patchetl verify $(SHARDS_DIR)/training
else
shards: setup
	$(BIN)/patchetl extract --json $(DATASET) $(if $(DATA_ROOT),--data-root $(DATA_ROOT)) --out $(SHARDS_DIR) $(EXTRACT_OPTS)
endif

# Targets that later work fills in: fail loudly rather than pretend.
train infer evaluate demo bench bench-gpu:
	@echo "make $@: not built yet (see the open issues); nothing was run." >&2
	@exit 2

clean:
	rm -rf data/synth .pytest_cache
