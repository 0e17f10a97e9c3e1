# `make test`, `make data` and `make demo` bootstrap .venv from requirements.txt when it is
# missing or older than requirements.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test data demo venv clean-data

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

# `make compare`: the preset grid of tools/experiment.py (strategies against random, CE against
# boost_soft under annotator noise), sized in configs/compare.yaml's comments for at most 90 minutes
# on a 2-core CPU with both cores (README, "Comparing strategies"): COMPARE_JOBS rounds at once, one
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
