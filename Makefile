# Two entry points: `make demo` and `make test`. Each sets up .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS ?= dev,data,train,serve,ui,sface,insightface,onnx,lora
PHOTOS ?=
# Two pytest-xdist workers keep both cores busy while the other waits on a subprocess or Ray
# (whole modules per worker, slowest first as tests/conftest.py orders them, not by their number of
# tests: --no-loadscope-reorder); TEST_WORKERS=0 runs one process.
TEST_WORKERS ?= 2

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[$(EXTRAS)]'
	# MTCNN's weights (MIT) for the small-face pass; --no-deps: the package pins an old torch.
	$(PY) -m pip install --quiet --no-deps 'facenet-pytorch==2.6.0'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ray-faceid demo $(if $(PHOTOS),--photos $(PHOTOS),) $(if $(PORT),--port $(PORT),)

test: $(STAMP)
	$(PY) -m pytest -q -ra --durations=30 -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder

bench: $(STAMP)  # each script appends its results to benchmarks/BENCHMARKS.md; gpu_check.py needs a GPU
	$(PY) benchmarks/face_throughput.py
	$(PY) benchmarks/pipeline_overhead.py
	$(PY) benchmarks/few_step.py
	$(PY) benchmarks/ingest_scaling.py
	$(PY) benchmarks/serve_load.py
	$(PY) benchmarks/personalize_throughput.py
	$(PY) benchmarks/render_throughput.py
	$(PY) benchmarks/unet_backends.py
	$(PY) benchmarks/cluster_quality.py
	$(PY) benchmarks/group_faces.py
	$(PY) benchmarks/cluster_scaling.py --sizes 10000,100000

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
