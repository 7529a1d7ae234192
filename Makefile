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
	$(PIP) install -q -e '.[train,export,dev,dashboard,postgres,mcap,bench,ray]'
	touch $(STAMP)

install: $(STAMP) system-deps

# Debian packages the tests run for real: mosquitto (telemetry broker, demo), postgresql (the
# collector's server store), chromium + chromium-driver (the dashboard's browser test).
system-deps:
	@missing=""; \
	{ command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; } || missing="$$missing mosquitto"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	[ -x /usr/bin/chromedriver ] || missing="$$missing chromium-driver"; \
	[ -z "$$missing" ] || { \
	  echo "installing$$missing (Debian packages)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null \
	  || { echo "ERROR: could not install$$missing; the telemetry and dashboard tests need them"; exit 1; }; }

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
