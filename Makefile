# The two commands of the README. Both create .venv on first use.
# TORCH picks the torch build to install; the default is the CPU build (users with a GPU
# may run e.g. `make demo TORCH=torch` to get their CUDA build).
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo demo-resnet demo-datafree demo-lm biased-pair transformer-pairs figures test bench parity clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, so that installing mergecli (torch>=2.2) and transformers (the hf extra, which
# the tests use) does not pull a different build.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test,hf,images,hf-datasets]"
	touch $@

runs/mlp8-seed%.safetensors: | $(VENV)/.installed
	$(BIN)/mergecli --log plain train --arch mlp --arg depth=8 --arg hidden=128 \
		--data mnist:train --eval-data mnist:test --epochs 10 --seed $* --out $@

# Linear classifiers (depth 1: one row per class), whose rows are the class templates.
runs/linear-seed%.safetensors: | $(VENV)/.installed
	$(BIN)/mergecli --log plain train --arch mlp --arg depth=1 \
		--data mnist:train --eval-data mnist:test --epochs 5 --seed $* --out $@

# Plain averaging collapses; weight matching aligns the hidden units first; REPAIR then
# restores the activation statistics that averaging shrinks; NP Merge learns a coefficient
# per parameter; the analysis recipes write report.md with every analysis and its plots.
demo: $(VENV)/.installed runs/mlp8-seed0.safetensors runs/mlp8-seed1.safetensors \
		runs/linear-seed0.safetensors runs/linear-seed1.safetensors
	$(BIN)/mergecli run configs/examples/mnist-mlp8-average.yaml
	$(BIN)/mergecli run configs/examples/mnist-mlp8-weight-matching-repair.yaml
	$(BIN)/mergecli run configs/examples/mnist-mlp8-np-merge.yaml
	$(BIN)/mergecli run configs/examples/mnist-analysis.yaml
	$(BIN)/mergecli run configs/examples/mnist-linear-templates.yaml

runs/resnet20-seed%.safetensors: | $(VENV)/.installed
	$(BIN)/mergecli --log plain train --arch resnet20 --arg in_channels=1 \
		--data mnist:train --eval-data mnist:test --epochs 2 --seed $* --out $@

# BatchNorm networks: align (activation matching), average, recompute the BN statistics;
# under a minute on a quiet 2-core machine (README, "The demo", has the measured time).
demo-resnet: $(VENV)/.installed runs/resnet20-seed0.safetensors runs/resnet20-seed1.safetensors
	$(BIN)/mergecli run configs/examples/mnist-resnet20-reset-bn.yaml

# Small MNIST companions of the configs/papers/ recipes (README, "The papers' settings"): the
# papers' optimiser (SGD, momentum 0.9, weight decay 5e-4, one-cycle, label smoothing) at a
# width and length a 2-core CPU trains in minutes. CIFAR-sized runs want a GPU.
PAPER_SGD = --optimizer sgd --weight-decay 5e-4 --schedule onecycle --label-smoothing 0.1 --epochs 3

runs/papers-mnist-vgg16-seed%.safetensors: | $(VENV)/.installed
	$(BIN)/mergecli --log plain train --arch vgg --arg variant=16 --arg batchnorm=true \
		--arg width=0.25 --arg in_channels=1 --data mnist:train --eval-data mnist:test \
		$(PAPER_SGD) --lr 0.05 --seed $* --out $@

# A class-split pair (digits 0-4 and 5-9), as CIFAR-100's 50/50 split.
runs/papers-mnist-r20-classes%.safetensors: | $(VENV)/.installed
	$(BIN)/mergecli --log plain train --arch resnet20 --arg shortcut=conv1x1 --arg in_channels=1 \
		--data mnist:train --split classes:$* $(PAPER_SGD) --lr 0.1 \
		--seed $(if $(filter 0-4,$*),0,1) --out $@

# A class-biased pair of the demo's MLP from different seeds (issue 20): model A keeps digits 0-4
# in full and 10% of 5-9, model B the reverse (ZipIt!'s and NP Merge's biased splits); about 20 s
# each on 2 cores. configs/examples/mnist-biased-np-merge.yaml merges them (about a minute).
BIASED = runs/mlp8-biased0-4.safetensors runs/mlp8-biased5-9.safetensors
BIASED_TRAIN = $(BIN)/mergecli --log plain train --arch mlp --arg depth=8 --arg hidden=128 \
	--eval-data mnist:test --epochs 10

runs/mlp8-biased0-4.safetensors: | $(VENV)/.installed
	$(BIASED_TRAIN) --data "{source: mnist, split: train, class_fractions: {5-9: 0.1}}" \
		--seed 0 --out $@

runs/mlp8-biased5-9.safetensors: | $(VENV)/.installed
	$(BIASED_TRAIN) --data "{source: mnist, split: train, class_fractions: {0-4: 0.1}}" \
		--seed 1 --out $@

biased-pair: $(BIASED)
	$(BIN)/mergecli run configs/examples/mnist-biased-np-merge.yaml

runs/mlp3-base.safetensors: | $(VENV)/.installed
	$(BIN)/mergecli --log plain train --arch mlp --arg depth=3 --arg hidden=128 \
		--data mnist:0:500 --eval-data mnist:test --epochs 3 --seed 0 --out $@

# Fine-tunes of the base, each on half of the digits (they forget the other half).
FINETUNE = $(BIN)/mergecli --log plain train --arch mlp --arg depth=3 --arg hidden=128 \
	--init runs/mlp3-base.safetensors --eval-data mnist:test --epochs 1 --lr 3e-4

runs/mlp3-ft-digits0-4.safetensors: runs/mlp3-base.safetensors
	$(FINETUNE) --data "{source: mnist, split: train, classes: [0, 1, 2, 3, 4]}" --seed 1 --out $@

runs/mlp3-ft-digits5-9.safetensors: runs/mlp3-base.safetensors
	$(FINETUNE) --data "{source: mnist, split: train, classes: [5, 6, 7, 8, 9]}" --seed 2 --out $@

# Fine-tunes of one base merged without data: TIES beats the base and both fine-tunes.
demo-datafree: $(VENV)/.installed runs/mlp3-ft-digits0-4.safetensors runs/mlp3-ft-digits5-9.safetensors
	$(BIN)/mergecli run configs/examples/mnist-mlp3-ties.yaml

# The language-model demo: a tokenizer and a small Llama pre-trained on English fortunes and
# Python code (data/text/, from scripts/lm_corpus.py), fine-tuned on each; one run of
# scripts/lm_demo.py writes all three model directories and prints their perplexities.

# The script writes perplexity.json last, so it stands for all three directories.
runs/lm/base runs/lm/ft-english runs/lm/ft-code: runs/lm/perplexity.json

runs/lm/perplexity.json: | $(VENV)/.installed
	$(BIN)/python scripts/lm_demo.py --out runs/lm

# Merged without data (average, task arithmetic, TIES), then by NP Merge from two starts.
demo-lm: $(VENV)/.installed runs/lm/perplexity.json
	$(BIN)/mergecli run configs/examples/lm-average.yaml
	$(BIN)/mergecli run configs/examples/lm-task-arithmetic.yaml
	$(BIN)/mergecli run configs/examples/lm-ties.yaml
	$(BIN)/mergecli run configs/examples/lm-np-merge.yaml
	$(BIN)/mergecli run configs/examples/lm-np-merge-ties.yaml

# Issue 19's trained transformer pairs: two copies of BERT (sequence classification of text
# windows), GPT-2, Llama and ViT (MNIST) from seeds 0 and 1, as model directories
# runs/transformers/<arch>-seed<k> (scripts/transformer_pairs.py; a few CPU minutes in all). The
# script writes runs/transformers/<arch>.json last, so it stands for the pair; the recipes
# configs/examples/transformers-<arch>.yaml merge them.
TRANSFORMER_ARCHS = bert gpt2 llama vit

runs/transformers/%.json: | $(VENV)/.installed
	$(BIN)/python scripts/transformer_pairs.py --out runs/transformers --only $*

transformer-pairs: $(foreach arch,$(TRANSFORMER_ARCHS),runs/transformers/$(arch).json)

# Every figure the README quotes: trains the demo checkpoints that are missing, runs the example
# recipes into out/figures/, writes figures/figures.json (machine, threads) and the README's values.
figures: $(VENV)/.installed runs/lm/perplexity.json runs/mlp8-seed0.safetensors runs/mlp8-seed1.safetensors \
		runs/linear-seed0.safetensors runs/linear-seed1.safetensors \
		runs/resnet20-seed0.safetensors runs/resnet20-seed1.safetensors \
		runs/mlp3-ft-digits0-4.safetensors runs/mlp3-ft-digits5-9.safetensors \
		runs/papers-mnist-vgg16-seed0.safetensors runs/papers-mnist-vgg16-seed1.safetensors \
		runs/papers-mnist-r20-classes0-4.safetensors runs/papers-mnist-r20-classes5-9.safetensors \
		$(BIASED) $(foreach arch,$(TRANSFORMER_ARCHS),runs/transformers/$(arch).json)
	$(BIN)/python scripts/figures.py

test: $(VENV)/.installed
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts
	$(BIN)/pytest -n auto --maxprocesses 4 --dist loadfile

bench: $(VENV)/.installed
	$(BIN)/python bench/cli_startup.py
	$(BIN)/python bench/weight_matching.py
	OMP_NUM_THREADS=1 $(BIN)/python bench/rebasin_reference.py
	$(BIN)/python bench/fit_step.py

# mergekit 0.1.5 in .venv-mergekit (its own environment), same merges, tensors compared.
parity: $(VENV)/.installed
	$(BIN)/python bench/mergekit_parity.py --mergekit-venv .venv-mergekit

clean:
	rm -rf $(VENV) runs out .pytest_cache
