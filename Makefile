# animeai: the two commands are `make demo` (install + end-to-end demo) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch/torchvision are installed first, pinned to the release this project is tested with.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= dev,ray
DEMO_DATA ?= data/demo_characters
DEMO_MODEL ?= models/demo_classifier.pth

.PHONY: install demo test test-slow bench lint clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(BIN)/.installed

demo: install
	@test -d $(DEMO_DATA) || $(BIN)/animeai synth $(DEMO_DATA) --num-classes 6 --images-per-class 60 --image-size 128 --val-fraction 0.25
	$(BIN)/animeai train detector --config animeai/configs/demo.yaml --data $(DEMO_DATA) --out $(DEMO_MODEL) --overwrite
	$(BIN)/animeai evaluate --model $(DEMO_MODEL) --data $(DEMO_DATA) --out runs/demo_classifier/eval.json
	$(BIN)/animeai predict --model $(DEMO_MODEL) --top-k 3 $(DEMO_DATA)/val/akari/akari_0046.jpg $(DEMO_DATA)/val/botan
	$(BIN)/python jobs/train_detector.py --smoke-test --num-workers 2 --out models/demo_ray_classifier.pth --overwrite
	@echo
	@echo "demo done: model $(DEMO_MODEL); run folder runs/demo_classifier/ (config.yaml, metrics.jsonl, split.json);"
	@echo "evaluation runs/demo_classifier/eval.json + eval_confusion.png;"
	@echo "Ray Train (2 workers, local Ray): models/demo_ray_classifier.pth, checkpoints under runs/ray/"

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

bench: install
	$(BIN)/python tests/benchmarks/bench_engine_overhead.py
	$(BIN)/python tests/benchmarks/bench_inference.py
	$(BIN)/python tests/benchmarks/bench_ray_scaling.py

lint: install
	$(BIN)/ruff check animeai tests jobs

clean:
	rm -rf runs models/demo_classifier.pth models/demo_ray_classifier.pth $(DEMO_DATA) .pytest_cache
