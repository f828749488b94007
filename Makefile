PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench wheel clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	# xds-protos ships an old copy of the OpenTelemetry protos in the same files (opentelemetry/proto/...):
	# whichever installs last wins. Put opentelemetry-proto's (a superset) back, as the trace test's receiver needs.
	$(BIN)/python -m pip install -q --force-reinstall --no-deps opentelemetry-proto
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/crosslogic up --demo

test: $(STAMP)
	$(BIN)/ruff check crosslogic tests bench
	sh scripts/ensure_browser.sh
	$(BIN)/python -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check crosslogic tests bench

# The package as users install it: `pip install dist/crosslogic-*.whl[server]` (control plane) or `[agent]`.
wheel: $(STAMP)
	$(BIN)/python -m pip wheel --no-deps -w dist .

bench: $(STAMP)
	$(BIN)/python bench/gateway_overhead.py
	$(BIN)/python bench/limiter.py
	$(BIN)/python bench/scheduler.py
	$(BIN)/python bench/ledger.py
	$(BIN)/python bench/cpu_per_request.py
	$(BIN)/python bench/fleet.py
	$(BIN)/python bench/observe_overhead.py
	$(BIN)/python bench/scaleout.py

clean:
	rm -rf $(VENV) .state dist build
