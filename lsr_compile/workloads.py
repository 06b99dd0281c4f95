"""The project's one list of shapes: what `make demo` tunes, what the benchmark and the GPU check measure."""
from __future__ import annotations

import torch

from .problem import LSRShape

# The CPU targets are stated at 768², N = 2048, r1 = 2, r2 = 4, s = 4 (docs/design.md §4).
CPU_LAYER = dict(s=4, r=(2, 4))


def demo_shapes() -> list[LSRShape]:
    """`make demo`'s tuning set: the demo model's layers (MiniLM-sized, 384 wide) and the 768² target layer."""
    return [LSRShape(n, d_in, d_out, **CPU_LAYER) for n in (512, 2048)
            for d_in, d_out in ((384, 384), (768, 768))]


def bench_shapes(quick: bool = False) -> list[LSRShape]:
    """CPU benchmark: 768², 1024x4096, 4096² over N (the larger ones only without --quick)."""
    if quick:
        return [LSRShape(n, 768, 768, **CPU_LAYER) for n in (128, 2048)]
    return ([LSRShape(n, 768, 768, **CPU_LAYER) for n in (128, 512, 2048, 8192)]
            + [LSRShape(n, 1024, 4096, **CPU_LAYER) for n in (128, 2048)]
            + [LSRShape(n, 4096, 4096, **CPU_LAYER) for n in (128, 2048)])


def mixed_shapes() -> list[LSRShape]:
    """The mixed-batch benchmark's layers on a CPU (768², 64 requests of 32 tokens over K resident adapters)."""
    return [LSRShape(2048, 768, 768, s=8, r=(2, 4), adapters=K, segments=64) for K in (8, 64, 512)]


def gpu_mixed_shapes() -> list[LSRShape]:
    """The mixed-batch benchmark's layers on a GPU (bf16 4096², 256 requests of 32 tokens, K up to 512)."""
    return [LSRShape(8192, 4096, 4096, s=8, r=(2, 4), adapters=K, segments=256, dtype=torch.bfloat16)
            for K in (8, 64, 512)]


def gpu_shapes() -> list[LSRShape]:
    """The GPU check, most important first: the target shape (bf16 4096², N = 8192), the BERT-base layer the
    whole-model check runs (768², N = 8192), an MLP up-projection (4096 -> 11008), then small batches."""
    bf16 = lambda n, d_in, d_out: LSRShape(n, d_in, d_out, s=4, r=(2, 4), dtype=torch.bfloat16)  # noqa: E731
    return [bf16(8192, 4096, 4096), bf16(8192, 768, 768), bf16(8192, 4096, 11008), bf16(512, 4096, 4096),
            bf16(512, 768, 768), bf16(512, 4096, 11008)]


def dry_run_shapes() -> list[LSRShape]:
    """The GPU check's dry run on a CPU: the same stages on layers small enough for Triton's interpreter."""
    return [LSRShape(64, 64, 64, s=4, r=(2, 4)), LSRShape(32, 64, 48, s=2, r=(2, 2))]


# ---- decoder LLMs: tiny random-weight models from transformers' config classes (nothing downloaded) ----------

DECODE_LAYERS = ((256, 256), (688, 256), (1024, 1024))  # (d_out, d_in): attention, MLP of a 256-wide model, 1024²
DECODERS = ("llama", "qwen2", "mistral", "phi3", "gpt2")
# target modules where peft has no default for the architecture (Phi3's attention is one fused qkv_proj)
DECODER_TARGETS = {"phi3": ["qkv_proj"]}


def tiny_decoder(family: str, hidden: int = 256, layers: int = 2, vocab: int = 1024, seed: int = 0,
                 dtype: torch.dtype = torch.float32):
    """A random-weight causal LM of ``family`` (Llama, Qwen2, Mistral, Phi3 with its fused qkv_proj, GPT-2 with
    its Conv1D projections), ``hidden`` wide and ``layers`` deep, the MLP ~8/3 as wide (688 at 256), in eval
    mode. Same seed, same weights."""
    import transformers as tf

    heads = max(hidden // 64, 2)
    inter = ((hidden * 8 // 3) + 15) // 16 * 16
    common = dict(vocab_size=vocab, num_hidden_layers=layers, num_attention_heads=heads, hidden_size=hidden,
                  intermediate_size=inter, max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2, tie_word_embeddings=False)
    configs = {
        "llama": lambda: tf.LlamaConfig(num_key_value_heads=heads, **common),
        "qwen2": lambda: tf.Qwen2Config(num_key_value_heads=heads, **common),
        "mistral": lambda: tf.MistralConfig(num_key_value_heads=heads, sliding_window=None, **common),
        "phi3": lambda: tf.Phi3Config(num_key_value_heads=heads, **common),
        "gpt2": lambda: tf.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=512,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0),
    }
    if family not in configs:
        raise ValueError(f"unknown decoder family {family!r}; choose one of {DECODERS}")
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(configs[family]())
    return model.to(dtype).eval()


def tiny_smollm2(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random-weight Llama shaped like SmolLM2-135M (``pretrained.load()``) scaled down, for the default suite:
    grouped-query attention with k/v projections a third as wide as the hidden size (96 -> 32, as 576 -> 192),
    the MLP 8/3 as wide, 16-wide heads, tied input and output embeddings."""
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=256, hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512,
                            pad_token_id=2, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    return tf.AutoModelForCausalLM.from_config(config).to(dtype).eval()
