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

.PHONY: setup lint test test-gpu synth shards train infer evaluate demo bench bench-gpu clean help

help:
	@echo "make setup      create $(VENV) and install patchetl with its test extras (idempotent)"
	@echo "make test       lint (ruff), types (mypy), then the test suite"
	@echo "make synth      write synthetic slides + dataset_0.json to $(SYNTH_DIR)"
	@echo "make shards     extract shards (synthetic data unless DATASET=/DATA_ROOT= are given)"
	@echo "make train      train on $(SHARDS_DIR)/ (CPU-sized settings; TRAIN_OPTS=...)"
	@echo "make infer      SLIDE=slide-or-folder [CKPT=...]: probability map, heatmaps, candidates"
	@echo "make evaluate   FROC / AUC of $(RUN_DIR)/infer against TRUTH=annotation folder"
	@echo "make demo | bench | bench-gpu | test-gpu (the tests that need CUDA; skipped elsewhere)"

setup: $(STAMP)

# Reinstall only when the project definition changes; the editable install picks up code edits.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@

# Lint (ruff), format check (ruff format) and types (mypy: strict on etl), then the tests.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q

# On a CUDA machine: the tests that need a GPU (nvJPEG decode; dense vs patch maps of a
# 224 px model trained on the spot). `make test` skips them where there is no GPU.
test-gpu: setup
	$(BIN)/python -m pytest -q -rs tests/test_infer_trained.py tests/test_train_data.py -k "trained or batch_decode"

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

# Training on the default shards, sized to finish on a 2-core CPU in a few minutes (96 px
# patches: the model is fully convolutional). The full-size GPU command is in README.md.
RUN_DIR ?= runs
TRAIN_OPTS ?= --epochs 2 --batch-size 72 --patch-size 96 --optimizer adamw --warmup-epochs 0 --workers 1
train: setup
	$(BIN)/patchetl train --train $(SHARDS_DIR)/training --val $(SHARDS_DIR)/validation --out $(RUN_DIR)/train --resume $(TRAIN_OPTS)

# make infer SLIDE=path/to/slide.tif (or a folder) [CKPT=runs/train/best.pt]
SLIDE ?= $(SYNTH_DIR)/training/images
CKPT ?= $(RUN_DIR)/train/best.pt
INFER_OPTS ?=
infer: setup
	$(BIN)/patchetl infer $(SLIDE) --checkpoint $(CKPT) --out $(RUN_DIR)/infer $(INFER_OPTS)

TRUTH ?= $(SYNTH_DIR)/training/annotations
evaluate: setup
	$(BIN)/patchetl evaluate --pred $(RUN_DIR)/infer --truth $(TRUTH) --slides $(SLIDE) --checkpoint $(CKPT) --shards $(SHARDS_DIR)/validation --out $(RUN_DIR)/eval

# The one-command demo: synthesise a training cohort and held-out test slides, extract,
# train, infer on the held-out slides, evaluate. Sized for a 2-core CPU (see README.md).
DEMO_DIR ?= data/demo
DEMO_SYNTH ?= --width 2048 --height 2048 --mpp 1.0 --region-size 384
DEMO_TRAIN ?= --epochs 3 --batch-size 72 --patch-size 96 --optimizer adamw --warmup-epochs 0 --workers 1
demo: setup
	@test -f $(DEMO_DIR)/train/dataset_0.json || $(BIN)/patchetl synth --out $(DEMO_DIR)/train --slides 6 --tumor-fraction 0.67 --seed 1 --regions-per-slide 64 --val-fraction 0.34 $(DEMO_SYNTH)
	@test -f $(DEMO_DIR)/test/synth.json || $(BIN)/patchetl synth --out $(DEMO_DIR)/test --slides 8 --tumor-fraction 0.5 --seed 2 --regions-per-slide 4 --val-fraction 0 $(DEMO_SYNTH)
	$(BIN)/patchetl extract --json $(DEMO_DIR)/train/dataset_0.json --data-root $(DEMO_DIR)/train --out $(DEMO_DIR)/shards --region-size 384
	$(BIN)/patchetl train --train $(DEMO_DIR)/shards/training --val $(DEMO_DIR)/shards/validation --out $(DEMO_DIR)/run --resume $(DEMO_TRAIN)
	$(BIN)/patchetl infer $(DEMO_DIR)/test/training/images --checkpoint $(DEMO_DIR)/run/best.pt --out $(DEMO_DIR)/infer
	$(BIN)/patchetl evaluate --pred $(DEMO_DIR)/infer --truth $(DEMO_DIR)/test/training/annotations --slides $(DEMO_DIR)/test/training/images --checkpoint $(DEMO_DIR)/run/best.pt --shards $(DEMO_DIR)/shards/validation --out $(DEMO_DIR)/eval
	@echo "heatmaps: $(DEMO_DIR)/infer/*.heatmap.png (and .heatmap.tif for QuPath/ASAP); report: $(DEMO_DIR)/eval/evaluation.json, $(DEMO_DIR)/eval/froc.png"

# Side-by-side benchmarks (each against its baseline in the same script) -> BENCHMARKS.md
bench: setup
	$(BIN)/python -m benchmarks.bench_etl --out benchmarks/results/etl.md
	$(BIN)/python -m benchmarks.bench_loader --out benchmarks/results/loader.md
	$(BIN)/python -m benchmarks.bench_infer --out benchmarks/results/infer.md
	$(BIN)/python -m benchmarks.bench_scale --out benchmarks/results/scale.md
	$(BIN)/python -m benchmarks.report > BENCHMARKS.md.tmp && mv BENCHMARKS.md.tmp BENCHMARKS.md

# On a CUDA machine: training patches/s and data wait (decode on CPU vs GPU), whole-slide time.
bench-gpu: setup
	$(BIN)/python -m benchmarks.bench_gpu --out benchmarks/results/gpu.md
	$(BIN)/python -m benchmarks.report > BENCHMARKS.md.tmp && mv BENCHMARKS.md.tmp BENCHMARKS.md

clean:
	rm -rf data/synth data/demo .pytest_cache
