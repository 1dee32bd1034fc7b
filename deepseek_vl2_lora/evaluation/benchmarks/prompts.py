"""The prompts DeepSeek-VL2 is evaluated with (its VLMEvalKit wrapper), as one user turn after the images.

Multiple choice:

    Hint: {hint}                  (only when the row has one)
    Question: {question}
    Options:
    A. {option A}
    B. {option B}
    ...
    Answer with the option's letter from the given choices directly.

Open questions are asked as the bare question (VLMEvalKit's default VQA prompt for this model). Each image is an
`<image>` line before the text, as in DeepSeek-VL2's own examples.
"""

from __future__ import annotations

MCQ_INSTRUCTION = "Answer with the option's letter from the given choices directly."
IMAGE_TOKEN = "<image>"


def mcq_prompt(question: str, options: dict[str, str], hint: str | None = None) -> str:
    prompt = f"Hint: {hint}\n" if hint else ""
    prompt += f"Question: {question}\n"
    prompt += "Options:\n" + "".join(f"{letter}. {text}\n" for letter, text in options.items())
    return prompt + MCQ_INSTRUCTION


def vqa_prompt(question: str) -> str:
    return question


def user_message(prompt: str, num_images: int) -> list[dict]:
    """The conversation to generate from: one user turn, images first."""
    return [{"role": "user", "content": f"{IMAGE_TOKEN}\n" * num_images + prompt}]


def rotate_options(options: dict[str, str], answer: str, shift: int) -> tuple[dict[str, str], str]:
    """The options moved `shift` places (option i takes the text of option i + shift) and where the answer went:
    circular evaluation asks each rotation once."""
    letters, texts = list(options), list(options.values())
    n = len(texts)
    rotated = {letters[i]: texts[(i + shift) % n] for i in range(n)}
    return rotated, letters[(letters.index(answer) - shift) % n]
