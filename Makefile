# Two commands do everything on a fresh machine:
#   make book   set up .venv and build the HTML book into _build/html
#   make test   set up .venv and run every check (what CI runs)
#   make kernels  every notebook again, computing as another CPU would (CI runs it too)
# Others: make lab (JupyterLab for the exercises), make notebooks (re-execute and
# re-generate after editing a chapter), make exercises (regenerate exercises/ only),
# make gpu (the GPU run, scripts/gpu_check.sh; a CPU rehearsal where there is no GPU).

PYTHON ?= python3
# TORCH=cpu (make book TORCH=cpu, make test TORCH=cpu): take torch's CPU build, the same
# version, from PyTorch's index (about 200 MB) instead of PyPI's Linux build, which brings
# CUDA (about 5 GB). The printed numbers are the same. After switching, `make clean` first.
TORCH ?= pypi
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup book test kernels matrix lab notebooks exercises fork gpu clean

setup: $(STAMP)

# Re-install whenever the pins or the package metadata change.
$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
ifeq ($(TORCH),cpu)
	$(BIN)/python -m pip install --quiet --no-deps --index-url $(TORCH_CPU_INDEX) "$$(grep '^torch==' requirements.txt)"
endif
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python scripts/fetch_mathjax.py
	touch $(STAMP)

# Outputs come from the committed notebooks (execution is off in _config.yml);
# warnings are errors, so a broken reference or citation fails the build.
book: $(STAMP)
	$(BIN)/jupyter-book build . --warningiserror --nitpick --keep-going
	@echo "The book is at file://$(CURDIR)/_build/html/index.html"

# The unit tests, then every notebook as Colab runs it: the wheel installed apart from
# the checkout, the notebooks copied to an empty folder, nbval on book/ and solutions/,
# and exercises/ run until their stubs.
test: $(STAMP)
	$(BIN)/python -m pytest
	$(BIN)/python scripts/nbval_installed.py

# The book and the solutions again under another CPU's arithmetic: PyTorch's, MKL's and
# oneDNN's AVX2 kernels on one thread (lora_edu.numerics.KERNEL_PATHS), two notebooks at
# a time. A printed number that changes here is one a reader's machine may not reproduce.
# CI runs it after make test; `make kernels KERNEL_PATH=no-vectors WORKERS=1` takes another.
KERNEL_PATH ?= avx2-1-thread
WORKERS ?= 2
kernels: $(STAMP)
	$(BIN)/python scripts/nbval_installed.py --kernel-path $(KERNEL_PATH) --workers $(WORKERS) \
		$(wildcard book/*.ipynb solutions/*.ipynb)

# The unit tests on every other Python version the project claims that this machine has
# (pyproject.toml's classifiers), each in its own .venv-3.X with torch's CPU build. CI runs
# it after make test.
matrix:
	bash scripts/python_matrix.sh

lab: $(STAMP)
	$(BIN)/jupyter lab exercises/

# After editing a chapter: stamp Colab cells, execute book/ and solutions/ in place
# (outputs are what nbval checks), then regenerate exercises/ from solutions/.
notebooks: $(STAMP)
	$(BIN)/python scripts/sync_notebooks.py
	$(BIN)/python scripts/execute_notebooks.py book solutions
	$(BIN)/python scripts/sync_notebooks.py

exercises: $(STAMP)
	$(BIN)/python scripts/sync_notebooks.py

# A fork: `make fork REPO=https://github.com/you/lora-edu` restamps every badge, setup cell,
# install and clone line from the one place that names the repository, _config.yml.
fork: $(STAMP)
	$(BIN)/python scripts/sync_notebooks.py --repository $(REPO)

# On a GPU machine without internet, run `bash scripts/gpu_check.sh` with the system's Python
# instead (scripts/GPU.md says how); this target is for a GPU machine where make works.
gpu: $(STAMP)
	PYTHON=$(BIN)/python bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) .venv-3.* _build gpu_results
