"""Tree-shaped drafts: tree attention (``moba.decode.tree``) and greedy tree speculative decoding.

Every node of a draft tree must get exactly the output it would get as the last token of
its own path (cache + ancestors + itself), for MoBA (path-dependent block means where the
tree reaches into a block) and full attention; greedy tree speculative decoding must give
plain greedy decoding's tokens.
"""

from __future__ import annotations

import copy

import pytest
import torch

import moba
from moba.decode import BlockMeanState
from moba.decode.tree import ancestor_mask, check_parents, moba_tree_attention, tree_depths
from moba.generate import (
    GPTAdapter,
    TreeDraft,
    generate_plain,
    generate_speculative,
    generate_tree_speculative,
)
from scaling_runs.config import ModelConfig
from scaling_runs.model import GPT

TOL = 1e-10  # float64

TREES = [
    pytest.param(10, [-1, 0, 1, 2, -1, 4, 0, 6], 4, 2, id="two-roots"),
    pytest.param(7, [-1, 0, 1, 2, 3, 4, 5, 6, 7, 8, -1, 10, 1], 4, 2, id="deep-chain-crosses-blocks"),
    pytest.param(12, [-1, -1, 0, 1, 2, 3, 2], 4, 3, id="cache-ends-on-a-boundary"),
    pytest.param(3, [-1, 0, 1, 2, 3], 4, 99, id="full-attention"),
    pytest.param(33, [-1, 0, 0, 1, 2, 3, 4], 5, 3, id="bs5"),
    pytest.param(1, [-1], 1, 2, id="bs1-single-node"),
]


def _path(parents, i):
    path = []
    while i >= 0:
        path.append(i)
        i = parents[i]
    return path[::-1]


def test_tree_helpers():
    parents = [-1, 0, 0, -1, 1]
    assert tree_depths(parents) == [0, 1, 1, 0, 2]
    assert ancestor_mask(parents)[4].tolist() == [True, True, False, False, True]
    for bad in ([0], [-1, 1], [-1, -2], [-1, 0.5], [True]):
        with pytest.raises(ValueError, match="parents"):
            check_parents(bad)


@pytest.mark.parametrize("hq,hkv", [(4, 2), (3, 3), (4, 1)])
@pytest.mark.parametrize("cache_len,parents,bs,top_k", TREES)
def test_tree_attention_equals_each_paths_reference(cache_len, parents, bs, top_k, hq, hkv):
    torch.manual_seed(0)
    n, d, dt = len(parents), 8, torch.float64
    kc, vc = torch.randn(2, 1, cache_len, hkv, d, dtype=dt)
    q = torch.randn(n, hq, d, dtype=dt)
    k, v = torch.randn(2, n, hkv, d, dtype=dt)
    out = moba_tree_attention(q, k, v, parents, kc, vc, BlockMeanState(bs), bs, top_k, d**-0.5)
    for i in range(n):
        path = _path(parents, i)
        keys = torch.cat([kc[0], k[path]])[None]
        vals = torch.cat([vc[0], v[path]])[None]
        queries = torch.randn(1, keys.shape[1], hq, d, dtype=dt)
        queries[0, -1] = q[i]
        ref = moba.moba_attn_func(queries, keys, vals, bs, top_k, causal=True, backend="reference")[0, -1]
        torch.testing.assert_close(out[i], ref, atol=TOL, rtol=0)


def _gpt(attention="moba", n_full_layers=0, seed=0, scale=1.0):
    torch.manual_seed(seed)
    cfg = ModelConfig(n_layer=3, n_head=4, n_kv_head=2, n_embd=64, context=128, vocab_size=50, block_size=8,
                      top_k=2, attention=attention, n_full_layers=n_full_layers, tie_embeddings=False)
    gpt = GPT(cfg).double().eval()
    with torch.no_grad():
        for p in gpt.parameters():
            p.mul_(scale)
    return gpt


