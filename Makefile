# Every target installs what it needs first (`make install`: .venv + pinned stack).
# Override any variable on the command line, e.g. `make shards DEMO_IMAGES=2000`.
PYTHON      ?= python3
VENV        := .venv
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.installed
DATA        ?= data
DEMO        := $(DATA)/demo
SHARDS      := $(DATA)/shards/demo
DEMO_IMAGES ?= 20000
WORKERS     ?= $(shell nproc)
PYTEST_ARGS ?=
CONFIG      ?= configs/pretrain/demo.yaml
ARGS        ?=
FINETUNE_CONFIG ?= configs/finetune/demo.yaml
FINETUNE_RUN    ?= runs/finetune-demo
PRETRAINED      := runs/demo/result.json

EVAL_CONFIG     ?= configs/eval/demo.yaml

.PHONY: help install test test-fast demo-data shards vocab bench-data bench-knn bench-dedup pretrain finetune eval clean

help:
	@echo "make pretrain    pretrain on the embedded demo data (CONFIG=..., ARGS=\"key=value ...\")"
	@echo "make finetune    fine-tune the pretrained backbone on the demo downstream set, and a random start"
	@echo "make eval        kNN + linear probe of the pretrained backbone and a random one, side by side"
	@echo "make test        install everything and run the test suite"
	@echo "make demo-data   generate the demo hashtag images and the downstream set"
	@echo "make shards      demo data -> WebDataset shards + hashtag vocabulary"
	@echo "make bench-data  training data pipeline vs. plain Pillow + torchvision"
	@echo "make bench-knn   FAISS kNN vs. scikit-learn's brute-force KNeighborsClassifier"
	@echo "make bench-dedup de-duplication: threshold curve on planted copies, images/s per core"

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	@touch $@

install: $(STAMP)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

demo-data: install
	$(BIN)/wsl demo-data --out $(DEMO) --num-images $(DEMO_IMAGES) --workers $(WORKERS)

shards: demo-data
	$(BIN)/wsl shards --config configs/shards/demo.yaml --jsonl $(DEMO)/pretrain/annotations.jsonl \
		--out $(SHARDS) --workers $(WORKERS)
	$(BIN)/wsl vocab --config configs/vocab/demo.yaml --shards $(SHARDS) \
		--synonyms $(DEMO)/synonyms.txt --out $(SHARDS)/vocab.json

vocab: install
	$(BIN)/wsl vocab --config configs/vocab/demo.yaml --shards $(SHARDS) \
		--synonyms $(DEMO)/synonyms.txt --out $(SHARDS)/vocab.json

bench-data: install
	$(BIN)/python pipelines/bench_data.py --out bench/data

bench-knn: install
	$(BIN)/python pipelines/bench_knn.py

bench-dedup: install
	$(BIN)/python pipelines/bench_dedup.py --out bench/dedup

clean:
	rm -rf $(DATA) bench runs

# The main job: hashtag pretraining on the demo shards. Re-running resumes from the run
# directory's last.ckpt. `make pretrain CONFIG=configs/pretrain/... ARGS="max_steps=100"`.
pretrain: shards
	$(BIN)/wsl pretrain --config $(CONFIG) $(ARGS)

# `make pretrain` writes result.json when it has finished; fine-tuning starts from its checkpoint.
$(PRETRAINED):
	$(MAKE) pretrain

# Fine-tune the pretrained backbone, then the same config from a random start, and compare.
# `make finetune ARGS="epochs=5"`; ImageNet: `wsl finetune --config configs/finetune/imagenet_resnext101_32x8d.yaml`.
finetune: install $(PRETRAINED)
	$(BIN)/wsl finetune --config $(FINETUNE_CONFIG) run_dir=$(FINETUNE_RUN) $(ARGS)
	$(BIN)/wsl finetune --config $(FINETUNE_CONFIG) run_dir=$(FINETUNE_RUN)-random-init weights=null $(ARGS)
	$(BIN)/wsl compare $(FINETUNE_RUN) $(FINETUNE_RUN)-random-init

# kNN and linear-probe accuracy of the pretrained backbone and of a random initialisation.
eval: install $(PRETRAINED)
	$(BIN)/wsl eval --config $(EVAL_CONFIG) $(ARGS)
