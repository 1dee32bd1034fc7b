"""Evaluation split across ranks, the pieces a multi-rank launch cannot show one by one (tests/test_deepspeed.py checks
the whole: 2 ranks give one process's predictions and metrics, exactly, under ZeRO-2 and ZeRO-3)."""

import pytest
import torch
from helpers import build_model

from deepseek_vl2_lora.evaluation.ranks import EvalRanks
from deepseek_vl2_lora.model.generation import generate


@pytest.mark.parametrize("n_batches,world", [(7, 2), (8, 2), (1, 3), (0, 2), (5, 1)])
def test_every_batch_runs_once_and_every_rank_runs_as_many_slots(n_batches, world):
    slots = [EvalRanks(r, world).slots(n_batches) for r in range(world)]
    assert len({len(s) for s in slots}) == 1 and len(slots[0]) == -(-n_batches // world)
    real = sorted(b for s in slots for b in s if b is not None)
    assert real == list(range(n_batches))


def test_zero3_lockstep_runs_the_vision_side_on_text_only_forwards_without_changing_them():
    """Under ZeRO-3 with several ranks, a forward given an image batch without images runs the vision tower too
    (a rank whose batch has images gathers its sharded weights), and its output is the plain one; decode steps
    (no image batch at all) do not; outside evaluation the model is back as it was."""
    model = build_model("tiny-mha")
    calls = []
    model.vision.register_forward_pre_hook(lambda *a: calls.append(1))
    model.vision.patch_embed.register_forward_pre_hook(lambda *a: calls.append(1))
    s = model.config.vision.image_size
    ids = torch.randint(3, 300, (2, 7))
    text_only = dict(images=torch.zeros(2, 1, 3, s, s), images_seq_mask=torch.zeros(2, 7, dtype=torch.bool),
                     images_spatial_crop=torch.zeros(2, 1, 2, dtype=torch.long))  # fmt: skip
    with torch.no_grad():
        plain = model(input_ids=ids, **text_only).logits
        assert calls == []
        with EvalRanks(0, 2, zero3=True).evaluating(model):
            assert not model.training
            locked = model(input_ids=ids, **text_only).logits
            assert calls  # the vision side ran
            calls.clear()
            model(input_ids=ids)  # a decode step: no image batch
            assert calls == []
        with EvalRanks(0, 2, zero3=False).evaluating(model):  # ZeRO-2: weights replicated, nothing to keep in step
            model(input_ids=ids, **text_only)
            assert calls == []
    assert torch.equal(locked, plain) and model.training and not model.vision_in_every_forward


def test_a_padding_generation_counts_as_finished_from_the_start():
    model = build_model("tiny-mha").eval()
    ids = torch.randint(3, 300, (1, 4))
    out = generate(model, ids, torch.ones_like(ids), max_new_tokens=5, eos_token_id=2, padding=True)
    assert out.tolist() == [[2]]  # one forward, then done (with other ranks: until theirs are done too)


def test_only_zero3_ranks_run_padding_batches_in_lockstep():
    """Replicated weights: a rank runs its own batches and stops generating when its rows are done; several ZeRO-3
    ranks run every slot and generate in step."""
    settings = [(1, False), (2, False), (1, True), (2, True)]  # (world size, ZeRO-3)
    assert [EvalRanks(0, w, zero3=z).lockstep for w, z in settings] == [False, False, False, True]
