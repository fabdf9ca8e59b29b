"""Sweep presets: a base config, sizes derived from it, attention kinds and compute budgets.

A size changes only depth and width of the base model; heads follow from the base's head
dimension (``n_head = n_embd // base.head_dim``) and GQA ratio (``n_kv_head = n_head //
(base.n_head // base.n_kv_head)``); context, block size and top-k stay the base's.

A budget is one of
* ``"tokens:N"``: N training tokens;
* ``"flops:C"``: a compute budget C in FLOPs, tokens = C / (6 N_non_embedding);
* ``"tpp:R"``: R tokens per non-embedding parameter (Chinchilla's rule is about 20);
* ``"size"``: the tokens the size itself names (the MoBA paper's models).
Tokens are rounded up to whole optimizer steps.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .config import DataConfig, ModelConfig, RunConfig, TrainConfig
from .model import analytic_param_counts


@dataclass(frozen=True)
class Size:
    name: str
    n_layer: int
    n_embd: int
    tokens: int | None = None  # for the "size" budget
    n_head: int | None = None  # default: n_embd // base head_dim


@dataclass
class SweepPreset:
    name: str
    base: RunConfig
    sizes: list[Size]
    kinds: list[str] = field(default_factory=lambda: ["moba", "full"])
    budgets: list[str] = field(default_factory=lambda: ["tpp:20"])
    gpus_per_run: int = 1
    launch_only: bool = False  # multi-node: write launch scripts instead of running
    note: str = ""
    needs_gpu: bool = False  # sized for GPUs: sweep refuses to train it on a CPU-only machine unless asked

    def model_for(self, size: Size, kind: str) -> ModelConfig:
        b = self.base.model
        n_head = size.n_head or size.n_embd // b.head_dim
        ratio = b.n_head // b.n_kv_head
        n_kv = max(1, n_head // ratio)
        return dataclasses.replace(b, n_layer=size.n_layer, n_embd=size.n_embd, n_head=n_head, n_kv_head=n_kv,
                                   attention=kind)

    def tokens_for(self, size: Size, budget: str, n_non_emb: int) -> int:
        kind, _, value = budget.partition(":")
        if kind == "tokens":
            tokens = float(value)
        elif kind == "flops":
            tokens = float(value) / (6 * n_non_emb)
        elif kind == "tpp":
            tokens = float(value) * n_non_emb
        elif kind == "size":
            if size.tokens is None:
                raise ValueError(f"size {size.name} names no token count for budget 'size'")
            tokens = size.tokens
        else:
            raise ValueError(f"unknown budget {budget!r} (tokens:N, flops:C, tpp:R or size)")
        per_step = self.base.train.batch_size * self.base.model.context
        return max(1, math.ceil(tokens / per_step)) * per_step

    def runs(self) -> list[tuple[str, RunConfig]]:
        """(run name, config) for every size x kind x budget; out_dir is filled in by the sweep."""
        out = []
        for size in self.sizes:
            for budget in self.budgets:
                for kind in self.kinds:
                    m = self.model_for(size, kind)
                    n = analytic_param_counts(m)["non_embedding"]
                    tokens = self.tokens_for(size, budget, n)
                    tag = "" if len(self.budgets) == 1 else "-" + budget.replace(":", "").replace("+", "")
                    name = f"{size.name}-{kind}{tag}"
                    train = dataclasses.replace(self.base.train, max_tokens=tokens)
                    out.append((name, RunConfig(m, dataclasses.replace(self.base.data), train)))
        return out


def _cpu_tiny() -> SweepPreset:
    # Context 256, block 32, top-3: a query at the end reads 3 x 32 = 96 of 256 keys.
    # Time on 2 CPU cores is dominated by the MoBA PyTorch path, whose cost grows with
    # tokens x layers x KV heads, hence head_dim 32 with one KV head (MQA) and one torch
    # thread (the MoBA path runs many small ops; on 2 shared cores 2 threads were 3-10x
    # slower). Sizes are small for their budgets (5-50 tokens per parameter; bigger models
    # would be undertrained and the frontier would bend up); budgets grow more slowly than
    # the sizes, so the runs' compute ranges overlap. About 5 min on 2 idle cores.
    base = RunConfig(
        model=ModelConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=64, context=256, block_size=32, top_k=3),
        data=DataConfig(data="stdlib"),
        train=TrainConfig(batch_size=16, lr=3e-3, warmup_steps=10, eval_every=12, eval_seqs=32,
                          trailing_frac=0.25, n_buckets=4, threads=1),
    )
    sizes = [Size("s1", 1, 32, tokens=600_000), Size("s2", 2, 64, tokens=1_200_000),
             Size("s3", 3, 96, tokens=1_600_000)]
    return SweepPreset("cpu-tiny", base, sizes, ["moba", "full"], ["size"],
                       note="3 sizes (12K, 90K, 296K non-embedding params) x {moba, full}, "
                            "0.6M / 1.2M / 1.6M tokens, byte-level stdlib corpus")


def _gpu_small() -> SweepPreset:
    # One H100, about an hour. Estimate: sum over runs of attn-aware FLOPs / (989e12 * MFU)
    # with MFU 0.15 (`sweep --preset gpu-small --dry_run true` prints it per run): 0.87 h,
    # 80% of it the two s4 runs. With the embedded corpus (~30M tokens) the larger runs
    # repeat it several times: pass --data with llm.c shards (e.g. FineWeb) for real use.
    base = RunConfig(
        model=ModelConfig(n_layer=4, n_head=4, n_kv_head=4, n_embd=256, context=2048, block_size=256, top_k=3),
        data=DataConfig(data="stdlib"),
        train=TrainConfig(batch_size=32, lr=2e-3, warmup_steps=100, eval_every=100, eval_seqs=64,
                          trailing_frac=0.25, n_buckets=8),
    )
    sizes = [Size("s1", 4, 256), Size("s2", 6, 384), Size("s3", 8, 512), Size("s4", 10, 640)]
    return SweepPreset("gpu-small", base, sizes, ["moba", "full"], ["tpp:10"],
                       note="4 sizes x {moba, full}, 10 tokens/param, context 2048, block 256, top-3", needs_gpu=True)


def _paper() -> SweepPreset:
    # The MoBA paper's scaling-law models: 8K context, block 512, top-3 (Lu et al., 2025).
    base = RunConfig(
        model=ModelConfig(n_layer=14, n_head=14, n_kv_head=14, n_embd=1792, context=8192, block_size=512,
                          top_k=3, vocab_size=50304),
        data=DataConfig(data="data/train_*.bin"),
        train=TrainConfig(batch_size=256, lr=3e-4, warmup_steps=500, eval_every=250, eval_seqs=512,
                          trailing_frac=0.25, n_buckets=16, grad_accum=4),  # --compile true to try torch.compile
    )
    B = 1_000_000_000
    sizes = [
        Size("568M", 14, 1792, int(10.8 * B), n_head=14),
        Size("822M", 16, 2048, int(15.3 * B), n_head=16),
        Size("1.1B", 18, 2304, int(20.6 * B), n_head=18),
        Size("1.5B", 20, 2560, int(27.4 * B), n_head=20),
        Size("2.1B", 22, 2816, int(36.9 * B), n_head=22),
    ]
    return SweepPreset("paper", base, sizes, ["moba", "full"], ["size"], gpus_per_run=32, launch_only=True,
                       note="the MoBA paper's five models (8K ctx, block 512, top-3); multi-node launch scripts",
                       needs_gpu=True)


PRESETS = {"cpu-tiny": _cpu_tiny, "gpu-small": _gpu_small, "paper": _paper}


# ---------------------------------------------------------------------------------------
# studies: sizes x arms x seeds with control arms (``python -m scaling_runs.study``)

#: The arms of a study: changes to the base model config. MoBA and its controls all run the
#: MoBA path at the same block size; only what each query reads differs.
ARMS = {
    "full": {"attention": "full"},  # dense causal attention
    "moba": {"attention": "moba"},  # gate picks top_k blocks (own block included)
    "local": {"attention": "moba", "top_k": 1},  # own block only (block-diagonal, causal)
    "random": {"attention": "moba", "block_selection": "random"},  # own + top_k - 1 random past blocks
}


@dataclass
class StudyPreset:
    """A scaling study: every size x arm x seed is one run of ``tpp`` tokens per parameter.

    ``data`` is a data option for ``DataConfig.data``; the placeholder ``"recall"`` means the
    recall corpus (``scaling_runs.tasks.write_recall_corpus``, written under the study folder
    with ``recall_spec`` and ``recall_tokens`` = (train, val) tokens).
    """

    name: str
    base: RunConfig
    sizes: list[Size]
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    tpp: float = 20.0
    data: str = "recall"
    recall_spec: dict = field(default_factory=dict)
    recall_tokens: tuple[int, int] = (4_000_000, 300_000)
    note: str = ""

    def model_for(self, size: Size, arm: str) -> ModelConfig:
        if arm not in ARMS:
            raise ValueError(f"unknown arm {arm!r}; choose from {sorted(ARMS)}")
        b = self.base.model
        n_head = size.n_head or max(1, size.n_embd // b.head_dim)
        ratio = b.n_head // b.n_kv_head
        n_kv = max(1, n_head // ratio)
        return dataclasses.replace(b, n_layer=size.n_layer, n_embd=size.n_embd, n_head=n_head, n_kv_head=n_kv,
                                   **ARMS[arm])

    def tokens_for(self, n_non_emb: int) -> int:
        per_step = self.base.train.batch_size * self.base.model.context
        return max(1, math.ceil(self.tpp * n_non_emb / per_step)) * per_step

    def runs(self, data: str | None = None) -> list[tuple[str, dict, RunConfig]]:
        """(run name, {"size", "arm", "seed"}, config) for every size x arm x seed; ``data``
        replaces the preset's data option (the study resolves "recall" to a folder)."""
        out = []
        for size in self.sizes:
            for arm in self.arms:
                m = self.model_for(size, arm)
                tokens = self.tokens_for(analytic_param_counts(m)["non_embedding"])
                for seed in self.seeds:
                    train = dataclasses.replace(self.base.train, max_tokens=tokens, seed=seed)
                    dcfg = dataclasses.replace(self.base.data, data=data or self.data)
                    out.append((f"{size.name}-{arm}-seed{seed}", {"size": size.name, "arm": arm, "seed": seed},
                                RunConfig(m, dcfg, train)))
        return out


