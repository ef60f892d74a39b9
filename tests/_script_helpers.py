"""Tiny offline assets for the script and trial tests: a 2-layer Llama, its tokenizer, a jsonl dataset.

Everything is built from code here (no Hub): a LlamaConfig with hidden 64 and vocab 256,
a WordLevel tokenizer trained on the sentences below and wrapped in PreTrainedTokenizerFast
(with pad/eos tokens and a minimal chat template), and a few text and chat rows.
"""

from __future__ import annotations

import json
from pathlib import Path

SENTENCES = [
    "the model learns to answer support tickets about billing and refunds",
    "fine tuning a small language model on a gaming gpu is possible with lora",
    "gradient checkpointing trades compute for memory during the backward pass",
    "quantization stores the base weights in four bits while adapters train in bf16",
    "a longer sequence needs more activation memory than a short one",
    "the customer asked why the invoice was charged twice this month",
    "please reset my password and send a new login link",
    "the optimizer keeps two moments per trainable parameter",
]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def build_tokenizer(path: Path):
    """Train a WordLevel tokenizer on SENTENCES and save it as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(vocab_size=256, special_tokens=special))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 512
    fast.save_pretrained(path)
    return fast


def build_tiny_model(path: Path) -> Path:
    """Save a 2-layer Llama (hidden 64, vocab 256) and its tokenizer into `path`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(path)
    cfg = LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=256, max_position_embeddings=512,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    return path


def write_text_dataset(path: Path, rows: int = 24) -> Path:
    """A jsonl file of {"text": ...} rows of varied length."""
    path = Path(path)
    with path.open("w", encoding="utf-8") as f:
        for i in range(rows):
            text = " ".join(SENTENCES[j % len(SENTENCES)] for j in range(i, i + 1 + i % 3))
            f.write(json.dumps({"text": text}) + "\n")
    return path


def write_chat_dataset(path: Path, rows: int = 12) -> Path:
    """A jsonl file of {"messages": [...]} conversations."""
    path = Path(path)
    with path.open("w", encoding="utf-8") as f:
        for i in range(rows):
            msgs = [
                {"role": "user", "content": SENTENCES[i % len(SENTENCES)]},
                {"role": "assistant", "content": SENTENCES[(i + 3) % len(SENTENCES)]},
            ]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def shared_assets(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(tiny model dir, text jsonl, chat jsonl), built once per pytest session and shared by the script and trial tests."""
    base = tmp_path_factory.getbasetemp() / "tunepilot_tiny_assets"
    model_dir, text, chat = base / "tiny-llama", base / "text.jsonl", base / "chat.jsonl"
    if not (model_dir / "model.safetensors").is_file():
        base.mkdir(parents=True, exist_ok=True)
        build_tiny_model(model_dir)
        write_text_dataset(text)
        write_chat_dataset(chat)
    return model_dir, text, chat


def run_env(tmp_path: Path) -> dict:
    """Environment for generated-script subprocesses: offline, quiet, project on the path."""
    import os

    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
        HF_HUB_DISABLE_PROGRESS_BARS="1", HF_DATASETS_CACHE=str(tmp_path / "hf_datasets"),
        TUNEPILOT_HOME=str(tmp_path / "tp_home"),
        PYTHONPATH=str(Path(__file__).resolve().parents[1]),
    )
    return env


# ---- preference / RL data (issue 15) ---------------------------------------------------


def write_preference_dataset(path: Path, rows: int = 16) -> Path:
    """A jsonl file of {"prompt", "chosen", "rejected"} rows (DPO and reward models)."""
    path = Path(path)
    with path.open("w", encoding="utf-8") as f:
        for i in range(rows):
            row = {
                "prompt": SENTENCES[i % len(SENTENCES)],
                "chosen": SENTENCES[(i + 1) % len(SENTENCES)],
                "rejected": " ".join(SENTENCES[(i + 2) % len(SENTENCES)].split()[:4]),
            }
            f.write(json.dumps(row) + "\n")
    return path


def write_unpaired_dataset(path: Path, rows: int = 16) -> Path:
    """A jsonl file of {"prompt", "completion", "label"} rows (KTO)."""
    path = Path(path)
    with path.open("w", encoding="utf-8") as f:
        for i in range(rows):
            row = {"prompt": SENTENCES[i % len(SENTENCES)], "completion": SENTENCES[(i + 3) % len(SENTENCES)], "label": i % 2 == 0}
            f.write(json.dumps(row) + "\n")
    return path


def write_prompt_dataset(path: Path, rows: int = 16) -> Path:
    """A jsonl file of {"prompt", "answer"} rows (GRPO: prompts to complete, answers for the example reward)."""
    path = Path(path)
    with path.open("w", encoding="utf-8") as f:
        for i in range(rows):
            words = SENTENCES[i % len(SENTENCES)].split()
            f.write(json.dumps({"prompt": " ".join(words[:5]), "answer": words[-1]}) + "\n")
    return path
