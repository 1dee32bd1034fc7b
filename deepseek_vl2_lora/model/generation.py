"""Greedy or sampled decoding with a KV cache, for left-padded batches (the collator's generation mode)."""

from __future__ import annotations

import torch


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    images=None,
    images_seq_mask=None,
    images_spatial_crop=None,
    max_new_tokens: int = 16,
    eos_token_id: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    stream=None,
    padding: bool = False,
    lockstep: bool = False,
) -> torch.Tensor:
    """Returns the new tokens [B, n ≤ max_new_tokens]; finished rows are padded with `eos_token_id`.

    `stream`, if given, is called with each step's tokens [B] as they are produced. `lockstep` (ranks whose
    forwards are collectives, DeepSpeed ZeRO-3): stop only when every rank's rows are done, checked with an
    all-reduce each step. `padding`: a rank with no prompts left while other ranks generate in lockstep: its rows
    count as finished from the start, so it only runs the forwards and the checks in step with the others.
    """
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("generate needs left padding (the last column of attention_mask must be all ones)")
    # Every step goes through model(...), never through its submodules directly, so wrappers that gather
    # parameters in forward hooks (DeepSpeed ZeRO-3) see each call.
    image_kw = {"images": images, "images_seq_mask": images_seq_mask, "images_spatial_crop": images_spatial_crop}
    ids, mask = input_ids, attention_mask.long()
    past, new_tokens = None, []
    done = torch.full((input_ids.shape[0],), padding, dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        if use_cache and step > 0:  # only the new token; the cache holds the rest
            out = model(input_ids=ids[:, -1:], attention_mask=mask, past_key_values=past, use_cache=True)
        else:  # the whole sequence, images included (the prompt, or every step without a cache)
            seq_mask = images_seq_mask
            if seq_mask is not None and seq_mask.shape[1] < ids.shape[1]:
                seq_mask = torch.nn.functional.pad(seq_mask, (0, ids.shape[1] - seq_mask.shape[1]), value=False)
            out = model(
                input_ids=ids, attention_mask=mask, use_cache=use_cache, **{**image_kw, "images_seq_mask": seq_mask}
            )
        token = _pick(out.logits[:, -1], do_sample, temperature, top_p, generator)
        if eos_token_id is not None:
            token = torch.where(done, torch.full_like(token, eos_token_id), token)
            done |= token == eos_token_id
        new_tokens.append(token)
        if stream is not None:
            stream(token)
        if eos_token_id is not None and (_all_ranks_done(done) if lockstep else bool(done.all())):
            break
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        past = out.past_key_values
    return torch.stack(new_tokens, dim=1)


def _all_ranks_done(done: torch.Tensor) -> bool:
    """Every row finished, on every rank: under ZeRO-3 each forward gathers weights collectively, so one rank
    stopping early would leave the others waiting. Without a process group, this process's rows."""
    finished = done.all()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        flag = finished.to(torch.int32).reshape(1)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        finished = flag[0].bool()
    return bool(finished)


def _pick(logits, do_sample, temperature, top_p, generator):
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / max(temperature, 1e-5), dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the most likely token
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
