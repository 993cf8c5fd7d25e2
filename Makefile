# The two commands of the README: `make demo` and `make test`. Both create the
# virtual environment when it is missing and install the project into it;
# a stamp file makes the install step a no-op until pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.grpo-installed

.PHONY: install demo test lint bench clean-runs

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[cpu,dev]'
	@# vLLM's CPU build pulls these from PyPI; they break beside its torch (DESIGN.md).
	$(PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
	@touch $(STAMP)

demo: install
	$(VENV)/bin/grpo arithmetic prepare
	$(VENV)/bin/grpo train examples/arithmetic/process.yaml --set checkpoint.resume=never \
		--set train.mode=async

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: install
	$(PY) -m bench.run_all

clean-runs:
	rm -rf runs
