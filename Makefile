# animeai: the two commands are `make demo` (install + end-to-end demo) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch/torchvision are installed first, pinned to the release this project is tested with.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= dev,ray,online,serve,export,fusion,cloud
DEMO_DATA ?= data/demo_characters
DEMO_MODEL ?= models/demo_classifier.pth

.PHONY: install demo test test-slow bench lint clean

$(BIN)/.installed: pyproject.toml Makefile
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
	@echo "== generator: draw 'akari', guided by the detector (the original design's flags; tiny 32 px CPU setting)"
	$(BIN)/python jobs/generate_from_detection.py --target_class akari --num_epochs 20 --detection_model $(DEMO_MODEL) \
	    --data $(DEMO_DATA) --image-size 32 --perceptual efficientnet_lite0 --perceptual-pretrained package \
	    --disc-pretrained package --sample-every 10 --eval-every 5 --samples-dir generated_images --no-progress \
	    --out models/demo_generator_akari.pth --run-dir runs/demo_generator_akari --overwrite
	$(BIN)/animeai generate --model models/demo_generator_akari.pth --n 16 --seed 0 --out generated_images/demo_akari_grid.png
	@echo "== one generator per character, concurrently on a local Ray (smoke test)"
	$(BIN)/python jobs/train_generators.py --smoke-test
	@echo "== online learning: add a 7th character ('hana') to the detector without retraining (FAISS database)"
	@test -d data/demo_new || $(BIN)/animeai synth data/demo_new --num-classes 7 --images-per-class 12 --image-size 128
	rm -rf data/demo_feature_db
	$(BIN)/animeai enroll --model $(DEMO_MODEL) --db data/demo_feature_db --data $(DEMO_DATA) > /dev/null
	$(BIN)/animeai add-role --model $(DEMO_MODEL) --db data/demo_feature_db --name hana --save-model models/demo_updated.pth \
	    data/demo_new/hana/hana_0001.jpg data/demo_new/hana/hana_0002.jpg data/demo_new/hana/hana_0003.jpg \
	    data/demo_new/hana/hana_0004.jpg data/demo_new/hana/hana_0005.jpg
	$(BIN)/animeai predict --model models/demo_updated.pth --top-k 2 data/demo_new/hana/hana_0011.jpg data/demo_new/hana/hana_0012.jpg
	@echo "== fusion: image + tags (captioned characters; offline MiniLM text encoder; image encoder frozen, 64 px)"
	@test -d data/demo_captioned || $(BIN)/animeai synth data/demo_captioned --num-classes 4 --images-per-class 24 \
	    --image-size 64 --val-fraction 0.25 --captions
	$(BIN)/animeai train fusion --data data/demo_captioned --image-size 64 --model efficientnet_lite0 --pretrained package \
	    --freeze-image --text-encoder all-minilm-l6-v2 --text-pretrained package --epochs 8 --lr 3e-3 --batch-size 16 \
	    --loader-workers 0 --no-progress --out models/demo_fusion.pth --overwrite
	@echo "== the same picture of 'akari' (her look-alike 'botan' differs only by a tag) with two texts"
	$(BIN)/animeai predict --model models/demo_fusion.pth --top-k 2 --text "purple_hair, glasses, idol" \
	    --text "purple_hair, glasses, swordswoman" data/demo_captioned/val/akari/akari_0019.jpg \
	    data/demo_captioned/val/akari/akari_0019.jpg
	@echo
	@echo "demo done: model $(DEMO_MODEL); run folder runs/demo_classifier/ (config.yaml, metrics.jsonl, split.json);"
	@echo "evaluation runs/demo_classifier/eval.json + eval_confusion.png;"
	@echo "Ray Train (2 workers, local Ray): models/demo_ray_classifier.pth, checkpoints under runs/ray/;"
	@echo "generator: models/demo_generator_akari.pth, sample grids generated_images/akari/samples_epoch_X.png,"
	@echo "  generated_images/demo_akari_grid.png; per-character generators on Ray: see the summary table above;"
	@echo "online learning: data/demo_feature_db (FAISS), models/demo_updated.pth (7 classes);"
	@echo "fusion: models/demo_fusion.pth (image + tags), run folder runs/demo_fusion/"

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
	rm -rf runs models/demo_classifier.pth models/demo_ray_classifier.pth models/demo_generator_akari.pth \
	    models/demo_updated.pth models/generators $(DEMO_DATA) data/demo_new data/demo_feature_db generated_images .pytest_cache \
	    models/demo_fusion.pth data/demo_captioned
