# Every target installs what it needs first (`make install`: .venv + pinned stack) and skips
# what is already done. Settings are key=value, the same for every stage: `make pretrain
# ARGS="max_steps=200"`; `wsl STAGE --help` lists the keys. Override any variable here on the
# command line, e.g. `make shards DEMO_IMAGES=2000`.
PYTHON      ?= python3
VENV        := .venv
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.installed
DEV_STAMP   := $(VENV)/.installed-dev
DATA        ?= data
DEMO        := $(DATA)/demo
SHARDS      := $(DATA)/shards/demo
DEDUP       := $(DATA)/shards/demo-dedup
DEMO_IMAGES ?= 20000
WORKERS     ?= $(shell nproc)
PYTEST_ARGS ?=
# The suite runs in parallel (pytest-xdist: a process a core, at most 4; idle workers steal
# queued tests). `make test PYTEST_PARALLEL=` runs it in one process.
PYTEST_PARALLEL ?= -n auto --maxprocesses 4 --dist worksteal
CONFIG      ?= configs/pretrain/demo.yaml
ARGS        ?=
FINETUNE_CONFIG ?= configs/finetune/demo.yaml
EVAL_CONFIG     ?= configs/eval/demo.yaml
# The pretraining run that finetune, eval and release start from: `make pretrain`'s, or the
# de-duplicated pipeline's when `make all` sets it.
PRETRAIN_RUN    ?= runs/demo
FINETUNE_RUN    ?= runs/finetune-demo
EVAL_RUN        ?= runs/eval-demo
RELEASE         ?= runs/release-demo
PRETRAIN_ARGS   ?=
WEIGHTS          = $(PRETRAIN_RUN)/checkpoints/last.ckpt

.PHONY: help install install-dev lint test test-fast demo-data shards vocab dedup pretrain finetune eval release all \
	bench-data bench-knn bench-dedup bench-dedup-memory bench-probe bench-eval-reader bench-train bench-scale clean

help:
	@echo "make pretrain    pretrain on the embedded demo data (CONFIG=..., ARGS=\"key=value ...\")"
	@echo "make test        install everything, lint (ruff) and run the test suite"
	@echo "make all         the whole pipeline: data, shards, dedup, vocab, pretrain, finetune, eval, release"
	@echo "make finetune    fine-tune the pretrained backbone on the demo downstream set, and a random start"
	@echo "make eval        kNN + linear probe of the pretrained backbone and a random one, side by side"
	@echo "make dedup       drop the demo shards' copies of the downstream val images (-> $(DEDUP))"
	@echo "make release     export the pretrained backbone as a release folder ($(RELEASE))"
	@echo "make demo-data   generate the demo hashtag images and the downstream set"
	@echo "make shards      demo data -> WebDataset shards + hashtag vocabulary"
	@echo "make bench-data  training data pipeline vs. plain Pillow + torchvision"
	@echo "make bench-knn   FAISS kNN vs. scikit-learn's brute-force KNeighborsClassifier"
	@echo "make bench-dedup de-duplication: recall per copy edit (real photos too), false removals, images/s per core"
	@echo "make bench-dedup-memory  the dedup decision step's peak memory at 100k and 1M samples"
	@echo "make bench-probe the linear probe's time per epoch and memory up to 1.28M x 2048 features"
	@echo "make bench-eval-reader  samples the evaluation reader reads, 3,360 slots on 20 shards"
	@echo "make bench-train one training step's images/s: eager, channels_last, torch.compile (BENCH_TRAIN_ARGS=...)"
	@echo "make bench-scale every stage at 3 sizes: growth (log-log slope) and the cost at the paper's sizes"

# The pipeline needs only the package; tests, lint and benchmarks also the `dev` extra
# (pytest, ruff, scikit-learn, matplotlib), so `make pretrain` on a fresh machine installs less.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e .
	@touch $@

