"""Talk to a DeepSeek-VL2 checkpoint (optionally with trained state on top): one question, a conversation, or a
JSONL file of prompts. Answers stream as they come in the first two modes.

    vl2-chat MODEL --image a.png --prompt "<image>\\nWhat colour is the shape?"                  # one question
    vl2-chat MODEL --image a.png --prompt "<image>\\nColour?" --prompt "<image>\\nShape?"      # one batch
    vl2-chat MODEL                                                     # a conversation (multi-turn) on stdin
    vl2-chat MODEL --batch prompts.jsonl --out answers.jsonl                                   # batch mode

(`python scripts/chat.py` is the same.) MODEL is a checkpoint dir (base or merged), a run dir, a trained-state dir or a
stock PEFT LoRA adapter (its base: the local checkpoint it records), or a base checkpoint with
`--trained RUN_OR_TRAINED_DIR`.

Conversation: each line is a user turn; the model's answers stay in the history. `/image PATH` attaches an image
to the next turn (its `<image>` placeholder is put at the start of the turn unless the turn has one), `/reset`
starts over, `/exit` (or end of input) quits. With `--image`, the first turn gets those images.

Batch: each line is `{"prompt": "...", "images": [...]}` or a record in any training layout (`messages` +
`images`, ShareGPT, ...; data/README.md) whose last turn is the user's; image paths are relative to the file.
The answers go to `--out` as `{"line": N, "answer": "..."}`, in `--batch-size` left-padded batches.
Mistakes (a missing image, more `<image>` placeholders than images, an unreadable line) are one line: the
conversation goes on, the batch stops naming `file:line`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


class ChatError(ValueError):
    """A user mistake: printed as one line."""


def parse_args(argv=None) -> argparse.Namespace:
    formatter = argparse.RawDescriptionHelpFormatter
    ap = argparse.ArgumentParser(prog="vl2-chat", description=__doc__, formatter_class=formatter)
    ap.add_argument("model", help="a checkpoint dir (base or merged), a run dir, a trained dir or a PEFT adapter")
    ap.add_argument("--trained", help="a trained-state directory, its run dir or a stock PEFT LoRA adapter")
    ap.add_argument("--image", action="append", default=[], help="image path; repeat for several")
    ap.add_argument("--prompt", action="append", help="user turn with <image> placeholders; repeat for a batch")
    ap.add_argument("--batch", help="a JSONL file of prompts (batch mode)")
    ap.add_argument("--out", help="where batch mode writes its answers (JSONL; default: stdout)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--system", default=None)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step")
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument(
        "--quantize",
        choices=["none", "nf4", "int8"],
        default="none",
        help="store the frozen language-model weights quantized, as training's model.quantize does",
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    if args.batch and args.prompt:
        ap.error("--batch and --prompt are two modes; give one")
    if args.batch_size < 1:
        ap.error("--batch-size must be ≥ 1")
    return args


class Chat:
    """The model, its processor and the decoding settings; `answer` turns conversations into replies."""

    def __init__(self, args: argparse.Namespace):
        from ..data.processor import DeepseekVL2Processor
        from ..model.config import VL2Config
        from ..model.deepseek_vl2 import DeepseekVL2ForCausalLM
        from ..policy.adapters import load_trained_state, resolve_trained_model, trained_policy
        from ..policy.quantize import keep_unquantized

        try:
            checkpoint, trained = resolve_trained_model(args.model)
        except FileNotFoundError as e:
            raise ChatError(str(e)) from None
        if args.trained:
            if trained is not None:
                raise ChatError(f"{args.model} already is a trained model; --trained goes with a base checkpoint")
            trained = args.trained
        self.args = args
        dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
        self.processor = DeepseekVL2Processor.from_pretrained(checkpoint)
        keep = None  # a quantized base keeps what the trained state trains in full unquantized
        if args.quantize != "none" and trained is not None:
            config = VL2Config.from_file(Path(checkpoint) / "config.json")
            keep = keep_unquantized(trained_policy(trained, config), config.language.use_mla)
        self.model = DeepseekVL2ForCausalLM.from_pretrained(
            checkpoint, torch_dtype=dtype, attn_implementation=args.attn, quantize=args.quantize, keep_unquantized=keep
        )
        if trained is not None:
            load_trained_state(self.model, trained)
        self.model.to(args.device).eval()
        self.generator = torch.Generator(device=args.device).manual_seed(args.seed)

    def with_system(self, messages: list[dict]) -> list[dict]:
        if self.args.system and not (messages and messages[0]["role"] == "system"):
            return [{"role": "system", "content": self.args.system}, *messages]
        return messages

    def answer(self, conversations: list[tuple[list[dict], list]], stream: bool = False) -> list[str]:
        """Replies to conversations [(messages ending with a user turn, PIL images)], as one left-padded batch."""
        from ..data.collate import Collator
        from ..model.generation import generate

        encodings = [self.processor.encode(self.with_system(m), images, generation=True) for m, images in conversations]
        batch = Collator(self.processor.pad_id, padding_side="left")(encodings)
        batch = {k: v.to(self.args.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        decode = self.processor.tokenizer.decode
        printer = None
        if stream:  # special tokens (the final eos) are not printed
            printer = lambda tok: print(decode(tok.tolist(), skip_special_tokens=True), end="", flush=True)  # noqa: E731
        tokens = generate(
            self.model,
            batch["input_ids"],
            batch["attention_mask"],
            batch["images"],
            batch["images_seq_mask"],
            batch["images_spatial_crop"],
            max_new_tokens=self.args.max_new_tokens,
            eos_token_id=self.processor.eos_id,
            do_sample=self.args.sample,
            temperature=self.args.temperature,
            top_p=self.args.top_p,
            use_cache=not self.args.no_cache,
            generator=self.generator,
            stream=printer,
        )
        if stream:
            print(flush=True)
        replies = []
        for row in tokens.tolist():
            if self.processor.eos_id in row:
                row = row[: row.index(self.processor.eos_id)]
            replies.append(decode(row, skip_special_tokens=True).strip())
        return replies


def load_images(paths: list[str], root: Path | None = None) -> list:
    from ..data.images import load_image

    images = []
    for p in paths:
        path = Path(p) if root is None or Path(p).is_absolute() else root / p
        if not path.is_file():
            raise ChatError(f"image {path} not found")
        try:
            images.append(load_image(path))
        except Exception as e:  # noqa: BLE001 - any decoding failure is the user's file: say which
            raise ChatError(f"image {path} cannot be read ({e})") from None
    return images


def ask_prompts(chat: Chat, args: argparse.Namespace) -> None:
    """--prompt: each prompt is one user turn with all --image's; several are answered as one batch."""
    images = load_images(args.image)
    conversations = [([{"role": "user", "content": p}], images) for p in args.prompt]
    replies = chat.answer(conversations, stream=len(conversations) == 1)
    if len(conversations) > 1:
        for prompt, reply in zip(args.prompt, replies):
            print(f"{prompt!r} -> {reply!r}")


