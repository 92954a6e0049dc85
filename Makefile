# planforge: `make engine MODEL=resnet18` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL ?= resnet18
PRECISION ?= fp32
OUT ?=
CALIB ?=
ARGS ?=

.PHONY: engine test corpus bench bench-int8 venv zoo clean

# torch is installed first and pinned: its CPU wheel is local; an unpinned resolve pulls CUDA builds.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

engine: venv
	$(BIN)/planforge build $(MODEL) --precision $(PRECISION) $(if $(OUT),-o $(OUT)) $(if $(CALIB),--calib $(CALIB)) $(ARGS)

test: venv
	$(BIN)/python -m pytest -q -n 2

# Counts for the peer corpus (ONNX's backend cases through both pipelines); also part of `make test`.
corpus: venv
	$(BIN)/python tests/corpus.py 2>/dev/null | grep -v '^\[W\]'

# Pass benchmark on ONNX Runtime CPU for every zoo model (or MODELS="mlp bert_tiny").
bench: venv
	$(BIN)/planforge bench $(MODELS)

# INT8 on ONNX Runtime CPU against quantize_static (digits_cnn, resnet18, bert_tiny, or MODELS=...).
bench-int8: venv
	$(BIN)/planforge bench --int8 $(MODELS)

zoo: venv
	$(BIN)/planforge zoo

clean:
	rm -rf build .pytest_cache
