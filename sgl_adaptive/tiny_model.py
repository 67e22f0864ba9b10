"""Build a tiny random-weight chat model with a real tokenizer, offline (for tests and demos).

The tokenizer is a byte-level BPE trained in memory on a small synthetic corpus that contains the
self-evaluation prompt, both answer words (with and without a leading space) and small arithmetic,
and it carries a ChatML chat template. The model is a randomly initialised Qwen2 or Llama.
"""

from __future__ import annotations

import random
from pathlib import Path

from sgl_adaptive.selfeval import DEFAULT_EVAL_PROMPT

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
WORDS = (
    "the a of to in is it that for on with as was be this are from or have not but can all one two three "
    "four five six seven eight nine ten answer number sum total plus minus times question step first then "
    "model token cache batch sample better again start over would you do if started yes no"
).split()


def corpus(lines: int = 3000, seed: int = 0) -> list[str]:
    """Synthetic text: random words, arithmetic with answers, and the evaluation dialogue."""
    rnd = random.Random(seed)
    out = []
    for _ in range(lines):
        a, b = rnd.randint(0, 99), rnd.randint(0, 99)
        out.append(f"What is {a} + {b}? The answer is {a + b}.")
        out.append(" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(4, 14))).capitalize() + ".")
        out.append(f"{DEFAULT_EVAL_PROMPT} {rnd.choice(['Yes.', 'No.'])} {rnd.choice(['Yes', 'No'])}")
    return out


def build_tiny_model(
    out_dir: str | Path,
    *,
    arch: str = "qwen2",
    vocab_size: int = 600,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
) -> Path:
    """Write a tokenizer + random model to ``out_dir`` and return it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus(seed=seed), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=2048
    )
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(out)

    common = dict(
        vocab_size=(len(tokenizer) + 63) // 64 * 64,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        bos_token_id=None,
    )
    config_cls, model_cls = (
        (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    )
    torch.manual_seed(seed)
    model = model_cls(config_cls(**common))
    with torch.no_grad():  # peaked logits, so samples differ from greedy but stay readable
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(out, safe_serialization=True)
    return out
