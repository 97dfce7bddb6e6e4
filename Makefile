# Two commands do everything on a fresh machine:  `make run` (the main job)  and  `make test` (the test suite).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# MODEL: a Hugging Face id or local directory for every target (default: each script's, SmolLM2-135M-Instruct), e.g.
# `make report MODEL=meta-llama/Llama-3.2-1B-Instruct` (gated: `huggingface-cli login` or HF_TOKEN first).
MODEL  ?=
MODEL_FLAG = $(if $(MODEL),--model $(MODEL))
# SYSTEM_TORCH=1: the venv sees the machine's own torch (--system-site-packages) and installs everything else, e.g.
# an NGC container's CUDA build on a GH200 (aarch64), which PyPI's pinned CPU torch would otherwise shadow.
SYSTEM_TORCH ?= 0
# Processes for torchrun: one per visible GPU, or two one-thread processes on a CPU.
NPROC  ?= $(shell $(PY) -c "import torch; print(torch.cuda.device_count() or 2)" 2>/dev/null || echo 2)

.PHONY: setup run report speedup speedup-train speedup-sweep heldout test clean

$(STAMP): requirements.txt requirements-assets.txt
ifeq ($(SYSTEM_TORCH),1)
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import platform, torch; print('using the system torch', torch.__version__, 'on', platform.machine(), \
		'cuda' if torch.cuda.is_available() else 'no cuda')"
	grep -v '^torch==' requirements.txt > $(VENV)/requirements-without-torch.txt
	$(PY) -m pip install -q -r $(VENV)/requirements-without-torch.txt
else
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
endif
	$(PY) -m pip install -q --no-deps -r requirements-assets.txt
	touch $(STAMP)

setup: $(STAMP)

# make run's first demo: --draft auto (prompt lookup, recycled predictions and the untrained exit, chosen each cycle by
# the measured step costs) on a prompt that hands over a text, where the reply copies from it; accepted drafts are
# marked by source ({lookup}, |recycled|, [exit]).
RUN_PROMPT ?= Rewrite this paragraph so that a child can read it, keeping its sentences: The lighthouse keeper climbed \
the one hundred and twelve stairs every evening at dusk. He lit the great lamp, wound the clockwork that turned it, \
and wrote the wind, the sea and the passing ships in his logbook before he slept.

# The main job: the user's report in small, where it pays first (about 8 min on a fresh clone with the install, 2 idle
# cores, AMD EPYC; measured figures in docs/results.md): one prompt drafted by --draft auto and verified (drafted
# tokens marked by source, its speed beside autoregressive), then `make report` with one shallow exit trained 30
# steps, the layer scan, gamma 1 and 4, and every draft source on ShareGPT's given-text prompts and on
# edit_prompts.jsonl (texts handed over to be edited, whose reply repeats them: where lookup pays), 2 prompts x 48
# tokens a cell. Its last line is the best lossless cell, naming its source.
# Output: out/run/REPORT.md. Its figures are too small to conclude from: `make report` is the run to read.
run: setup
	$(PY) scratch_work.py $(MODEL_FLAG) --no_color --max_new_tokens 64 --draft auto --gamma 4 "$(RUN_PROMPT)"
	$(MAKE) --no-print-directory report REPORT=out/run REPORT_LAYERS="4" REPORT_GRID="4" \
		REPORT_SCAN=4:26:11 REPORT_GAMMAS="1 4" REPORT_STEPS=30 REPORT_LSTSQ=8 REPORT_EVAL=30 REPORT_VAL=2 \
		REPORT_PROMPTS=2 REPORT_TOKENS=48 REPORT_TF=2 REPORT_SETS="sharegpt:given_text edit_prompts.jsonl" \
		REPORT_SOURCES="exit lookup exit+lookup auto" REPORT_SOURCE_GAMMAS=4 REPORT_SOURCE_TEMPS="0 0.7" REPORT_SOURCE_WIDTHS=1