def _cpu_study() -> StudyPreset:
    # Context 512, block 32, top-3: context / block = 16 as the paper's 8K / 512, causal
    # sparsity 0.7096 (the paper's 0.7109; scaling_runs.flops.causal_sparsity).
    # Data: documents of 512 bytes, 3 in 4 with a document-level "topic" (bytes drawn from the
    # document's own 4 of the 26 lower-case letters: every earlier byte of the document tells
    # the next one's alphabet, ln 4 against ln 26 nats), 1 in 4 plain stdlib text
    # (tasks.RecallSpec, filler "topic"). Pilots on 2 shared cores (2026-12-03, not committed):
    # on plain stdlib at 1.6M tokens a top_k=1 model beat full attention (val 2.2251 vs 2.2462,
    # 2 layers, width 64); with a one-hop recall structure the answers were not learned at 1.6M
    # tokens; on this topic mix at 0.5M tokens (2 layers, width 32) local and full were within 0.02.
    # So at these budgets the models may not use the long range at all: the study measures it.
    # Trailing loss: the last 1/16 of the positions (32 of 512). Sizes: one layer, widths 16-64
    # (3K-49K non-embedding parameters, head_dim 16 or 12), 20 tokens per parameter, batch 4 x
    # 512, one torch thread per run, two runs side by side: about 40 min on 2 shared cores.
    base = RunConfig(
        model=ModelConfig(n_layer=2, n_head=2, n_kv_head=2, n_embd=64, context=512, block_size=32, top_k=3),
        data=DataConfig(data="recall"),
        train=TrainConfig(batch_size=4, lr=3e-3, warmup_steps=10, eval_every=60, eval_seqs=64,
                          trailing_frac=1 / 16, n_buckets=16, threads=1),
    )
    sizes = [Size("s1", 1, 16, n_head=1), Size("s2", 1, 24, n_head=2), Size("s3", 1, 32, n_head=2),
             Size("s4", 1, 48, n_head=3), Size("s5", 1, 64, n_head=4)]
    spec = {"doc_len": 512, "member_span": 96, "query_span": 96, "n_groups": 0, "filler": "topic",
            "topic_size": 4, "plain_fraction": 0.25}
    return StudyPreset("cpu-study", base, sizes, recall_spec=spec,
                       note="5 one-layer sizes (3K-49K non-embedding params) x {full, moba, local, random} x 3 "
                            "seeds, 20 tokens/param, context 512, block 32, top-3, topic-document mix")


