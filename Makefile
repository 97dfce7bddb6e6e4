# Two commands do everything on a fresh machine:  `make run` (the main job)  and  `make test` (the test suite).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup run speedup speedup-train speedup-sweep test clean

$(STAMP): requirements.txt requirements-assets.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-assets.txt
	touch $(STAMP)

setup: $(STAMP)

# The study in small (about 6 min on 2 idle CPU cores at bf16, 2026-11-29): a short distillation of the exit at layer 15, then the sweep
# of untrained exits at layers 8, 15, 22 and the trained one against autoregressive decoding. Output: out/study/.
# The sweep decodes on one thread: batch-1 steps of a 135M model gain little from a second one, and single-threaded
# timings are not thrown off by anything else running on the machine.
STUDY := out/study

run: setup
	$(PY) scratch_work.py --no_color --max_new_tokens 48   # one ShareGPT prompt, drafted tokens [bracketed]
	rm -rf $(STUDY)
	$(PY) train.py --exit_layer 15 --train head,norm,adapter --adapter_init next --lr 4e-3 --head_lr 1e-2 \
		--max_steps 50 --batch_size 4 --seq_len 128 --warmup 10 --eval_every 25 --eval_batches 4 --save_every 0 \
		--out_dir $(STUDY)/exit_L15
	OMP_NUM_THREADS=1 $(PY) evaluate.py --exit_layers 8 15 22 --exit_ckpt $(STUDY)/exit_L15 --gammas 1 2 4 --temperatures 0 0.7 \
		--top_p 0.95 --num_prompts 2 --max_new_tokens 24 --tf_blocks 3 --tf_seq_len 256 --out_dir $(STUDY)/eval

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
SPEEDUP_STEPS  ?= $(shell $(PY) -c "from truncated_llama import resolve_dtype; print(1500 if resolve_dtype('auto')[1] == 'bfloat16' else 650)")
SPEEDUP_TRAIN  ?= --train head,norm,adapter --adapter_init next --draft_vocab $(SPEEDUP_VOCAB) --head_init lstsq \
	--lstsq_blocks 48 --lr 4e-3 --head_lr 3e-3 --max_steps $(SPEEDUP_STEPS) --batch_size 2 --seq_len 256 \
	--warmup 20 --eval_every 250 --eval_batches 12 --save_every 100 --dtype auto
SPEEDUP_WIDTHS ?= 1 2 4 8
SPEEDUP_DEEP   ?= 2 3
SPEEDUP_SWEEP  ?= --temperatures 0 0.7 --top_p 0.95 --num_prompts 16 --max_new_tokens 128 --tf_blocks 0 --paired_baseline
SPEEDUP_EXIT   := $(SPEEDUP)/exit_L$(SPEEDUP_LAYER)

speedup: speedup-train speedup-sweep

speedup-train: setup
	rm -rf $(SPEEDUP)
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc_per_node 2 train.py --exit_layer $(SPEEDUP_LAYER) \
		$(SPEEDUP_TRAIN) --out_dir $(SPEEDUP_EXIT)

# The measuring half alone, on the exit speedup-train left (run it again for a second measurement of the same exit):
# chains and trees of depth 1 (gamma 1, widths 1 2 4 8), then two deeper trees (width 4, gamma 2 and 3) added to the
# same results with --resume; the last line is the best lossless cell of both, naming its width and nodes.
speedup-sweep: setup
	rm -rf $(SPEEDUP)/eval
	$(PY) evaluate.py --exit_layers --exit_ckpt $(SPEEDUP_EXIT) --gammas 1 --tree_widths $(SPEEDUP_WIDTHS) \
		$(SPEEDUP_SWEEP) --out_dir $(SPEEDUP)/eval
	$(PY) evaluate.py --exit_layers --exit_ckpt $(SPEEDUP_EXIT) --gammas $(SPEEDUP_DEEP) --tree_widths 4 \
		$(SPEEDUP_SWEEP) --out_dir $(SPEEDUP)/eval --resume
	@$(PY) evaluate.py --best_line $(SPEEDUP)/eval

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache out runs