# The user's report (docs/findings.md is one run of it): (a) train exits at layers spanning the depth in one run
# (train.py --exit_layers: one pass of the frozen base per step feeds them all; two processes x one thread), (b) the
# layer scan: untrained exits every 3 layers and the trained ones, gamma 4, T 0.7, top_p 0.95, with the teacher-forced
# per-layer curves, (c) the gamma grid: an early, a mid and a late trained exit x gamma 1 2 4 8 16 (the user asked for
# 2-16; 1 is where drafting pays on our CPUs) x T 0.7 and 1.0,
# top_p 0.95, top_k 0, each cell against its own autoregressive baseline (--paired_baseline), (d) every draft source
# (the shallowest grid exit's chains, prompt lookup, exit+lookup, recycled predictions, auto) x gamma 1 2 4 x T 0.7
# and 1.0, chains (REPORT_SOURCE_WIDTHS=1; make speedup measures trees), on each prompt set (ShareGPT and its three task groups; REPORT_SETS takes any --dataset, e.g. the field's
# question.jsonl) into OUT/eval/sources, (e) report.py: out/report/REPORT.md, opening with the best cell of each
# source per prompt set and policy (95% intervals over the prompts), then its tables and plots, ending with the best
# lossless speedup line (results.HEADLINE_RULE).
# Sizes are the user's to change, e.g. `make report REPORT_STEPS=1000 REPORT_PROMPTS=16 REPORT_TOKENS=128`.
REPORT         ?= out/report
REPORT_LAYERS  ?= 3 9 15 21 27
REPORT_GRID    ?= 3 15 27
REPORT_SCAN    ?= 3:27:3
REPORT_GAMMAS  ?= 1 2 4 8 16
REPORT_STEPS   ?= 300
REPORT_LSTSQ   ?= 48
REPORT_EVAL    ?= 100
REPORT_VAL     ?= 8
REPORT_PROMPTS ?= 4
REPORT_TOKENS  ?= 64
REPORT_TF      ?= 8
REPORT_SETS    ?= sharegpt sharegpt:tasks
REPORT_SOURCES ?= exit lookup exit+lookup recycle auto
REPORT_SOURCE_GAMMAS ?= 1 2 4
REPORT_SOURCE_TEMPS  ?= 0.7 1.0
REPORT_SOURCE_WIDTHS ?= 1
REPORT_TRAIN   ?= --train head,norm,adapter --adapter_init next --draft_vocab 8192 --head_init lstsq \
	--lstsq_blocks $(REPORT_LSTSQ) --lr 4e-3 --head_lr 3e-3 --max_steps $(REPORT_STEPS) --batch_size 2 --seq_len 256 \
	--warmup 20 --eval_every $(REPORT_EVAL) --eval_batches $(REPORT_VAL) --save_every 50 --dtype auto
REPORT_POLICY  := --top_p 0.95 --top_k 0 --num_prompts $(REPORT_PROMPTS) --max_new_tokens $(REPORT_TOKENS)

report: setup
	rm -rf $(REPORT)
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC) train.py $(MODEL_FLAG) --exit_layers $(REPORT_LAYERS) \
		$(REPORT_TRAIN) --out_dir $(REPORT)
	$(PY) evaluate.py $(MODEL_FLAG) --exit_layers $(REPORT_SCAN) --exit_ckpt $(foreach l,$(REPORT_LAYERS),$(REPORT)/exit_L$(l)) \
		--gammas 4 --temperatures 0.7 $(REPORT_POLICY) --tf_blocks $(REPORT_TF) --out_dir $(REPORT)/eval
	$(PY) evaluate.py $(MODEL_FLAG) --exit_layers --exit_ckpt $(foreach l,$(REPORT_GRID),$(REPORT)/exit_L$(l)) --gammas $(REPORT_GAMMAS) \
		--temperatures 0.7 1.0 $(REPORT_POLICY) --paired_baseline --tf_blocks 0 --out_dir $(REPORT)/eval --resume
	$(PY) evaluate.py $(MODEL_FLAG) --exit_layers --exit_ckpt $(REPORT)/exit_L$(firstword $(REPORT_GRID)) --drafts $(REPORT_SOURCES) \
		--gammas $(REPORT_SOURCE_GAMMAS) --tree_widths $(REPORT_SOURCE_WIDTHS) --temperatures $(REPORT_SOURCE_TEMPS) $(REPORT_POLICY) \
		--dataset $(REPORT_SETS) --paired_baseline --tf_blocks 0 --out_dir $(REPORT)/eval/sources --resume
	@$(PY) report.py $(REPORT) --command "make report$(if $(filter out/report,$(REPORT)),, REPORT=$(REPORT))"

