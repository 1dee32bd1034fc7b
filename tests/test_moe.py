"""MoE: routers against hand-worked examples, loop vs grouped kernels, gradients in train and eval, aux loss."""

import dataclasses

import pytest
import torch

from deepseek_vl2_lora.model import VL2Config
from deepseek_vl2_lora.model.moe import MoE, RoutedExperts, Router
from deepseek_vl2_lora.model.tiny import family_config


def _cfg(family="small-mla", **changes):
    return dataclasses.replace(VL2Config.from_dict(family_config(family, 100)).language, **changes)


def _router_with_scores(cfg, logits):
    """A router whose fp32 logits for inputs eye(E) are exactly `logits` (one row per token)."""
    e = cfg.n_routed_experts
    cfg = dataclasses.replace(cfg, hidden_size=e)
    r = Router(cfg)
    with torch.no_grad():
        r.weight.copy_(logits.T)  # x = one-hot rows -> x @ Wᵀ = rows of logits
    return r


def test_greedy_softmax_topk_and_scaling():
    cfg = _cfg(n_routed_experts=4, num_experts_per_tok=2, routed_scaling_factor=1.5, norm_topk_prob=False)
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    r = _router_with_scores(cfg, logits.repeat(4, 1)).eval()
    idx, w, aux = r(torch.eye(4)[:1].view(1, 1, 4))
    p = torch.softmax(logits[0], -1)
    assert sorted(idx[0].tolist()) == [2, 3]
    assert torch.allclose(w[0].sort().values, torch.stack([p[2], p[3]]) * 1.5)
    assert aux is None  # eval mode: no aux loss


def test_group_limited_greedy_keeps_best_groups():
    # 2 groups of 2 experts; group score = max inside the group. Token prefers expert 0 (group 0) overall,
    # but with topk_group=1 and group 1 holding the single highest score, only group 1 may be chosen.
    cfg = _cfg(
        n_routed_experts=4,
        num_experts_per_tok=2,
        topk_method="group_limited_greedy",
        n_group=2,
        topk_group=1,
        norm_topk_prob=False,
    )
    logits = torch.tensor([[2.0, 1.9, 2.5, -3.0]])
    r = _router_with_scores(cfg, logits.repeat(4, 1)).eval()
    idx, w, _ = r(torch.eye(4)[:1].view(1, 1, 4))
    p = torch.softmax(logits[0], -1)
    assert sorted(idx[0].tolist()) == [2, 3]  # group 1 only; expert 3 is picked with its (small) score
    assert torch.allclose(w[0].sort().values, torch.stack([p[3], p[2]]))


def test_noaux_tc_selects_on_biased_weights_from_unbiased():
    cfg = _cfg(
        "full-noaux",
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.0,
        norm_topk_prob=True,
    )
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5]])
    r = _router_with_scores(cfg, logits.repeat(4, 1))
    with torch.no_grad():
        r.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 0.6, 0.6]))  # moves the choice to group 1
    r.train()  # the official code asserts here; ours must train
    idx, w, aux = r(torch.eye(4)[:1].view(1, 1, 4))
    s = torch.sigmoid(logits[0])
    # biased: [.73, .62, 1.1, .98] -> group sums of top-2: g0 1.35, g1 2.08 -> group 1 -> experts 2, 3
    assert sorted(idx[0].tolist()) == [2, 3]
    expected = torch.stack([s[2], s[3]]) / (s[2] + s[3]) * 2.0
    got = w[0][idx[0].argsort()]
    assert torch.allclose(got, expected)
    assert aux is not None and aux.requires_grad


def _aux_by_hand(scores, idx, b, s, e, k, alpha, seq_aux):
    if seq_aux:
        total = 0.0
        for bi in range(b):
            counts = torch.zeros(e)
            for t in range(s):
                for j in range(k):
                    counts[idx[bi * s + t, j]] += 1
            f = counts / (s * k / e)
            total += float((f * scores[bi * s : (bi + 1) * s].mean(0)).sum())
        return total / b * alpha
    counts = torch.zeros(e)
    for row in idx.tolist():
        for j in row:
            counts[j] += 1
    fi = counts / idx.numel() * e
    return float((scores.mean(0) * fi).sum()) * alpha


