# `make run`: create .venv, install, train the embedded default. `make test`: same install, run the tests.
# `make test-fast`: the tests not marked slow. `make lint`: ruff check, ruff format --check, mypy on MYPY_FILES.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PIP    := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt
# Type-checked modules; the list may name files not written yet (they are skipped until they exist).
MYPY_FILES := $(wildcard policies/base.py rollouts/types.py rl/advantages.py rl/losses.py rl/schedules.py rl/dynamic_sampling.py rl/engine.py)

.PHONY: install run test test-fast lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) "torch==2.13.0"
	$(PIP) -e ".[test,bench]"
	@# s3prl (WavLM for the speaker-similarity reward) declares torchaudio, which must not come in: no deps.
	$(PIP) --no-deps "s3prl==0.4.18"
	@# voxcpm (the released VoxCPM2 code, a test reference) declares torchaudio, gradio, ...: no deps; its model
	@# modules need only einops, pydantic, librosa, tqdm, safetensors, transformers (all installed above).
	$(PIP) --no-deps "voxcpm==2.0.3"
	@# torchaudio from PyPI is a CUDA build that breaks CPU installs; refuse it.
	$(BIN)/python -c "import importlib.util, sys; sys.exit('torchaudio must not be installed' if importlib.util.find_spec('torchaudio') else 0)"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/ttsrl train
	$(BIN)/ttsrl plot runs/tiny

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy $(MYPY_FILES)

clean:
	rm -rf $(VENV)
