"""A tiny, deterministic byte-level BPE tokenizer laid out like DeepSeek-VL2's.

The real checkpoints ship a ~129k-token byte-level BPE tokenizer whose `tokenizer_config.json` names
`LlamaTokenizerFast`. Tests and the demo model need something with the same shape (special tokens,
byte-level round trips, the chat and image tokens) but small enough to train in well under a second, so this
module trains one on the bundled corpus. Training is deterministic: the same files come out on every run.

Note on transformers 5.x: `LlamaTokenizerFast` is an alias of the SentencePiece-style `LlamaTokenizer`, and
`AutoTokenizer` notices that our `tokenizer.json` is ByteLevel and loads it as a plain `TokenizersBackend`
(with a warning). That is also what happens to the official DeepSeek-VL2 tokenizers, so we keep the official
class name rather than special-casing it; the loaded tokenizer encodes exactly like `tokenizer.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .. import PACKAGE_DIR

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜▁pad▁｜>"
IMAGE_TOKEN = "<image>"
GROUNDING_TOKENS = ("<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>")
CHAT_TOKENS = ("<|User|>", "<|Assistant|>")

# Id order matters: bos=0, eos=1 as in the tiny/full checkpoints, then pad and the processor's extra tokens.
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IMAGE_TOKEN, *GROUNDING_TOKENS, *CHAT_TOKENS)

DEFAULT_VOCAB_SIZE = 1280
CORPUS_PATH = PACKAGE_DIR / "assets" / "tokenizer_corpus.txt"


def build_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE, corpus_path: str | Path | None = None) -> Tokenizer:
    """Train the byte-level BPE on the corpus and return the `tokenizers.Tokenizer`."""
    text = Path(corpus_path or CORPUS_PATH).read_text(encoding="utf-8")
    tokenizer = Tokenizer(models.BPE())
    # No prefix space: DeepSeek's tokenizer encodes an assistant answer "red" without a leading space, and the
    # processor relies on decode(encode(x)) == x.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        # The full byte alphabet keeps every input encodable (no unknown token is ever needed).
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # One paragraph per item keeps newlines ("\n\n" is the template separator) inside the training text.
    paragraphs = [p + "\n\n" for p in text.split("\n\n") if p.strip()]
    tokenizer.train_from_iterator(paragraphs, trainer=trainer)
    return tokenizer


def _tokenizer_config() -> dict:
    return {
        "tokenizer_class": "LlamaTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        # The processor adds bos/eos itself and always encodes with add_special_tokens=False, as the official
        # one does, so the tokenizer must not add anything on its own.
        "add_bos_token": False,
        "add_eos_token": False,
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 16384,
        "additional_special_tokens": [IMAGE_TOKEN, *GROUNDING_TOKENS, *CHAT_TOKENS],
    }


def _special_tokens_map() -> dict:
    return {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "additional_special_tokens": [IMAGE_TOKEN, *GROUNDING_TOKENS, *CHAT_TOKENS],
    }


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tokenizer(
    out_dir: str | Path, vocab_size: int = DEFAULT_VOCAB_SIZE, corpus_path: str | Path | None = None
) -> int:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json; return len(tokenizer).

    The returned size counts every token including the special ones, i.e. what the model's vocab_size must be.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size, corpus_path)
    for token_id, token in enumerate(SPECIAL_TOKENS):
        # Guards the documented id layout (bos=0, eos=1, pad=2, ...) against a change in the trainer.
        assert tokenizer.token_to_id(token) == token_id, (token, tokenizer.token_to_id(token))
    (out / "tokenizer.json").write_text(tokenizer.to_str(pretty=True) + "\n", encoding="utf-8")
    _write_json(out / "tokenizer_config.json", _tokenizer_config())
    _write_json(out / "special_tokens_map.json", _special_tokens_map())
    return tokenizer.get_vocab_size(with_added_tokens=True)
