"""Packing: several samples per row must compute exactly what one sample per row computes."""

import random

import pytest
import torch
from helpers import FAMILIES, build_model, tokens_per_image

from deepseek_vl2_lora.data.collate import Collator
from deepseek_vl2_lora.data.packing import first_fit_decreasing, pack_samples, sample_lengths
from deepseek_vl2_lora.evaluation.eval_set import MODEL_INPUTS
from deepseek_vl2_lora.model.attention import (
    SegmentMask,
    eager_attention,
    per_sample_attention,
    positions_from_segments,
    sdpa_attention,
)
from deepseek_vl2_lora.model.moe import Router

VOCAB = 300


# ------------------------------------------------------------------------------------------ bin packing
@pytest.mark.parametrize("seed", range(20))
def test_first_fit_decreasing_places_every_sample_once_within_capacity(seed):
    rng = random.Random(seed)
    capacity = rng.randint(5, 60)
    lengths = [rng.randint(1, 80) for _ in range(rng.randint(1, 30))]
    rows = first_fit_decreasing(lengths, capacity)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    for row in rows:
        total = sum(lengths[i] for i in row)
        assert total <= capacity or len(row) == 1  # an overlong sample sits alone
    assert rows == first_fit_decreasing(lengths, capacity)  # deterministic


def test_first_fit_decreasing_fills_rows():
    assert first_fit_decreasing([3, 5, 2, 4], 7) == [[1, 2], [3, 0]]
    with pytest.raises(ValueError, match="capacity"):
        first_fit_decreasing([1], 0)


# ------------------------------------------------------------------------------------------ samples
def _samples(cfg, seed=0):
    """Encoded samples as the processor returns them: two with images (one with two images), three text-only,
    all different lengths."""
    g = torch.Generator().manual_seed(seed)
    s = cfg.vision.image_size

    def sample(pre, images, post, text_between=4):
        parts, mask_parts, tiles, crops = [torch.randint(3, VOCAB, (pre,), generator=g)], [], [], []
        mask_parts.append(torch.zeros(pre, dtype=torch.bool))
        for j, (tw, th) in enumerate(images):
            n = tokens_per_image(cfg, tw, th)
            parts.append(torch.randint(3, VOCAB, (n,), generator=g))
            mask_parts.append(torch.ones(n, dtype=torch.bool))
            tiles.append(torch.randn(1 + tw * th, 3, s, s, generator=g))
            crops.append([tw, th])
            if j < len(images) - 1:
                parts.append(torch.randint(3, VOCAB, (text_between,), generator=g))
                mask_parts.append(torch.zeros(text_between, dtype=torch.bool))
        parts.append(torch.randint(3, VOCAB, (post,), generator=g))
        mask_parts.append(torch.zeros(post, dtype=torch.bool))
        ids, mask = torch.cat(parts), torch.cat(mask_parts)
        labels = ids.clone()
        labels[mask] = -100
        labels[: pre // 2] = -100  # a masked prompt prefix
        return {
            "input_ids": ids,
            "labels": labels,
            "images_seq_mask": mask,
            "images": torch.cat(tiles) if tiles else torch.zeros(1, 3, s, s),
            "images_spatial_crop": torch.tensor(crops) if crops else torch.zeros(1, 2, dtype=torch.long),
            "answer": f"a{pre}",
        }

    return [
        sample(5, [(2, 1), (1, 2)], 7),
        sample(9, [], 6),
        sample(3, [(1, 1)], 4),
        sample(12, [], 9),
        sample(4, [], 3),
    ]


def test_pack_samples_fields():
    model = build_model("small-mla", vocab=VOCAB)
    samples = _samples(model.config)
    lengths = [len(s["input_ids"]) for s in samples]
    capacity = max(lengths) + 10
    packed = pack_samples(samples, capacity)
    assert sum(len(p["input_ids"]) for p in packed) == sum(lengths)
    seen = []
    for p in packed:
        assert len(p["input_ids"]) <= capacity
        seg = p["segment_ids"]
        for j in range(1, int(seg.max()) + 1):
            where = (seg == j).nonzero().flatten()
            assert (where == torch.arange(where[0], where[-1] + 1)).all()  # contiguous
            assert p["position_ids"][where].tolist() == list(range(len(where)))
            assert p["labels"][where[0]] == -100  # never predicted from the previous sample
            seen.append(p["input_ids"][where])
        crop = p["images_spatial_crop"]
        n_tiles = int((crop[:, 0] * crop[:, 1] + 1).masked_fill(crop[:, 0] == 0, 0).sum())
        assert n_tiles == 0 or p["images"].shape[0] == n_tiles
    assert sorted(map(tuple, (t.tolist() for t in seen))) == sorted(tuple(s["input_ids"].tolist()) for s in samples)
    batch = Collator(0, pack_length=capacity)(samples)
    assert batch["input_ids"].shape[0] == len(packed) < len(samples)
    assert sorted(sample_lengths(batch)) == sorted(lengths)
    assert sorted(a for row in batch["answer"] for a in row) == sorted(s["answer"] for s in samples)
    assert (positions_from_segments(batch["segment_ids"]) * batch["attention_mask"] == batch["position_ids"]).all()


# ------------------------------------------------------------------------------------------ attention
def _reference_attention(q, k, v, spans, scale):
    """Each (row, span) attended on its own with a plain causal softmax in float64."""
    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=torch.float64)
    for r, row in enumerate(spans):
        for s0, e in row:
            qq, kk, vv = (t[r, :, s0:e].double() for t in (q, k, v))
            scores = qq @ kk.transpose(-1, -2) * scale
            causal = torch.ones(e - s0, e - s0, dtype=torch.bool).tril()
            out[r, :, s0:e] = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ vv
    return out


