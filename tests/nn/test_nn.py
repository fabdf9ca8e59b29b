"""nn modules: hybrid MoBA / full schedules (checked per layer), training step, packed inputs."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moba
import moba.ops.full as full
from moba.nn import HybridSchedule, MoBAAttention, MoBASelfAttention, attention_modules, set_attention_mode

BS, TOP_K = 4, 2


class TinyLM(nn.Module):
    def __init__(self, vocab=32, width=32, layers=3, heads=4, kv_heads=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(
            MoBASelfAttention(width, heads, kv_heads, block_size=BS, top_k=TOP_K) for _ in range(layers)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(layers))
        self.head = nn.Linear(width, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        for norm, block in zip(self.norms, self.blocks, strict=True):
            x = x + block(norm(x))
        return self.head(x)


def _dense(q, k, v):
    g = q.shape[2] // k.shape[2]
    return F.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(g, 2).transpose(1, 2), v.repeat_interleave(g, 2).transpose(1, 2),
        is_causal=True,
    ).transpose(1, 2)


def _observed_attention(model, ids):
    """Run the model; for every attention core, which attention its output matches: 'full' or 'moba'."""
    seen = []
    hooks = [core.register_forward_hook(lambda m, a, out: seen.append((a, out))) for core in attention_modules(model)]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    kinds = []
    for (q, k, v, *_), out in seen:
        dense = _dense(q, k, v)
        sparse = moba.moba_attn_func(q, k, v, BS, TOP_K)
        assert not torch.allclose(dense, sparse, atol=1e-4), "test needs MoBA and dense to differ"
        if torch.allclose(out, dense, atol=1e-5):
            kinds.append("full")
        elif torch.allclose(out, sparse, atol=1e-5):
            kinds.append("moba")
        else:
            kinds.append("neither")
    return kinds


def test_schedule_modes_and_validation():
    s = HybridSchedule(full_last_n=2, switch_to_full_at_step=10)
    assert s.modes(5, 0) == ["moba", "moba", "moba", "full", "full"]
    assert s.modes(5, 9) == s.modes(5, 0)
    assert s.modes(5, 10) == ["full"] * 5
    assert HybridSchedule(full_layers=(0, -1)).modes(4, 10**6) == ["full", "moba", "moba", "full"]
    with pytest.raises(ValueError, match="out of range"):
        HybridSchedule(full_layers=(7,)).modes(3, 0)
    with pytest.raises(ValueError, match="full_last_n"):
        HybridSchedule(full_last_n=-1)
    with pytest.raises(ValueError, match="switch_to_full_at_step"):
        HybridSchedule(switch_to_full_at_step=1.5)
    with pytest.raises(ValueError, match="no MoBAAttention"):
        HybridSchedule().apply(nn.Linear(2, 2), 0)


def test_chosen_layers_run_full_attention(monkeypatch):
    torch.manual_seed(0)
    model = TinyLM()
    ids = torch.randint(0, 32, (2, 24))
    assert HybridSchedule(full_last_n=1).apply(model, step=0) == ["moba", "moba", "full"]
    monkeypatch.setattr(full, "_last_implementation", None)
    assert _observed_attention(model, ids) == ["moba", "moba", "full"]
    assert moba.last_full_attn_implementation() == "sdpa"  # the full layer went through moba.ops.full
    HybridSchedule(full_layers=(0,)).apply(model, step=0)
    assert _observed_attention(model, ids) == ["full", "moba", "moba"]
    # the older one-off helper still works
    assert set_attention_mode(model, "full", layers=[-2]) == [1]
    assert _observed_attention(model, ids) == ["full", "full", "moba"]


def test_switch_mid_training_changes_later_steps():
    torch.manual_seed(1)
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    schedule = HybridSchedule(full_last_n=1, switch_to_full_at_step=2)
    ids = torch.randint(0, 32, (2, 20))
    observed = []
    for step in range(4):
        schedule.apply(model, step)
        observed.append(_observed_attention(model, ids))
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert observed[:2] == [["moba", "moba", "full"]] * 2
    assert observed[2:] == [["full", "full", "full"]] * 2


@pytest.mark.parametrize("mode", ["moba", "full"])
def test_one_optimizer_step_lowers_the_loss(mode):
    torch.manual_seed(2)
    model = TinyLM()
    set_attention_mode(model, mode)
    ids = torch.randint(0, 32, (4, 25))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss_fn():
        return F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())

    before = loss_fn()
    opt.zero_grad()
    before.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.blocks[0].q_proj.weight.grad.abs().sum() > 0  # through the attention, not only the head
    opt.step()
    with torch.no_grad():
        after = loss_fn()
    assert after < before - 1e-3


def test_self_attention_packed_equals_per_sequence():
    torch.manual_seed(3)
    layer = MoBASelfAttention(16, 4, 2, block_size=3, top_k=2)
    x = torch.randn(2, 11, 16)
    cu = torch.tensor([0, 11, 22], dtype=torch.int32)
    packed = layer(x.reshape(22, 16), cu_seqlens=cu, max_seqlen=11)
    torch.testing.assert_close(packed.reshape(2, 11, 16), layer(x), rtol=1e-5, atol=1e-5)
    core = MoBAAttention(block_size=3, top_k=2, mode="full")
    with pytest.raises(ValueError, match="mode must be one of"):
        MoBAAttention(mode="sparse")
    assert "mode=full" in repr(core)


def test_self_attention_refuses_a_width_its_heads_do_not_divide():
    with pytest.raises(ValueError, match=r"hidden_size \(30\) must be a multiple of num_heads \(4\)"):
        MoBASelfAttention(30, 4, 2, block_size=4, top_k=2)
    layer = MoBASelfAttention(30, 4, 2, head_dim=8, block_size=4, top_k=2)  # an explicit head_dim is fine
    assert layer(torch.randn(1, 6, 30)).shape == (1, 6, 30)
