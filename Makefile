# Two commands do all setup on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

.PHONY: install system-deps demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[train,export,dev]'
	touch $(STAMP)

install: $(STAMP) system-deps

# Mosquitto is needed by the telemetry tests and the demo's private broker.
system-deps:
	@command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || { \
	  echo "installing mosquitto (Debian package)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq mosquitto >/dev/null \
	  || { echo "ERROR: could not install mosquitto; the telemetry tests need it"; exit 1; }; }

demo: install
	$(VENV)/bin/edgeadapt demo --out reports/demo

test: install
	$(VENV)/bin/ruff check runtime training export devices tests
	$(VENV)/bin/ruff format --check runtime training export devices tests
	$(PY) -m pytest -q -p no:cacheprovider; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "ERROR: pytest collected no tests"; exit 1; fi; exit $$rc

lint: $(STAMP)
	$(VENV)/bin/ruff check --fix runtime training export devices tests
	$(VENV)/bin/ruff format runtime training export devices tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