@pytest.mark.parametrize("seq_aux", [True, False])
def test_aux_loss_formula(seq_aux):
    cfg = _cfg(aux_loss_alpha=0.01, seq_aux=seq_aux)
    r = Router(cfg).train()
    x = torch.randn(2, 5, cfg.hidden_size)
    idx, _, aux = r(x)
    scores = torch.softmax(x.reshape(-1, cfg.hidden_size) @ r.weight.detach().T, -1)
    ref = _aux_by_hand(scores, idx, 2, 5, cfg.n_routed_experts, cfg.num_experts_per_tok, 0.01, seq_aux)
    assert aux.item() == pytest.approx(ref, rel=1e-5)


def _experts_pair(e=6, d=16, i=8):
    a = RoutedExperts(e, d, i, kernel="loop")
    b = RoutedExperts(e, d, i, kernel="grouped")
    b.load_state_dict(a.state_dict())
    return a, b


def test_grouped_kernel_matches_loop_forward_and_grads():
    loop, grouped = _experts_pair()
    n, k = 11, 2
    x = torch.randn(n, 16, requires_grad=True)
    idx = torch.randint(0, 5, (n, k))  # expert 5 never hit: an empty group
    idx[:, 1] = (idx[:, 0] + 1) % 5
    w = torch.rand(n, k, requires_grad=True)
    outs, grads = [], []
    for m in (loop, grouped):
        y = m(x, idx, w)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append(y.detach())
        grads.append([x.grad.clone(), w.grad.clone()] + [p.grad.clone() for p in m.parameters()])
        x.grad = w.grad = None
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    for g0, g1 in zip(grads[0], grads[1]):
        assert torch.allclose(g0, g1, atol=1e-5)
    assert grads[1][2][5].abs().sum() == 0  # the empty expert gets a zero gradient


def test_loop_kernel_against_per_token_math():
    loop, _ = _experts_pair()
    x, idx, w = torch.randn(4, 16), torch.tensor([[0, 3], [3, 1], [2, 2], [5, 0]]), torch.rand(4, 2)
    y = loop(x, idx, w)
    for t in range(4):
        ref = sum(
            w[t, j]
            * (torch.nn.functional.silu(x[t] @ loop.gate_proj[idx[t, j]].T) * (x[t] @ loop.up_proj[idx[t, j]].T))
            @ loop.down_proj[idx[t, j]].T
            for j in range(2)
        )
        assert torch.allclose(y[t], ref, atol=1e-5)


@pytest.mark.parametrize("family", ["small-mla", "full-noaux"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gradients_reach_experts_and_router_in_both_modes(family, mode):
    moe = MoE(_cfg(family), experts_kernel="loop")
    moe.train(mode == "train")
    y, aux = moe(torch.randn(2, 6, moe.gate.weight.shape[1]))
    y.sum().backward()
    assert moe.experts.gate_proj.grad is not None and moe.experts.gate_proj.grad.abs().sum() > 0
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0
    assert moe.shared_experts.up_proj.weight.grad.abs().sum() > 0
    assert (aux is None) == (mode == "eval")


def test_aux_coefficient_changes_the_router_gradient():
    grads = []
    for alpha in (0.0, 0.5):
        torch.manual_seed(3)
        moe = MoE(_cfg(aux_loss_alpha=alpha), experts_kernel="loop").train()
        torch.manual_seed(4)
        y, aux = moe(torch.randn(2, 6, moe.gate.weight.shape[1]))
        loss = y.pow(2).mean() + (aux if aux is not None else 0.0)
        loss.backward()
        grads.append(moe.gate.weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])
