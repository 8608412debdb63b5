# Two entry points on a fresh machine: `make demo` and `make test`. Both create .venv and install
# what they need; torch is installed first and pinned (an unpinned torch pulls a multi-GB CUDA build).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0
TRITON_VERSION := 3.7.1
TRANSFORMERS_VERSION := 5.23.0
AV_VERSION := 18.1.0
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 2

.PHONY: venv build test test-steps pytest lint cuda-check cuda-build gpu-check gpu-check-venv triton-aot smoke demo demo-text bench bench-net memory-check dryrun niah bench-kernels two-nodes soak clean

$(STAMP): pyproject.toml setup.py
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade setuptools wheel
	# Keep a CUDA torch if one is already there; otherwise the pinned CPU wheel.
	$(VPY) -c "import torch,sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null || \
	  $(VPY) -m pip install -q torch==$(TORCH_VERSION)
	$(VPY) -m pip install -q triton==$(TRITON_VERSION) transformers==$(TRANSFORMERS_VERSION) pytest ruff tqdm \
	  numpy matplotlib ninja av==$(AV_VERSION)
	# A peer for bench_sp_attention.py; --no-deps: it would pull the CUDA flash-attn (a CPU shim serves it).
	$(VPY) -m pip install -q --no-deps ring-flash-attn==0.1.8
	touch $(STAMP)

venv: $(STAMP)

build: $(STAMP)
	$(VPY) -m pip install -q -e . --no-build-isolation --no-deps
	$(VPY) -c "from longvila_engine._extension import require_extension; require_extension(); print('extension: ok')"

lint: $(STAMP)
	$(VENV)/bin/ruff check longvila_engine tests benchmarks scripts examples

cuda-check:
	bash scripts/check_cuda.sh

# The whole extension (bindings included) built with nvcc against a pinned CUDA torch in its own venv
# (build/cuda-venv, ~4.7 GB, kept between runs), imported without a GPU, every op's CUDA kernel checked.
cuda-build:
	PY=$(PY) CUDA_TORCH_VERSION=$(TORCH_VERSION) bash scripts/cuda_build.sh

# On a machine with one CUDA GPU (<= 8 min on an H100/H200): pytest -m gpu, kernel TFLOP/s vs SDPA,
# a bf16 trainer smoke and generate; JSON + markdown under benchmarks/results/gpu_check/. Refuses on CPU.
# Takes $(PY) as it is when its torch is a CUDA build that sees a GPU (nothing installed: a node or
# image without a package index; scripts/gpu_check_system.sh), else .venv when its torch is a CUDA
# build, else the CUDA venv of cuda-build on a copy of the tree.
gpu-check:
	if $(PY) -c "import torch, sys; sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)" 2>/dev/null; then \
	  PY=$(PY) bash scripts/gpu_check_system.sh; \
	else \
	  $(MAKE) --no-print-directory gpu-check-venv; \
	fi

gpu-check-venv: build
	if $(VPY) -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)"; then \
	  $(VPY) scripts/gpu_check.py; \
	else \
	  nvidia-smi -L >/dev/null 2>&1 || { echo "gpu-check: refused, needs a CUDA GPU (nvidia-smi finds none)"; exit 2; }; \
	  $(MAKE) --no-print-directory cuda-build && \
	  TRITON_VERSION=$(TRITON_VERSION) TRANSFORMERS_VERSION=$(TRANSFORMERS_VERSION) AV_VERSION=$(AV_VERSION) \
	    bash scripts/gpu_check_cuda_venv.sh; \
	fi

# Fails on a spill or a serialized wgmma (sm_90); the table also goes to build/aot_table.md.
triton-aot: build
	$(VPY) scripts/aot_triton.py --markdown build/aot_table.md

# Two processes: the Triton-interpreter tests fix triton's mode for their whole process (tests/conftest.py).
pytest: build
	$(VPY) -m pytest -q -x tests
	$(VPY) -m pytest -q -x tests/test_backend_triton.py

