# freshrec — one page of targets. A fresh machine needs only Python 3.11+ and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DATA   ?= data
STAMP  := $(VENV)/.installed
STUBS  := recsys/v1/events_pb2.py
PROTOS := $(wildcard protos/recsys/v1/*.proto)

.PHONY: install proto serve serve-cluster demo test lint bench bench-cluster eval clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

$(STUBS): $(PROTOS) $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=. --grpc_python_out=. \
		--pyi_out=. $(PROTOS)

proto: $(STAMP)  ## regenerate the gRPC stubs (git-ignored) from protos/
	rm -f recsys/v1/*_pb2*.py recsys/v1/*_pb2*.pyi
	$(MAKE) --no-print-directory $(STUBS)

serve: $(STUBS)  ## build the demo data on first run, then serve (Ctrl-C stops)
	DATA=$(DATA) bin/serve

serve-cluster: $(STUBS)  ## the log mode: 3 NATS nodes, 3 workers, front end, ranking
	DATA=$(DATA) bin/serve-cluster

demo: $(STUBS)  ## the demo page over a running `make serve`: http://127.0.0.1:8080/?user=alice
	$(BIN)/python examples/demo_app.py

test: $(STUBS)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STUBS)
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(STUBS)
	$(BIN)/python -m bench.run $(if $(QUICK),--quick)

bench-cluster: $(STUBS)  ## the log mode under faults, and ingest with 1-3 workers
	$(BIN)/python -m bench.cluster $(if $(QUICK),--quick)

eval: $(STUBS)
	$(BIN)/python -m bench.eval

clean:
	rm -rf $(VENV) recsys/v1/*_pb2*.py recsys/v1/*_pb2*.pyi .pytest_cache .mypy_cache \
		.ruff_cache .hypothesis *.egg-info
