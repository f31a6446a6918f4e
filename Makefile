# Two commands: `make demo` (install, start the embedded broker, run the
# quickstart notebook headless) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

CHROMIUM ?= /usr/bin/chromium

.PHONY: demo test install lint proto bench clean chromium labextension postgresql

# The editable install also builds the JupyterLab extension (labextension/,
# through hatch-jupyter-builder: node and the npm registry) and installs it
# and the server extension's enable file into the venv.
$(STAMP): pyproject.toml labextension/package.json
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first: a bare requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/run_notebook.py examples/quickstart.ipynb

# The lab extension's node packages (eslint, prettier, jest among them).
LABNODE := labextension/node_modules/.yarn-state.yml
$(LABNODE): labextension/package.json labextension/yarn.lock
	cd labextension && PATH="$(abspath $(VENV))/bin:$$PATH" jlpm install
	touch $(LABNODE)

lint: $(STAMP) $(LABNODE)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	cd labextension && PATH="$(abspath $(VENV))/bin:$$PATH" jlpm lint

# Rebuild the JupyterLab extension after editing labextension/src, and
# reinstall so the venv's copy (share/jupyter/labextensions) is the new one.
labextension: $(STAMP)
	cd labextension && PATH="$(abspath $(VENV))/bin:$$PATH" jlpm install && \
	  PATH="$(abspath $(VENV))/bin:$$PATH" jlpm build:prod
	$(PY) -m pip install --quiet --no-deps -e .

# The browser test drives Debian's chromium (never a downloaded browser).
chromium:
	@if [ ! -x $(CHROMIUM) ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else \
	    echo "no $(CHROMIUM): the browser test is skipped (apt-get install chromium as root)"; \
	  fi; \
	fi

# The store tests start their own PostgreSQL server (tests/pg.py: initdb and
# pg_ctl in a temporary folder) from Debian's binaries in /usr/lib/postgresql.
postgresql:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; \
	  else \
	    echo "no PostgreSQL server binaries: the PostgreSQL tests fail (apt-get install postgresql as root)"; \
	  fi; \
	fi

# JupyterHub's proxy, for the identity test under a real Hub (npm, kept in the tree).
CHP := .ci-node/node_modules/.bin/configurable-http-proxy
$(CHP):
	npm install --silent --no-audit --no-fund --prefix .ci-node configurable-http-proxy@5

# The tests run in TEST_WORKERS processes (pytest-xdist), a file's tests in one
# of them (--dist loadfile), the files in collection order: tests/conftest.py
# puts the longest first. Each test process has its own PostgreSQL server and
# state folder; `make test TEST_WORKERS=0` runs them in this process, in order.
TEST_WORKERS ?= 2

test: $(STAMP) lint chromium postgresql $(CHP)
	cd labextension && PATH="$(abspath $(VENV))/bin:$$PATH" jlpm test
	$(PY) -m pytest -q -ra -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Ibroker --python_out=broker --pyi_out=broker \
	  --grpc_python_out=broker broker/gpuattach_broker/protos/gpuattach.proto

bench: $(STAMP)
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) .demo test-artifacts