# The --smoke size of every benchmark that no test runs (tests/test_bench_*.py run the kernels,
# strategies and MM-SP sharding smokes), so none rots. Results go to the ignored build/smoke-results,
# never into the tracked benchmarks/results/*.jsonl.
SMOKE_RESULTS := build/smoke-results
smoke: build
	mkdir -p $(SMOKE_RESULTS)
	$(VPY) benchmarks/bench_sp_attention.py --smoke --results-dir $(SMOKE_RESULTS)
	$(VPY) benchmarks/projection.py --smoke --out $(SMOKE_RESULTS)/projection.jsonl
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --nproc-per-node 4 examples/sp_attention.py

# Prints its wall time and status at the end, whatever failed.
test:
	@start=$$(date +%s); $(MAKE) --no-print-directory test-steps; rc=$$?; \
	  echo "make test: $$( [ $$rc -eq 0 ] && echo ok || echo FAILED ) in $$(( $$(date +%s) - start )) s wall time"; \
	  exit $$rc

test-steps: build lint cuda-check triton-aot pytest smoke

# The main job: multimodal training from the command line (mp4 clips, frame folders and text rows; tiny
# SigLIP + projector + Qwen2) on 4 CPU ranks in the MM-SP 2D layout vs one process, same data.
demo: build
	$(VPY) -m longvila_engine.cli.demo_vlm

# The text-only trainer: tiny engine Transformer, 4 ranks (ring 2 x ulysses 2) vs one process.
demo-text: build
	$(VPY) -m longvila_engine.cli.demo

# CPU strategies benchmark (4 gloo ranks) and the 256K-2M projection; both print their tables.
bench: build
	$(VPY) benchmarks/bench_strategies.py
	$(VPY) benchmarks/projection.py

# Two emulated nodes (network namespaces + tc-shaped veth); needs root, says SKIPPED otherwise.
bench-net: build
	$(VPY) benchmarks/netns.py --factors 4 16 64 -- --model small --seq-lens 2048 --repeats 3 --no-torch

memory-check: build
	$(VPY) benchmarks/memory_check.py

# Scale dry run: the trainer's step as one rank of a fake world, 3 models x 256K-2M x 8-256 ranks (README table).
dryrun: build
	mkdir -p benchmarks/results
	OMP_NUM_THREADS=1 $(VPY) -m longvila_engine.dryrun --sweep --json benchmarks/results/dryrun.jsonl

# Long-video needle in a haystack: train a tiny VLM on <=16 frames (1 process), then evaluate 8-128
# frames with sequence-parallel prefill + generation on 2 gloo ranks; JSON and heatmap PNG.
niah: build
	mkdir -p build benchmarks/results
	OMP_NUM_THREADS=1 $(VPY) -m longvila_engine.eval.niah --train --steps 800 --threads 1 --save build/niah_model.pt
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --nproc-per-node 2 -m longvila_engine.eval.niah \
	  --load build/niah_model.pt --ring 2 --threads 1 --lengths 8,16,32,64,128,256 --trials 10 \
	  --json benchmarks/results/niah.json --png benchmarks/results/niah.png

# Two emulated nodes (network namespaces), `torchrun --nnodes 2 --rdzv-backend c10d` in each: train,
# a SIGKILLed rank recovered by --max-restarts, a cut link. Needs root, says SKIPPED otherwise.
two-nodes: build
	$(VPY) scripts/two_nodes.py --json benchmarks/results/two_nodes.json

# 500 steps of the tiny model on 4 ranks: RSS and step time every 25 steps (JSON + PNG). Not in `make test`.
soak: build
	$(VPY) benchmarks/soak.py

bench-kernels: build
	$(VPY) benchmarks/bench_kernels.py

clean:
	rm -rf build *.egg-info longvila_engine/*.so longvila_engine/*.so.requires
