"""scripts/chat.py's conversation and batch modes, as subprocesses on the tiny base checkpoint (greedy answers are
deterministic). Invariants: a batch answers each prompt as it is answered alone; a conversation's turn is answered
as the same history given explicitly; mistakes are one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

from deepseek_vl2_lora.model.tiny import ensure_tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent
IMAGE = ROOT / "data" / "demo" / "images" / "eval_0000.png"
COMMON = ["--attn", "eager", "--device", "cpu", "--max-new-tokens", "5"]


def _chat(*args, stdin: str = ""):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "scripts" / "chat.py"), str(ensure_tiny_checkpoint("full-noaux")), *args, *COMMON]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _answers(path: Path) -> list[str]:
    return [json.loads(line)["answer"] for line in path.read_text().splitlines()]


def test_a_conversation_turn_is_answered_as_its_history_given_explicitly_and_batches_match_single_prompts(tmp_path):
    talk = _chat(stdin=f"/image {IMAGE}\nWhat colour is the shape?\nAnd its size?\n/exit\n")
    assert talk.returncode == 0, talk.stderr[-2000:]
    first, second = [line.strip() for line in talk.stdout.splitlines()[-2:]]

    history = [
        {"role": "user", "content": "<image>\nWhat colour is the shape?"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "And its size?"},
    ]
    records = [
        {"prompt": "<image>\nWhat colour is the shape?", "images": [str(IMAGE)]},
        {"messages": history, "images": [str(IMAGE)]},
        # ShareGPT without a placeholder: the image keeps its place at the start of the first user turn
        {"conversations": [{"from": "user", "value": "What colour is the shape?"}], "images": [str(IMAGE)]},
        {"prompt": "Say something without an image."},
    ]
    prompts = _write_jsonl(tmp_path / "prompts.jsonl", records)
    together = _chat("--batch", str(prompts), "--out", str(tmp_path / "together.jsonl"), "--batch-size", "4")
    assert together.returncode == 0, together.stderr[-2000:]
    batched = _answers(tmp_path / "together.jsonl")
    alone = _chat("--batch", str(prompts), "--out", str(tmp_path / "alone.jsonl"), "--batch-size", "1")
    assert alone.returncode == 0, alone.stderr[-2000:]
    assert batched == _answers(tmp_path / "alone.jsonl")  # left-padded batches answer as one prompt at a time
    assert batched[0] == first and batched[1] == second  # the conversation kept its history and image
    assert batched[2] == batched[0]  # the placeholder went where the explicit one is


def test_mistakes_are_one_line(tmp_path):
    missing = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}, {"prompt": "<image>", "images": ["nope.png"]}])
    proc = _chat("--batch", str(missing))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {missing}:2: image {tmp_path / 'nope.png'} not found"]

    proc = _chat("--image", str(IMAGE), "--prompt", "<image><image> two?")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "placeholder" in proc.stderr

    talk = _chat(stdin="<image> no image attached\n/exit\n")  # the conversation says so and goes on
    assert talk.returncode == 0 and "Traceback" not in talk.stderr
    assert "error:" in talk.stdout and "placeholder" in talk.stdout
