# dpo_xpu: `make demo` and `make test` set everything up on a fresh machine (CPU here).
# Intel GPU users install PyTorch's XPU wheels instead of the CPU one:
#   make setup TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/xpu"
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.dpo_xpu-installed
IPEX_VENV ?= .venv-ipex-llm
DEMO_DIR ?= runs/demo
DEMO_MODEL ?= runs/demo-model
export PIP_DISABLE_PIP_VERSION_CHECK=1

.PHONY: setup demo test lint kernel docs ipex-llm-env clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[test,notebooks,docs]"
	@touch $(STAMP)

setup: $(STAMP)

# The main job on the embedded default: the four notebooks, executed by papermill on the tiny ChatML model
# (built offline) and the orca-format sample shipped in dpo_xpu/assets/, on CPU in a few minutes. Leaves the
# executed notebooks in $(DEMO_DIR)/notebooks/ next to the run's metrics, picture and adapter. An earlier demo
# run is moved to $(DEMO_DIR).previous, never silently lost.
demo: setup
	$(BIN)/python scripts/run_notebooks.py --preset demo
	@echo "demo done: executed notebooks, metrics.jsonl, reward_curves.png and adapter/ are in $(DEMO_DIR)/"

lint: setup
	$(BIN)/ruff check dpo_xpu tests scripts benchmarks
	$(BIN)/ruff format --check dpo_xpu tests scripts benchmarks

# The CPU test environment of the ipex-llm backend (ipex-llm 2.2.0, transformers 4.45, TRL 0.11.4).
ipex-llm-env:
	PYTHON=$(PYTHON) bash scripts/make_ipex_llm_venv.sh $(IPEX_VENV)

# The whole suite: the native environment runs everything (ipex-llm tests skip there), then the ipex-llm
# environment runs its backend and the trainer factory on TRL 0.11. pytest's exit code 5 ("no tests
# collected") is not a failure of the project.
IPEX_TESTS := tests/test_backend_ipex_llm.py tests/test_trainer_factory.py tests/test_losses.py
test: setup ipex-llm-env
	@rc=0; \
	$(BIN)/python -m pytest -q -ra tests || rc=$$?; [ $$rc -eq 5 ] && rc=0; \
	echo "== ipex-llm environment ($(IPEX_VENV)): $(IPEX_TESTS)"; \
	$(IPEX_VENV)/bin/python -m pytest -q -ra -p no:cacheprovider $(IPEX_TESTS) || { r=$$?; [ $$r -eq 5 ] || rc=$$r; }; \
	exit $$rc

# The documentation site, built strictly (a broken link or reference fails) into site/.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d site

kernel: setup
	$(BIN)/python -m ipykernel install --user --name dpo-xpu --display-name "Python (dpo_xpu)"

clean:
	rm -rf runs site .pytest_cache .ruff_cache