def converse(chat: Chat, args: argparse.Namespace, lines) -> None:
    """The multi-turn conversation on `lines` (stdin): history kept, images attached with /image."""
    from ..data.layouts import add_missing_placeholders
    from ..data.processor import SampleError

    messages, images, pending = [], [], load_images(args.image)
    interactive = sys.stdin.isatty()
    if interactive:
        print("(a user turn per line; /image PATH attaches an image, /reset starts over, /exit quits)")
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = lines.readline()
        if not line or line.strip() == "/exit":
            return
        text = line.rstrip("\n")
        try:
            if text.startswith("/image "):
                pending += load_images([text[len("/image ") :].strip()])
                continue
            if text.strip() == "/reset":
                messages, images, pending = [], [], []
                continue
            if not text.strip():
                continue
            turn = [{"role": "user", "content": text}]
            add_missing_placeholders(turn, len(pending))  # placeholders for the new images, at the start
            reply = chat.answer([([*messages, *turn], [*images, *pending])], stream=True)[0]
        except (ChatError, SampleError) as e:
            print(f"error: {e}", flush=True)
            continue
        messages += [*turn, {"role": "assistant", "content": reply}]
        images += pending
        pending = []


def batch_records(path: Path) -> list[tuple[int, list[dict], list[str]]]:
    """(line, messages ending with the user's turn, image paths) per line of a prompts JSONL."""
    from ..data.layouts import parse
    from ..data.processor import SampleError

    if not path.is_file():
        raise ChatError(f"--batch {path}: no such file")
    out = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ChatError(f"{where}: not JSON ({e.msg})") from None
        if isinstance(record, dict) and "prompt" in record:
            record = {"messages": [{"role": "user", "content": record["prompt"]}], "images": record.get("images", [])}
        try:
            parsed = parse(record)
        except SampleError as e:
            raise ChatError(f"{where}: {e}") from None
        messages = parsed.messages
        if messages and messages[-1]["role"] == "assistant":  # a training record: ask its last question again
            messages = messages[:-1]
        if not messages or messages[-1]["role"] != "user":
            raise ChatError(f"{where}: the last turn must be the user's (a question to answer)")
        out.append((number, messages, parsed.images))
    return out


def run_batch(chat: Chat, args: argparse.Namespace) -> None:
    from ..data.processor import SampleError

    path = Path(args.batch)
    records = batch_records(path)
    sink = open(args.out, "w") if args.out else sys.stdout  # noqa: SIM115 - closed below
    try:
        for start in range(0, len(records), args.batch_size):
            part = records[start : start + args.batch_size]
            conversations = []
            for number, messages, paths in part:
                try:
                    conversations.append((messages, load_images(paths, path.parent)))
                except ChatError as e:
                    raise ChatError(f"{path}:{number}: {e}") from None
            try:
                replies = chat.answer(conversations)
            except SampleError as e:
                where = ", ".join(f"{path}:{n}" for n, _, _ in part)
                raise ChatError(f"{where}: {e}") from None
            for (number, _, _), reply in zip(part, replies):
                sink.write(json.dumps({"line": number, "answer": reply}) + "\n")
            sink.flush()
    finally:
        if sink is not sys.stdout:
            sink.close()


def main(argv=None) -> int:
    from ..data.processor import SampleError

    args = parse_args(argv)
    try:
        chat = Chat(args)
        if args.batch:
            run_batch(chat, args)
        elif args.prompt:
            ask_prompts(chat, args)
        else:
            converse(chat, args, sys.stdin)
    except (ChatError, SampleError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        return 130
    return 0
