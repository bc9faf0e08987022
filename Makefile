# The two set-up commands of the README: `make demo` and `make test`; each creates .venv if absent.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DATA := data/stdlib

.PHONY: demo test test-all clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

# Prepare the Python standard library's sources (skipped when up to date), show their length
# statistics, then train with 2 data-parallel workers on a local Ray cluster. Run it again to
# resume from the newest checkpoint.
demo: $(STAMP)
	$(BIN)/loom prepare "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')" \
		$(DEMO_DATA) --include '*.py' --exclude 'site-packages/*'
	$(BIN)/loom stats $(DEMO_DATA)
	$(BIN)/loom train configs/train/demo.yaml

test: $(STAMP)
	$(BIN)/pytest -m "not slow"

test-all: $(STAMP)
	$(BIN)/pytest

clean:
	rm -rf runs data