@pytest.mark.parametrize("dims", [(24, 16), (16, 16)])  # MLA-like d_qk != d_v, and MHA
def test_segment_attention_matches_per_sample_reference(dims):
    dq, dv = dims
    g = torch.Generator().manual_seed(0)
    seg = torch.tensor([[1, 1, 1, 2, 2, 3, 3, 3, 3, 0, 0], [1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2]])
    q, k = (torch.randn(2, 3, 11, dq, generator=g) for _ in range(2))
    v = torch.randn(2, 3, 11, dv, generator=g)
    segments = SegmentMask(seg)
    assert segments.spans == [[(0, 3), (3, 5), (5, 9), (9, 11)], [(0, 6), (6, 11)]]
    ref = _reference_attention(q, k, v, segments.spans, 0.3)

    def plain_sdpa(q, k, v, causal, scale):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)

    for fn in (eager_attention, sdpa_attention):
        torch.testing.assert_close(fn(q, k, v, SegmentMask(seg), 0.3).double(), ref, rtol=1e-5, atol=1e-6)
    looped = per_sample_attention(q, k, v, SegmentMask(seg), 0.3, attend=plain_sdpa)
    torch.testing.assert_close(looped.double(), ref, rtol=1e-5, atol=1e-6)


def test_segment_ids_must_be_contiguous():
    with pytest.raises(ValueError, match="row 0.*not contiguous"):
        _ = SegmentMask(torch.tensor([[1, 1, 2, 1]])).spans


# ------------------------------------------------------------------------------------------ model
def _per_sample_logits(logits, batch):
    """{input_ids tuple: logits of that sample's tokens}, packed or not."""
    out = {}
    seg = batch.get("segment_ids", batch["attention_mask"])
    for r in range(logits.shape[0]):
        for j in range(1, int(seg[r].max()) + 1):
            where = (seg[r] == j).nonzero().flatten()
            out[tuple(batch["input_ids"][r, where].tolist())] = logits[r, where]
    return out