# The speedup check (63 min on the 2 idle cores of an AMD EPYC without AMX, 2026-12-01; the training half took 24 min
# on the AMX Xeon): (a) distil a shallow exit with a pruned head into
# out/speedup/ (two processes x one thread; the base in --dtype auto, bf16 where the CPU has it: the teacher is then the
# very model the sweep decodes with, and its forward is 2.2x faster (0.93 against 2.05 s a step on the AMX Xeon of
# 2026-11-29); the exit always trains in float32), (b) measure it against our autoregressive loop on 16 ShareGPT test
# prompts x 128 new tokens, greedy and T=0.7 / top_p 0.95, a chain and trees of drafts (see speedup-sweep), at
# --dtype auto on both threads, each cell against its own baseline timed prompt by prompt in turns with it
# (--paired_baseline), (c) print as the last line the best lossless speedup (evaluate.py --best_line: greedy cells
# count only when every prompt's tokens equal the baseline's). The step count follows the dtype the machine gets:
# 1500 steps in bf16, 650 in float32 (CPUs without native bf16): about 25 min of training on the AMX Xeon, 41 on the EPYC.
# Override any part, e.g. `make speedup SPEEDUP_LAYER=6 SPEEDUP_STEPS=200`.
SPEEDUP        := out/speedup
SPEEDUP_LAYER  ?= 3
SPEEDUP_VOCAB  ?= 8192
SPEEDUP_STEPS  ?= $(shell $(PY) -c "from truncated_llama import resolve_dtype; print(1000 if resolve_dtype('auto')[1] == 'bfloat16' else 450)")
SPEEDUP_TRAIN  ?= --train head,norm,adapter --adapter_init next --draft_vocab $(SPEEDUP_VOCAB) --head_init lstsq \
	--lstsq_blocks 48 --lr 4e-3 --head_lr 3e-3 --max_steps $(SPEEDUP_STEPS) --batch_size 2 --seq_len 256 \
	--warmup 20 --eval_every 250 --eval_batches 12 --save_every 100 --dtype auto
SPEEDUP_SWEEP  ?= --temperatures 0 0.7 --top_p 0.95 --num_prompts 10 --max_new_tokens 128 --tf_blocks 0 --paired_baseline
SPEEDUP_EXIT   := $(SPEEDUP)/exit_L$(SPEEDUP_LAYER)

speedup: speedup-train speedup-sweep

speedup-train: setup
	rm -rf $(SPEEDUP)
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC) train.py $(MODEL_FLAG) --exit_layer $(SPEEDUP_LAYER) \
		$(SPEEDUP_TRAIN) --out_dir $(SPEEDUP_EXIT)

# The measuring half alone, on the exit speedup-train left (run it again for a second measurement of the same exit):
# (a) ShareGPT test prompts: the exit (gamma 1, a chain and a width-2 tree), prompt lookup (gamma 4, a chain and
# a tree of 3 continuations) and both in one
# cycle (exit+lookup: the exit's gamma 1 and the lookup's 4 tokens, as a chain and as a width-2 tree), and --drafts auto
# (gamma 3: it picks per cycle among lookup, recycled predictions and the exit), greedy and T 0.7,
# (b) the same sources on each ShareGPT task group (code, a given text, open questions: share_gpt_dataset.task_group),
# added with --resume, (c) our prompt lookup against transformers' (generate(prompt_lookup_num_tokens=4)), each over
# its own autoregressive loop, in one run. The last line is the best lossless cell of (a) and (b), naming its source.
SPEEDUP_SETS  ?= sharegpt:tasks
SPEEDUP_GROUP ?= --dataset $(SPEEDUP_SETS) --temperatures 0 0.7 --top_p 0.95 --num_prompts 5 --max_new_tokens 96 \
	--tf_blocks 0 --paired_baseline