@pytest.mark.parametrize("attention,n_full", [("moba", 0), ("hybrid", 1), ("full", 0)])
def test_gpt_tree_forward_equals_path_forwards(attention, n_full):
    gpt = _gpt(attention, n_full)
    ids = torch.randint(0, 50, (1, 30), generator=torch.Generator().manual_seed(1))
    parents = [-1, 0, 1, 2, -1, 4, 0, 6, 7, 8, 9, 10]  # the long branch crosses two 8-token blocks
    nodes = torch.randint(0, 50, (len(parents),), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cache = moba.KVCache()
        gpt(ids[:, :27], cache=cache)
        out = gpt(torch.cat([ids[:, 27:], nodes[None]], 1), cache=cache, tree=parents)
        assert cache.get_seq_length() == 30  # the 3 ordinary tokens are cached, the tree is not
        torch.testing.assert_close(out[0, :3], gpt(ids)[0, 27:], atol=TOL, rtol=0)
        for i in range(len(parents)):
            seq = torch.cat([ids[0], nodes[_path(parents, i)]])[None]
            torch.testing.assert_close(out[0, 3 + i], gpt(seq)[0, -1], atol=TOL, rtol=0)
        # the cache is still good for ordinary decoding afterwards
        more = gpt(ids[:, :0].new_tensor([[7]]), cache=cache)
        torch.testing.assert_close(more[0, -1], gpt(torch.cat([ids, ids.new_tensor([[7]])], 1))[0, -1],
                                   atol=TOL, rtol=0)


@pytest.fixture(scope="module")
def models():
    target = GPTAdapter(_gpt(scale=4.0))  # sharper logits: a varied greedy continuation
    draft = GPTAdapter(copy.deepcopy(target.gpt))
    with torch.no_grad():  # a noisy copy: its chain is often wrong, its runner-up sometimes right
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7), dtype=p.dtype) * 0.5 * p.std())
    return target, draft


def test_greedy_tree_speculation_equals_plain_and_branches_help(models):
    target, draft = models
    ids = torch.randint(0, 50, (1, 20), generator=torch.Generator().manual_seed(6))
    plain = generate_plain(target, ids, 40)
    assert len(set(plain[0, 20:].tolist())) > 5
    linear, lin_stats = generate_speculative(target, draft, ids, 40, gamma=4)
    forwards = {}
    for branching in (1, 2, 4):
        out, st = generate_tree_speculative(target, draft, ids, 40, depth=4, branching=branching)
        assert torch.equal(out, plain), branching
        assert st.new_tokens == 40 and st.proposed % branching == 0 and st.proposed <= st.rounds * 4 * branching
        forwards[branching] = st.target_forwards
    assert torch.equal(linear, plain)
    assert forwards[1] == lin_stats.target_forwards  # a one-branch tree is a linear draft
    assert forwards[4] < forwards[1]  # runner-up tokens rescue some rounds


def test_tree_draft_shape_and_errors(models):
    target, draft = models
    tree_draft = TreeDraft(draft, branching=3)
    nodes, parents = tree_draft.propose_tree([1, 2, 3, 4], 3)
    assert len(nodes) == 9 and parents == [-1, -1, -1, 0, 0, 0, 3, 3, 3]
    ids = torch.randint(0, 50, (1, 5))
    with pytest.raises(ValueError, match="branching"):
        TreeDraft(draft, branching=0)
    with pytest.raises(ValueError, match="depth"):
        generate_tree_speculative(target, draft, ids, 4, depth=-1)

    class NoTree(torch.nn.Module):
        def forward(self, **_):
            raise AssertionError("never called")

    with pytest.raises(TypeError, match="tree attention"):
        generate_tree_speculative(NoTree(), draft, ids, 4)
    with pytest.raises(ValueError, match="batch size 1"):
        target.gpt(torch.zeros(2, 3, dtype=torch.long), cache=moba.KVCache(), tree=[-1])
