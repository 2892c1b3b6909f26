PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test bench bench-gpu figures experiment clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch torchvision
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/layerlie e2e resnet18 --n 4
	$(BIN)/layerlie report resnet18 --n 2 --out report.html
	@echo "the report of resnet18 is $(CURDIR)/report.html; open it in a browser"

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(BIN)/python benchmarks/e2e.py
	$(BIN)/python benchmarks/layers.py
	$(BIN)/python benchmarks/ablation.py
	$(BIN)/python benchmarks/sweep.py
	$(BIN)/python benchmarks/scaling.py
	$(BIN)/python benchmarks/profile_ops.py

# on a machine with a GPU; under 5 minutes
bench-gpu: $(STAMP)
	$(BIN)/python benchmarks/gpu.py

# the committed figures/: random-init models on this CPU; --resume goes on after a kill
figures: $(STAMP)
	$(BIN)/layerlie sweep sweeps/paper-cpu.toml --store out/paper-cpu --resume
	$(BIN)/layerlie figures out/paper-cpu --out figures/

# figures/learned/: small models trained on this CPU (~15-25 min); --resume goes on after a kill.
# One thread: these small tensors ran ~30x slower with two OpenMP threads on a busy 2-core machine.
experiment: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/layerlie experiment learned-equivariance --store out/learned --out figures/learned --resume

clean:
	rm -rf $(VENV)