SPEEDUP_EVAL  = $(PY) evaluate.py $(MODEL_FLAG) --exit_layers --exit_ckpt $(SPEEDUP_EXIT) --resume

speedup-sweep: setup
	rm -rf $(SPEEDUP)/eval
	$(SPEEDUP_EVAL) --drafts exit --gammas 1 --tree_widths 1 2 $(SPEEDUP_SWEEP) --out_dir $(SPEEDUP)/eval
	$(SPEEDUP_EVAL) --drafts lookup --gammas 4 --tree_widths 1 3 $(SPEEDUP_SWEEP) --out_dir $(SPEEDUP)/eval
	$(SPEEDUP_EVAL) --drafts exit+lookup --gammas 1 --lookup_tokens 4 --tree_widths 1 2 $(SPEEDUP_SWEEP) \
		--out_dir $(SPEEDUP)/eval
	$(SPEEDUP_EVAL) --drafts auto --gammas 3 $(SPEEDUP_SWEEP) --out_dir $(SPEEDUP)/eval
	$(SPEEDUP_EVAL) --drafts exit --gammas 1 $(SPEEDUP_GROUP) --out_dir $(SPEEDUP)/eval/tasks
	$(SPEEDUP_EVAL) --drafts lookup --gammas 4 --tree_widths 1 3 $(SPEEDUP_GROUP) --out_dir $(SPEEDUP)/eval/tasks
	$(SPEEDUP_EVAL) --drafts exit+lookup --gammas 1 --lookup_tokens 4 --tree_widths 1 2 $(SPEEDUP_GROUP) \
		--out_dir $(SPEEDUP)/eval/tasks
	$(SPEEDUP_EVAL) --drafts auto --gammas 3 $(SPEEDUP_GROUP) --out_dir $(SPEEDUP)/eval/tasks
	$(PY) benchmark_torch_compile.py $(MODEL_FLAG) --layers --no_steps --lookup_peer 4 --num_prompts 4 --max_new_tokens 128 \
		--out $(SPEEDUP)/eval/lookup_peer.json
	@$(PY) evaluate.py --best_line $(SPEEDUP)/eval $(SPEEDUP)/eval/tasks

# Prompts we did not tune on: six_tasks.jsonl, 18 questions written for this (not from ShareGPT) in the field's six
# task types (conversation, translation, summarization, QA, math reasoning, retrieval-augmented QA; question.jsonl's
# schema), 3 prompts x 64 tokens at T 0.7 / top_p 0.95 each, every source on the exit speedup-train left (or
# HELDOUT_EXIT=DIR), each cell against its own paired baseline, into out/heldout (about 10 min on 2 cores).
HELDOUT       ?= out/heldout
HELDOUT_EXIT  ?= $(SPEEDUP_EXIT)
HELDOUT_EVAL   = $(PY) evaluate.py $(MODEL_FLAG) --exit_layers --exit_ckpt $(HELDOUT_EXIT) --resume --dataset six_tasks.jsonl \
	--temperatures 0.7 --top_p 0.95 --num_prompts 3 --max_new_tokens 64 --tf_blocks 0 --paired_baseline --out_dir $(HELDOUT)

heldout: setup
	rm -rf $(HELDOUT)
	$(HELDOUT_EVAL) --drafts exit --gammas 1 2
	$(HELDOUT_EVAL) --drafts lookup --gammas 4 --tree_widths 1 3
	$(HELDOUT_EVAL) --drafts exit+lookup --gammas 1 --lookup_tokens 4
	$(HELDOUT_EVAL) --drafts recycle --gammas 3 --tree_widths 2
	$(HELDOUT_EVAL) --drafts auto --gammas 3
	@$(PY) evaluate.py --best_line $(HELDOUT)

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache out runs
