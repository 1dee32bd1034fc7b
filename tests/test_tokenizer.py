"""The tiny byte-level BPE tokenizer: id layout, transformers loading, round trips, determinism, corpus."""

import json
import re
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from deepseek_vl2_lora.model.tokenizer import CORPUS_PATH, write_tokenizer

DEMO = Path(__file__).resolve().parent.parent / "data" / "demo"
EXPECTED_SPECIALS = [  # written out by hand: the documented id order
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜▁pad▁｜>",
    "<image>",
    "<|ref|>",
    "<|/ref|>",
    "<|det|>",
    "<|/det|>",
    "<|grounding|>",
    "<|User|>",
    "<|Assistant|>",
]
TEXTS = [
    "What colour is the shape?",
    "red",
    "  two leading spaces, two trailing  ",
    "tabs\tand\nnew\n\nlines\r\n",
    "unicode: héllo wörld, 日本語, emoji 🙂, ½ ∑",
    "numbers 0123456789 and punctuation !?.,;:'\"()[]{}",
    "",
]


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    size = write_tokenizer(out)
    return out, size


@pytest.fixture(scope="session")
def hf_tok(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir[0]))


def test_files_written(tok_dir):
    out, _ = tok_dir
    assert {p.name for p in out.iterdir()} == {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    cfg = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["tokenizer_class"] == "LlamaTokenizerFast"
    assert cfg["add_bos_token"] is False and cfg["add_eos_token"] is False
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"]) == tuple(EXPECTED_SPECIALS[:3])


def test_special_token_ids(tok_dir, hf_tok):
    raw = Tokenizer.from_file(str(tok_dir[0] / "tokenizer.json"))
    for token_id, token in enumerate(EXPECTED_SPECIALS):
        assert raw.token_to_id(token) == token_id
        assert hf_tok.convert_tokens_to_ids(token) == token_id
        assert hf_tok.encode(token, add_special_tokens=False) == [token_id]
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (0, 1, 2)


def test_vocab_size(tok_dir, hf_tok):
    _, size = tok_dir
    assert 1000 <= size <= 2000
    assert len(hf_tok) == size


def test_loaded_tokenizer_matches_tokenizer_json(tok_dir, hf_tok):
    # The reference is the raw `tokenizers` file: transformers must not swap the pre-tokenizer (v5 would for a
    # real LlamaTokenizer; it falls back to the generic backend for a ByteLevel file).
    raw = Tokenizer.from_file(str(tok_dir[0] / "tokenizer.json"))
    for text in TEXTS + ["<|User|>: <image>\nWhat colour is the shape?\n\n<|Assistant|>:"]:
        assert hf_tok.encode(text, add_special_tokens=False) == raw.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trip(hf_tok, text):
    ids = hf_tok.encode(text, add_special_tokens=False)
    assert hf_tok.decode(ids) == text


def test_no_implicit_bos_or_prefix_space(hf_tok):
    assert hf_tok.encode("red", add_special_tokens=True) == hf_tok.encode("red", add_special_tokens=False)
    assert hf_tok.decode(hf_tok.encode("red", add_special_tokens=False)) == "red"
    assert hf_tok.encode("red", add_special_tokens=False) != hf_tok.encode(" red", add_special_tokens=False)


def test_deterministic(tmp_path, tok_dir):
    write_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_bytes() == (tok_dir[0] / name).read_bytes(), name


def test_corpus_covers_demo_words():
    corpus_words = set(re.findall(r"[A-Za-z0-9]+", CORPUS_PATH.read_text(encoding="utf-8")))
    demo_words = set()
    for split in ("train", "eval"):
        for line in (DEMO / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            for msg in json.loads(line)["messages"]:
                demo_words |= set(re.findall(r"[A-Za-z0-9]+", msg["content"].replace("<image>", "")))
    assert demo_words, "demo data not found"
    assert demo_words <= corpus_words, sorted(demo_words - corpus_words)


def test_demo_answers_are_single_tokens(hf_tok):
    # Exact-match answers are encoded on their own (no leading space); one token each keeps the demo easy.
    answers = set()
    for split in ("train", "eval"):
        for line in (DEMO / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            answers.add(json.loads(line)["messages"][-1]["content"])
    assert len(answers) == 14
    for answer in sorted(answers):
        assert len(hf_tok.encode(answer, add_special_tokens=False)) == 1, answer
