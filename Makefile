# make train / make test do the whole set-up: a .venv with the project and its dev tools.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install train test test-fast lint bench mlflow-ui clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# extra overrides: make train ARGS="trainer.max_epochs=10 model.latent_dim=2"
train: $(STAMP)
	$(PY) -m vae_lightning.train $(ARGS)

test: $(STAMP)
	$(PY) -m ruff check vae_lightning tests benchmarks
	$(PY) -m pytest $(ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check vae_lightning tests benchmarks
	$(PY) -m ruff format --check vae_lightning tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/epoch_speed.py $(ARGS)

# the MLflow UI over the runs logged with logger=mlflow (or many): http://127.0.0.1:5000
mlflow-ui: $(STAMP)
	$(VENV)/bin/mlflow server --backend-store-uri sqlite:///$(abspath logs)/mlflow.db --host 127.0.0.1 --port 5000 --workers 1

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
