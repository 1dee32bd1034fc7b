"""Evaluation: teacher-forced loss on the eval split and exact-match accuracy by greedy generation.

Exact match: the model generates greedily from the prompt (everything up to the final `<|Assistant|>:`) until
eos or `max_new_tokens`; the text before eos, decoded without special tokens, is compared with the reference
answer after `strip().lower()` on both. Records carrying a `qtype` field (the demo set does) also get an
accuracy per qtype.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from ..data.collate import Collator
from ..data.datasets import reference_answer
from ..data.processor import SampleError
from ..model.generation import generate
from .ranks import ONE_PROCESS, EvalRanks, padding_batch

log = logging.getLogger(__name__)

MODEL_INPUTS = ("input_ids", "attention_mask", "images", "images_seq_mask", "images_spatial_crop", "position_ids")


def normalize_answer(text: str) -> str:
    return text.strip().lower()


@dataclass
class EvalResult:
    loss: float | None = None  # mean CE per supervised token over the whole eval split
    loss_tokens: int = 0
    accuracy: float | None = None
    num_samples: int = 0
    skipped: list[str] = field(default_factory=list)  # eval samples gone bad since validation (on_bad_sample=skip)
    by_type: dict[str, float] = field(default_factory=dict)
    predictions: list[dict] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        out = {}
        if self.loss is not None:
            out["eval/loss"] = self.loss
        if self.accuracy is not None:
            out["eval/accuracy"] = self.accuracy
            out["eval/samples"] = self.num_samples
        for qtype, acc in sorted(self.by_type.items()):
            out[f"eval/accuracy/{qtype}"] = acc
        if self.skipped:
            out["eval/skipped"] = len(self.skipped)
        return out


class _Loader:
    """`dataset[i]`, or under on_bad_sample=skip None for a sample gone bad since validation (an image deleted or
    unreadable mid-run), logged and listed in `skipped`; under `error` its SampleError names file:line."""

    def __init__(self, dataset, on_bad_sample: str, skipped: list[str]):
        self.dataset, self.skip, self.skipped = dataset, on_bad_sample == "skip", skipped

    def __call__(self, index: int):
        try:
            return self.dataset[index]
        except SampleError as e:
            if not self.skip:
                raise SampleError("at_eval", f"while evaluating: {e}") from None
            log.warning("skipped a bad eval sample (data.on_bad_sample=skip): %s", e)
            self.skipped.append(str(e))
            return None


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}


@torch.no_grad()
def eval_loss(
    model, dataset, indices, collator, batch_size, device, autocast=nullcontext, load=None, ranks=ONE_PROCESS
):
    """(token-weighted mean LM loss over `dataset[indices]`, supervised tokens); the aux loss is a training-only
    term. `load(i)` (default `dataset[i]`) may return None for a sample to leave out. `ranks`: split across ranks
    (`EvalRanks`; the same result as one process)."""
    load = load or dataset.__getitem__
    losses = []  # (batch, mean loss, supervised tokens) of this rank's batches
    for b in ranks.slots(-(-len(indices) // batch_size)):
        chunk = [] if b is None else indices[b * batch_size : (b + 1) * batch_size]
        encodings = [e for e in map(load, chunk) if e is not None]
        if not encodings and not ranks.lockstep:
            continue
        batch = _to(collator(encodings), device) if encodings else padding_batch(dataset.processor, device)
        with autocast():
            out = model(**{k: batch[k] for k in MODEL_INPUTS}, labels=batch["labels"], return_logits=False)
        if encodings:
            losses.append((b, float(out.loss), int((batch["labels"][:, 1:] != -100).sum())))
    total, tokens = 0.0, 0
    for _, loss, n in sorted(ranks.gather(losses)):  # in batch order, as one process sums
        total += loss * n
        tokens += n
    return total / max(tokens, 1), tokens


@torch.no_grad()
def generate_replies(
    model, processor, encode, n, batch_size, max_new_tokens, device, autocast=nullcontext, ranks=ONE_PROCESS
) -> list[tuple[int, str]]:
    """Greedy replies to prompts 0..n-1 (`encode(k)`: the processor's generation encoding of prompt k, or None to
    leave it out), in batches with left padding: [(k, the text before eos, decoded without special tokens)] in
    prompt order. `ranks`: split across ranks (`EvalRanks`), every rank gets every reply."""
    collator = Collator(processor.pad_id, padding_side="left")
    eos = processor.eos_id
    replies = []
    for b in ranks.slots(-(-n // batch_size)):
        encoded = [] if b is None else [(k, encode(k)) for k in range(b * batch_size, min(n, (b + 1) * batch_size))]
        chunk = [k for k, e in encoded if e is not None]
        if not chunk and not ranks.lockstep:
            continue
        prompts = [e for _, e in encoded if e is not None]
        batch = _to(collator(prompts), device) if prompts else padding_batch(processor, device)
        with autocast():
            new = generate(
                model,
                batch["input_ids"],
                batch["attention_mask"],
                batch["images"],
                batch["images_seq_mask"],
                batch["images_spatial_crop"],
                max_new_tokens=max_new_tokens,
                eos_token_id=eos,
                padding=not chunk,
                lockstep=ranks.lockstep,
            )
        for k, row in zip(chunk, new.tolist()):
            ids = row[: row.index(eos)] if eos in row else row
            replies.append((k, processor.tokenizer.decode(ids, skip_special_tokens=True)))
    return sorted(ranks.gather(replies))


def exact_match(
    model,
    dataset,
    indices,
    processor,
    batch_size,
    max_new_tokens,
    device,
    autocast=nullcontext,
    load=None,
    ranks=ONE_PROCESS,
):
    """(accuracy, accuracy per qtype, predictions) for EvalDataset `dataset[indices]`; `load(i)` and `ranks` as in
    eval_loss."""
    predictions, hits, counts = [], defaultdict(int), defaultdict(int)
    load = load or dataset.__getitem__

    def encode(k):
        pair = load(indices[k])
        return None if pair is None else pair[0]

    n = len(indices)
    replies = generate_replies(model, processor, encode, n, batch_size, max_new_tokens, device, autocast, ranks)
    for k, text in replies:
        sample = dataset.sample(indices[k])  # (read from its source again: once)
        reference = reference_answer(sample)
        correct = normalize_answer(text) == normalize_answer(reference)
        qtype = sample.meta.get("qtype")
        predictions.append(
            {
                "location": sample.location,
                "prediction": text,
                "reference": reference,
                "correct": correct,
            }
        )
        for key in ("", str(qtype)) if qtype is not None else ("",):
            counts[key] += 1
            hits[key] += int(correct)
    accuracy = hits[""] / counts[""] if counts[""] else None
    by_type = {k: hits[k] / counts[k] for k in counts if k}
    return accuracy, by_type, predictions


def evaluate(
    model,
    processor,
    loss_set,
    gen_set,
    device,
    batch_size: int,
    max_new_tokens: int,
    limit: int | None = None,
    autocast=nullcontext,
    on_bad_sample: str = "error",
    ranks: EvalRanks = ONE_PROCESS,
) -> EvalResult:
    """Loss on `loss_set` (an SFTDataset of the eval file) and exact match on `gen_set` (its EvalDataset). A sample
    gone bad since validation is left out and listed in `result.skipped` under on_bad_sample=skip (each split
    counts its own), else one SampleError line naming it. `ranks`: split across ranks (`evaluation.ranks`; every
    rank gets the result one process computes)."""
    result = EvalResult()
    with ranks.evaluating(model):
        if loss_set is not None and len(loss_set):
            indices = list(range(min(len(loss_set), limit or len(loss_set))))
            collator = Collator(processor.pad_id, padding_side="right")
            load = _Loader(loss_set, on_bad_sample, result.skipped)
            result.loss, result.loss_tokens = eval_loss(
                model, loss_set, indices, collator, batch_size, device, autocast, load, ranks
            )
        if gen_set is not None and len(gen_set):
            indices = list(range(min(len(gen_set), limit or len(gen_set))))
            load = _Loader(gen_set, on_bad_sample, result.skipped)
            result.accuracy, result.by_type, result.predictions = exact_match(
                model, gen_set, indices, processor, batch_size, max_new_tokens, device, autocast, load, ranks
            )
            result.num_samples = len(result.predictions)
    result.skipped = ranks.gather(result.skipped)
    return result
