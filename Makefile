# muonreg: `make train` and `make test` are all a fresh machine needs.
# GPU users pick their torch build, e.g.
#   make install TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
ARGS ?=

.PHONY: install data root-data pipeline train hit-filter sweep ablation search compare predict export display ui test test-fast lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) $(TORCH) 2>&1 | grep -v "is ignored: it is neither" || true
	$(PIP) -e ".[dev]" 2>&1 | grep -v "is ignored: it is neither" || true
	$(PY) -c "import torch, hydra, mlflow, h5py, muonreg"
	touch $(STAMP)

install: $(STAMP)

data: install
	$(PY) -m muonreg.prepare default $(ARGS)

root-data: install  # ATLAS ROOT hit dumps -> HDF5, e.g. make root-data ARGS="--input ntuples/ --output data/filter --workers 8"
	$(PY) -m muonreg.prepare root $(ARGS)

# The whole ATLAS chain at HL-LHC pile-up (PIPELINE is rebuilt from scratch): ROOT dumps with pile-up ->
# filter dataset -> hit filter -> tracking dataset (simulated events the filter never saw, kept at its
# stored cut) -> tracker -> a per-stage summary (python -m muonreg.pipeline PIPELINE).
PIPELINE ?= pipeline
PILEUP ?= 200
FILTER_EVENTS ?= 2000
TRACKER_EVENTS ?= 30000
FILTER_ARGS ?=
TRACKER_ARGS ?=
pipeline: install
	rm -rf $(PIPELINE)
	$(PY) -m muonreg.data.simulate_cli --format root --events $(FILTER_EVENTS) --files 4 --pileup $(PILEUP) --out $(PIPELINE)/ntuples
	$(PY) -m muonreg.prepare root --input $(PIPELINE)/ntuples --output $(PIPELINE)/filter_data --workers 2 --uncompressed
	$(PY) train.py +experiment=hit_filter data.path=$(PIPELINE)/filter_data \
		tracking.experiment=pipeline hydra.run.dir=$(PIPELINE)/filter_run $(FILTER_ARGS)
	$(PY) -m muonreg.prepare filter --checkpoint $(PIPELINE)/filter_run/checkpoints/best.pt --working-point 0.99 \
		--max-hits 600 --max-tracks 2 --simulate $(TRACKER_EVENTS) --pileup $(PILEUP) --seed 1 --output $(PIPELINE)/tracking_data
	$(PY) train.py data.path=$(PIPELINE)/tracking_data tracking.experiment=pipeline hydra.run.dir=$(PIPELINE)/tracker_run $(TRACKER_ARGS)
	$(PY) -m muonreg.pipeline $(PIPELINE)

train: data
	$(PY) train.py $(ARGS)

hit-filter: install  # the hit filter on simulated pile-up-200 events (~7 260 hits, 0.7 % of muons)
	$(PY) train.py +experiment=hit_filter $(ARGS)

sweep: data  # the assignment-threshold study
	$(PY) train.py -m +experiment=threshold_sweep $(ARGS)

ablation: data  # the momentum target: q/pT, 1/pT + q or pT
	$(PY) train.py -m +experiment=inverse_pt_ablation $(ARGS)

search: data  # Optuna hyperparameter search; the same command again continues it
	$(PY) train.py -m +experiment=search $(ARGS)

compare: install  # table and plots of the latest sweep, from MLflow
	$(PY) -m muonreg.compare $(ARGS)

predict: install  # e.g. make predict ARGS="--run-id ID --out pred.h5" (python -m muonreg.predict --help)
	$(PY) -m muonreg.predict $(ARGS)

export: install  # e.g. make export ARGS="--run-id ID --out model.onnx" (python -m muonreg.export --help)
	$(PY) -m muonreg.export $(ARGS)

display: install  # e.g. make display ARGS="--run-id ID --event 3" (python -m muonreg.display --help)
	$(PY) -m muonreg.display $(ARGS)

ui: install  # MLflow UI on the project database: http://127.0.0.1:5000
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --port 5000

# The suite on TEST_WORKERS pytest-xdist processes (one per core: each test keeps to one thread), the
# slowest tests named at the end; ARGS="-n 0" runs it in this process, e.g. to debug one test.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=15

test: install
	$(PYTEST) $(ARGS)

test-fast: install
	$(PYTEST) -m "not slow" $(ARGS)

lint: install
	$(VENV)/bin/ruff check muonreg hydra_plugins tests bench train.py
	$(VENV)/bin/ruff format --check muonreg hydra_plugins tests bench train.py

bench: install
	$(PY) bench/simulator_throughput.py
	$(PY) bench/root_prepare_throughput.py
	$(PY) bench/fit_resolution.py
	$(PY) bench/loader_throughput.py --workers 0
	$(PY) bench/loader_throughput.py --workers 2
	$(PY) bench/pooling_memory.py
	$(PY) bench/train_throughput.py
	$(PY) bench/reliability.py concurrent --jobs 8
	$(PY) bench/reliability.py kill --trials 4
	$(PY) bench/reliability.py chaos --jobs 16 --kills 8

clean:
	rm -rf outputs multirun pipeline bench/out .pytest_cache .ruff_cache