$(DEV_STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	@touch $(STAMP) $@

install: $(STAMP)

install-dev: $(DEV_STAMP)

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest $(PYTEST_PARALLEL) $(PYTEST_ARGS)

test-fast: install-dev
	$(BIN)/python -m pytest $(PYTEST_PARALLEL) -m "not slow" $(PYTEST_ARGS)

demo-data: install
	$(BIN)/wsl demo-data out=$(DEMO) num_images=$(DEMO_IMAGES) workers=$(WORKERS)

$(SHARDS)/vocab.json:
	$(MAKE) demo-data
	$(BIN)/wsl shards --config configs/shards/demo.yaml jsonl=$(DEMO)/pretrain/annotations.jsonl \
		out=$(SHARDS) workers=$(WORKERS)
	$(BIN)/wsl vocab --config configs/vocab/demo.yaml shards=$(SHARDS) synonyms=$(DEMO)/synonyms.txt \
		out=$(SHARDS)/vocab.json workers=$(WORKERS)

shards: install $(SHARDS)/vocab.json
	@echo "shards and vocabulary: $(SHARDS)"

vocab: install
	$(BIN)/wsl vocab --config configs/vocab/demo.yaml shards=$(SHARDS) synonyms=$(DEMO)/synonyms.txt \
		out=$(SHARDS)/vocab.json workers=$(WORKERS)

# De-duplication against the downstream val set, then the vocabulary of what is left.
$(DEDUP)/vocab.json: $(SHARDS)/vocab.json
	$(BIN)/wsl dedup shards=$(SHARDS) against=[$(DEMO)/downstream/val] out=$(DEDUP) workers=$(WORKERS)
	$(BIN)/wsl vocab --config configs/vocab/demo.yaml shards=$(DEDUP) synonyms=$(DEMO)/synonyms.txt \
		out=$(DEDUP)/vocab.json workers=$(WORKERS)

dedup: install $(DEDUP)/vocab.json
	@echo "de-duplicated shards, report and vocabulary: $(DEDUP)"

# The main job: hashtag pretraining on the demo shards. Re-running resumes from the run
# directory's last.ckpt (a changed config is refused: restart=true or another run_dir).
pretrain: install $(SHARDS)/vocab.json
	$(BIN)/wsl pretrain --config $(CONFIG) $(PRETRAIN_ARGS) $(ARGS)

# A pretraining run writes result.json when it has finished; the later stages start from its checkpoint.
$(PRETRAIN_RUN)/result.json:
	$(MAKE) pretrain

# Fine-tune the pretrained backbone, then the same config from a random start, and compare.
# ImageNet: `wsl finetune --config configs/finetune/imagenet_resnext101_32x8d.yaml`.
$(FINETUNE_RUN)/result.json: $(PRETRAIN_RUN)/result.json
	$(BIN)/wsl finetune --config $(FINETUNE_CONFIG) run_dir=$(FINETUNE_RUN) weights=$(WEIGHTS) $(ARGS)
	$(BIN)/wsl finetune --config $(FINETUNE_CONFIG) run_dir=$(FINETUNE_RUN)-random-init weights=null $(ARGS)

finetune: install $(FINETUNE_RUN)/result.json
	$(BIN)/wsl compare runs=[$(FINETUNE_RUN),$(FINETUNE_RUN)-random-init]

# kNN and linear-probe accuracy of the pretrained backbone and of a random initialisation.
eval: install $(PRETRAIN_RUN)/result.json
	$(BIN)/wsl eval --config $(EVAL_CONFIG) run_dir=$(EVAL_RUN) backbones.hashtag-pretrained=$(WEIGHTS) $(ARGS)

$(RELEASE)/metadata.json: $(PRETRAIN_RUN)/result.json
	$(BIN)/wsl export checkpoint=$(WEIGHTS) out=$(RELEASE) \
		$$(test -f $(EVAL_RUN)/report.json && echo eval_report=$(EVAL_RUN)/report.json)

release: install $(RELEASE)/metadata.json
	@echo "release folder: $(RELEASE)"

# The whole pipeline on the demo data, pretraining on the de-duplicated shards.
all: install dedup
	$(MAKE) pretrain eval finetune release PRETRAIN_RUN=runs/demo-dedup EVAL_RUN=runs/eval-demo-dedup \
		FINETUNE_RUN=runs/finetune-demo-dedup RELEASE=runs/release-demo-dedup PRETRAIN_ARGS="run_dir=runs/demo-dedup \
		'data.shards=$(DEDUP)/pretrain-{000000..000018}.tar' 'data.val_shards=$(DEDUP)/pretrain-{000019..000020}.tar' \
		data.vocab=$(DEDUP)/vocab.json"

bench-data: install-dev
	$(BIN)/python pipelines/bench/data.py --out bench/data

# On a GPU: make bench-train BENCH_TRAIN_ARGS="--model resnext101_32x8d --image-size 224 --batch-size 128"
BENCH_TRAIN_ARGS ?=
bench-train: install-dev
	$(BIN)/python pipelines/bench/train.py $(BENCH_TRAIN_ARGS)

bench-scale: install-dev
	$(BIN)/python pipelines/bench/scale.py --work bench/scale

bench-knn: install-dev
	$(BIN)/python pipelines/bench/knn.py

bench-dedup: install-dev
	$(BIN)/python pipelines/bench/dedup.py --out bench/dedup $(ARGS)

bench-dedup-memory: install-dev
	$(BIN)/python pipelines/bench/dedup_memory.py

bench-probe: install-dev
	$(BIN)/python pipelines/bench/linear_probe.py

bench-eval-reader: install-dev
	$(BIN)/python pipelines/bench/eval_reader.py

clean:
	rm -rf $(DATA) bench runs
