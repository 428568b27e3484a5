# patchetl: offline WSI ETL into WebDataset shards + streaming tumor-detector training.
# `make setup` once (idempotent), then `make demo` / `make test`.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

# Synthetic data set used by every target when no real data is given.
SYNTH_DIR ?= data/synth
SYNTH_OPTS ?= --slides 4 --width 4000 --height 3000 --seed 0

.PHONY: setup test synth shards train infer evaluate demo bench bench-gpu clean help

help:
	@echo "make setup      create $(VENV) and install patchetl with its test extras (idempotent)"
	@echo "make test       run the test suite"
	@echo "make synth      write synthetic slides + dataset_0.json to $(SYNTH_DIR)"
	@echo "make shards     extract shards (not built yet)"
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

# Targets that later work fills in: fail loudly rather than pretend.
shards train infer evaluate demo bench bench-gpu:
	@echo "make $@: not built yet (see the open issues); nothing was run." >&2
	@exit 2

clean:
	rm -rf data/synth .pytest_cache