def _cpu_study_trailing() -> StudyPreset:
    # The paper's trailing loss: a longer-context run scored on its last 1/16 of positions. The
    # cpu-study's largest size (s5) and seeds at context 2048 with the same block 32 and top-3:
    # 64 blocks, causal sparsity 0.9229 (the paper's 32K trailing setting is 92% sparse), the
    # topic documents as long as the context (2048 bytes), so that the last 128 positions have
    # 1920 earlier bytes of their own document to draw on; arms full, moba, local. One size: no fit.
    study = _cpu_study()
    base = dataclasses.replace(study.base, model=dataclasses.replace(study.base.model, context=2048))
    spec = dict(study.recall_spec, doc_len=2048)
    return StudyPreset("cpu-study-trailing", base, [s for s in study.sizes if s.name == "s5"],
                       arms=["full", "moba", "local"], recall_spec=spec,
                       note="cpu-study s5 at context 2048 (block 32, top-3, sparsity 0.92) x {full, moba, local} x 3 "
                            "seeds, 20 tokens/param, trailing loss on the last 128 positions")


STUDIES = {"cpu-study": _cpu_study, "cpu-study-trailing": _cpu_study_trailing}


def get_study(name: str) -> StudyPreset:
    if name not in STUDIES:
        raise ValueError(f"unknown study preset {name!r}; choose from {sorted(STUDIES)}")
    return STUDIES[name]()


def get_preset(name: str) -> SweepPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]()