def _run(model, batch, return_logits=True):
    inputs = {k: batch[k] for k in MODEL_INPUTS + ("segment_ids",) if k in batch}
    model.zero_grad(set_to_none=True)
    out = model(**inputs, labels=batch["labels"], return_logits=return_logits)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_packed_batch_equals_unpacked(family, backend):
    model = build_model(family, vocab=VOCAB, attn_implementation=backend)
    model.train()
    for m in model.modules():
        if isinstance(m, Router):
            m.alpha = 0.0  # the sequence-level aux loss sees rows, not samples: compare the LM alone
    samples = _samples(model.config)
    plain = Collator(0)(samples)
    packed = Collator(0, pack_length=max(len(s["input_ids"]) for s in samples) + 12)(samples)
    assert packed["input_ids"].shape[0] < plain["input_ids"].shape[0]
    out_plain, grads_plain = _run(model, plain)
    out_packed, grads_packed = _run(model, packed)
    a, b = _per_sample_logits(out_plain.logits, plain), _per_sample_logits(out_packed.logits, packed)
    assert a.keys() == b.keys() and len(a) == len(samples)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_packed.loss, out_plain.loss, rtol=1e-5, atol=1e-6)
    assert grads_packed.keys() == grads_plain.keys()
    for name in grads_plain:
        torch.testing.assert_close(grads_packed[name], grads_plain[name], rtol=1e-4, atol=1e-6, msg=name)
    # the training loss path (no full logits) agrees too
    out_lean, _ = _run(model, packed, return_logits=False)
    torch.testing.assert_close(out_lean.loss, out_plain.loss, rtol=1e-5, atol=1e-6)


def test_packed_absorbed_reference_path_and_model_side_label_masking():
    model = build_model("small-mla", vocab=VOCAB)
    samples = _samples(model.config)
    packed = Collator(0, pack_length=64)(samples)
    out, _ = _run(model, packed)
    for m in model.modules():
        if hasattr(m, "absorbed_reference"):
            m.absorbed_reference = True
    raw = dict(packed)
    raw["labels"] = packed["labels"].clone()
    seg = packed["segment_ids"]
    raw["labels"][:, 1:][seg[:, 1:] != seg[:, :-1]] = 7  # the model ignores these itself
    out_ref, _ = _run(model, raw)
    torch.testing.assert_close(out_ref.logits, out.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_ref.loss, out.loss, rtol=1e-5, atol=1e-6)


def test_packed_rows_take_no_cache():
    model = build_model("tiny-mha", vocab=VOCAB)
    batch = Collator(0, pack_length=64)(_samples(model.config))
    out = model(input_ids=batch["input_ids"][:, :4], use_cache=True)
    with pytest.raises(ValueError, match="no KV cache"):
        model(
            input_ids=batch["input_ids"][:, 4:5],
            segment_ids=batch["segment_ids"][:, 4:5],
            past_key_values=out.past_key_values,
        )


# ------------------------------------------------------------------------------------------ compile
@pytest.mark.parametrize("packed", [False, True])
def test_compiled_layers_match_eager(packed):
    """trainer.compile_blocks: every decoder layer compiled (aot_eager here: traces the graphs without a C
    compiler) gives the eager loss and gradients, packed rows included."""
    torch._dynamo.reset()
    model = build_model("full-noaux", vocab=VOCAB, attn_implementation="sdpa")
    model.train()
    samples = _samples(model.config)
    batch = Collator(0, pack_length=64 if packed else None)(samples)
    out_eager, grads_eager = _run(model, batch, return_logits=False)
    model.language.model.compile_layers(backend="aot_eager")
    torch._dynamo.utils.counters.clear()
    out_comp, grads_comp = _run(model, batch, return_logits=False)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # the dense and the MoE layer at least
    torch.testing.assert_close(out_comp.loss, out_eager.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_comp.aux_loss, out_eager.aux_loss, rtol=1e-5, atol=1e-7)
    for name in grads_eager:
        torch.testing.assert_close(grads_comp[name], grads_eager[name], rtol=1e-4, atol=1e-6, msg=name)
