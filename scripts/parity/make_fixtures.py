#!/usr/bin/env python3
"""Writes the parity fixtures the client's Rust tests compare against (Hugging Face transformers).

Run with the project's venv (transformers 5.23.0, torch 2.11.0):

    .venv/bin/python scripts/parity/make_fixtures.py [--minilm DIR]

It writes, under client/tests/fixtures/:

* tiny-bert/: a tiny random BertForSequenceClassification (hidden 32, 2 layers, 4 heads,
  3 labels) saved by transformers itself (config.json, model.safetensors, vocab.txt,
  tokenizer.json, tokenizer_config.json), plus expected.json with, for fixed sentences, the
  input ids transformers' tokenizer produces and the model's last_hidden_state, pooler_output
  and logits in eval mode. The weights are drawn wider than BERT's init (std 0.2, LayerNorm
  weights and biases perturbed) so that attention is far from uniform and a wrong mask,
  LayerNorm or GELU shows up well above the 1e-4 tolerance.
* bert-uncased-vocab.txt and minilm-expected.json, only when the real all-MiniLM-L6-v2 is
  present (--minilm, FEDTUNE_MINILM_DIR or $FEDTUNE_HOME/assets/all-MiniLM-L6-v2): the word-piece
  vocabulary (so the tokenizer tests run without the model) and transformers' token ids,
  last_hidden_state and pooler_output for fixed sentences.

Everything is deterministic (fixed seeds, CPU, float32): rerunning gives the same files.
"""

import argparse
import json
import os
import shutil
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizer

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "client" / "tests" / "fixtures"

# The tiny vocabulary: BERT's special tokens, the words our fixed sentences and the training
# tests use, then single characters and their continuation pieces so that any lower-case ASCII
# word still tokenizes (into pieces) instead of collapsing to [UNK].
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = """the a an is was are it this that movie film story plot acting actor good bad great
terrible awful fine boring fun funny man woman eating food dog cat runs park i you we love
hate not very really and but so of to in on with play game music song book day night
wonderful excellent horrible poor nice dull brilliant weak""".split()
PUNCT = list(".,!?'-:;()")
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789")
PIECES = ["##" + c for c in CHARS] + ["##ing", "##ed", "##s", "##ly"]

TINY_SENTENCES = [
    "A man is eating food.",
    "The movie was really good!",
    "this film is bad, boring and awful",
    "Zyx plonks: unknown words split.",
]
TINY_PAIR = ("A man is eating food.", "The dog runs in the park.")

MINILM_SENTENCES = [
    "A man is eating food.",
    "The new movie is awesome, I loved every minute of it!",
    "Bonjour: café, naïve façade — 東京 and emojis 🙂 get [UNK] or split.",
]
# Extra strings for the tokenizer test only (ids, no model outputs).
TOKENIZER_ONLY = [
    "",
    "   leading and trailing spaces   ",
    "UPPER lower MiXeD CaSe",
    "don't stop-believing; it's 3.14 or 1,000,000?",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "tab\tseparated\nnew line",
]


def floats(t, digits=7):
    """A tensor as nested lists of floats rounded to `digits` decimals (small, stable JSON)."""
    return [round(float(x), digits) for x in t.reshape(-1)] if t.dim() == 1 else [floats(r, digits) for r in t]


def make_tiny():
    out = FIXTURES / "tiny-bert"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    # Single letters such as "a" and "i" are words too: keep each entry once, first place wins.
    vocab = list(dict.fromkeys(SPECIALS + WORDS + PUNCT + CHARS + PIECES))
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")

    tok = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True)
    # Bake padding and truncation into tokenizer.json, as many published tokenizers do (MiniLM
    # ships Fixed(128)): the Rust side must override them and pad to the longest in the batch.
    tok.backend_tokenizer.enable_padding(length=24, pad_id=0, pad_token="[PAD]")
    tok.backend_tokenizer.enable_truncation(max_length=20)
    tok.save_pretrained(str(out))
    tok.backend_tokenizer.no_padding()
    tok.backend_tokenizer.no_truncation()

    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        max_position_embeddings=64,
        type_vocab_size=2,
        initializer_range=0.02,
        layer_norm_eps=1e-12,
        pad_token_id=0,
        id2label={0: "negative", 1: "neutral", 2: "positive"},
        label2id={"negative": 0, "neutral": 1, "positive": 2},
    )
    torch.manual_seed(1234)
    model = BertForSequenceClassification(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm.weight" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(str(out), safe_serialization=True)

    batch = tok(TINY_SENTENCES, padding="longest", return_tensors="pt")
    pair = tok([TINY_PAIR[0]], [TINY_PAIR[1]], return_tensors="pt")
    cases = []
    for name, enc in (("batch", batch), ("pair", pair)):
        with torch.no_grad():
            o = model(**enc, output_hidden_states=True)
            base = model.bert(**enc)
        cases.append(
            {
                "name": name,
                "input_ids": enc["input_ids"].tolist(),
                "token_type_ids": enc["token_type_ids"].tolist(),
                "attention_mask": enc["attention_mask"].tolist(),
                "last_hidden_state": floats(base.last_hidden_state),
                "pooler_output": floats(base.pooler_output),
                "logits": floats(o.logits),
            }
        )
    expected = {
        "generator": "scripts/parity/make_fixtures.py",
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
        "sentences": TINY_SENTENCES,
        "pair": list(TINY_PAIR),
        "cases": cases,
    }
    (out / "expected.json").write_text(json.dumps(expected, separators=(",", ":")) + "\n")
    print(f"wrote {out}")


def minilm_dir(arg):
    if arg:
        return Path(arg)
    if os.environ.get("FEDTUNE_MINILM_DIR"):
        return Path(os.environ["FEDTUNE_MINILM_DIR"])
    home = Path(os.environ.get("FEDTUNE_HOME", Path.home() / ".cache" / "fedtune"))
    return home / "assets" / "all-MiniLM-L6-v2"


def make_minilm(path):
    if not (path / "model.safetensors").exists():
        print(f"all-MiniLM-L6-v2 not found in {path}: MiniLM fixtures left as they are")
        return
    shutil.copy(path / "vocab.txt", FIXTURES / "bert-uncased-vocab.txt")
    tok = BertTokenizer.from_pretrained(str(path))
    model = BertModel.from_pretrained(str(path))
    model.eval()
    enc = tok(MINILM_SENTENCES, padding="longest", return_tensors="pt")
    with torch.no_grad():
        o = model(**enc)
    tokenizer_cases = [
        {"text": t, "input_ids": tok(t)["input_ids"]} for t in MINILM_SENTENCES + TOKENIZER_ONLY
    ]
    expected = {
        "generator": "scripts/parity/make_fixtures.py",
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
        "sentences": MINILM_SENTENCES,
        "input_ids": enc["input_ids"].tolist(),
        "attention_mask": enc["attention_mask"].tolist(),
        "last_hidden_state": floats(o.last_hidden_state, 6),
        "pooler_output": floats(o.pooler_output, 6),
        "tokenizer_cases": tokenizer_cases,
    }
    (FIXTURES / "minilm-expected.json").write_text(json.dumps(expected, separators=(",", ":")) + "\n")
    print(f"wrote MiniLM fixtures from {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minilm", help="folder of the real all-MiniLM-L6-v2 (optional)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    FIXTURES.mkdir(parents=True, exist_ok=True)
    make_tiny()
    make_minilm(minilm_dir(args.minilm))


if __name__ == "__main__":
    main()
