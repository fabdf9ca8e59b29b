"""Decoding speed of plain, speculative and staged speculative generation (``moba.generate``).

    python -m bench.generate_speed                              # GPU (or CPU): default sizes
    python -m bench.generate_speed --draft_noise 0.02 --gamma 4 --new_tokens 256 --prompt_len 2048
    python -m bench.generate_speed --cpu --out /tmp/gen         # CPU smoke run (< 20 s)
    python -m bench.roofline /tmp/gen/points.json --out /tmp/gen/roofline.png

Models, either of:

* ``--target_run DIR --draft_run DIR``: two scaling_runs checkpoints (e.g. the largest and
  the smallest MoBA size of one sweep: ``runs/cpu-tiny/s3-moba`` and ``runs/cpu-tiny/s1-moba``
  after ``make demo``), decoded with their sparse KV cache (``moba.generate.adapters``). The
  prompt is a window of the held-out split of the run's corpus, and the staged mode's n-gram
  table is built from the run's training split (``--ngram_corpus train``, the default here):
  real text, so acceptance rates mean something.
* otherwise a target and a draft ``transformers`` Llama built from configs with random weights
(no download), both running MoBA attention (``register_moba(--block_size, --top_k)``). By
default the draft is a smaller random model: its greedy tokens almost never agree with the
target's, so acceptance is ~0 and speculative decoding is pure overhead. ``--draft_noise X``
makes the draft a copy of the target with Gaussian noise (X x each tensor's std) added to
its weights instead: acceptance is then high, but the draft is as big as the target, so it
measures the mechanics (acceptance, tokens per target forward, roofline position), not a
realistic speed-up. Random weights say nothing about acceptance on real text.

Modes (greedy decoding; speculative output is checked token-for-token against plain):
  plain        ``generate_plain(target)``
  speculative  ``generate_speculative(target, draft, gamma=--gamma)``
  tree         (checkpoints, greedy) ``generate_tree_speculative(target, draft, depth=--gamma,
               branching=--tree_branching)``: the draft's top candidates at every depth of its
               chain, verified as one tree (``moba.decode.tree``)
  staged       ``generate_speculative(target, draft, draft_drafter=NGramDraft(corpus))``:
               an n-gram table speculates for the draft model (``--gamma_inner`` guesses per
               draft forward); corpus = the prompt (prompt lookup), the draft model's own
               greedy continuation of it (``--ngram_corpus draft``) or, with checkpoints,
               the training split (``--ngram_corpus train``).

Per mode: decoding tokens/s (the prompt's prefill is timed apart; median over ``--repeats``
timed runs after one warm-up), acceptance rate,
mean accepted length (drafted tokens accepted per target verify forward), tokens per target
forward, forwards. Output under ``--out``: ``generate_speed.json`` (metadata: device, torch /
transformers versions, date, git commit, config; and the three modes' stats) and
``points.json`` (``{"points": [{"name","flops","bytes","seconds"}]}`` from
``moba.generate.roofline_point``: a weight-streaming model, for ``bench/roofline.py``).
"""

from __future__ import annotations

if not __package__:  # run as a file (python bench/generate_speed.py, from anywhere): import it as bench.generate_speed
    import sys
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository root, not bench/
    __package__ = "bench"

import argparse
import copy
import dataclasses
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from moba._core import cli
from moba.generate import (
    GenerationStats,
    NGramDraft,
    generate_plain,
    generate_speculative,
    generate_tree_speculative,
)

from ._common import RESULTS, device_name, git_state, make_parser, utc_now

CPU_NOTE = ("CPU timings say nothing about GPU decoding speed: on a GPU batch-1 decoding is "
            "memory-bound and speculative decoding trades spare FLOPs for fewer weight reads; "
            "on CPU the extra FLOPs of the verify forward are not free.")

MODES = ("plain", "speculative", "staged", "tree")


# ----------------------------------------------------------------------------- roofline points
def _weights(model) -> tuple[int, int]:
    """(parameters, bytes) a forward multiplies with: all but the input embedding table
    (only looked up), unless it is tied to the output head."""
    skip = set()
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is not None and (out is None or out.weight is not emb.weight):
        skip = {id(p) for p in emb.parameters()}
    params = [p for p in model.parameters() if id(p) not in skip]
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def roofline_point(name: str, stats: GenerationStats, target, draft=None) -> dict:
    """One point for ``bench.roofline``'s points file: the decoding of one generation call
    (the prompt's prefill is counted apart in ``stats`` and left out).

    A weight-streaming model of batch-1 decoding: every forward reads each weight once from
    memory (bytes = weight bytes x forwards) and spends 2 FLOPs per weight per token fed
    (FLOPs = 2 x weights x tokens). KV-cache and activation traffic are left out (small next
    to the weights for short contexts, and MoBA reads only ``top_k`` blocks). Speculative
    decoding feeds ``gamma + 1`` tokens per target forward: more FLOPs per byte, which is
    what moves it right on the roofline.

    Returns ``{"name", "flops", "bytes", "seconds"}``; write ``{"points": [...]}`` as JSON.
    """
    n_t, b_t = _weights(target)
    flops, nbytes = 2.0 * n_t * stats.target_tokens, float(b_t * stats.target_forwards)
    if draft is not None and hasattr(draft, "parameters"):
        n_d, b_d = _weights(draft)
        flops += 2.0 * n_d * stats.draft_tokens
        nbytes += b_d * stats.draft_forwards
    return {"name": name, "flops": flops, "bytes": nbytes, "seconds": stats.seconds}


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__, "bench.generate_speed")
    p.add_argument("--cpu", action="store_true", help="small CPU smoke run (< 20 s); overrides sizes")
    p.add_argument("--device", type=cli.device, default=None, help="cuda / cpu / cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--gamma", type=cli.positive_int, default=4, help="tokens drafted per target verify forward")
    p.add_argument("--gamma_inner", type=cli.positive_int, default=2, help="staged: n-gram guesses per draft forward")
    p.add_argument("--tree_branching", type=cli.nonnegative_int, default=2,
                   help="tree mode (checkpoints, greedy): candidates per depth of the draft tree (< 2: off)")
    p.add_argument("--ngram_n", type=cli.positive_int, default=3, help="staged: n of the n-gram table")
    p.add_argument("--ngram_corpus", default=None, choices=["prompt", "draft", "train"],
                   help="staged: n-gram table from the prompt, the draft's greedy continuation, or (with "
                        "--target_run) the training split (default: train with checkpoints, else prompt)")
    p.add_argument("--target_run", type=cli.existing_path, default=None, help="a scaling_runs run dir / ckpt.pt as the target")
    p.add_argument("--draft_run", type=cli.existing_path, default=None, help="a scaling_runs run dir / ckpt.pt as the draft (with --target_run)")
    p.add_argument("--trust_checkpoint", action="store_true",
                   help="load --target_run / --draft_run files that need arbitrary unpickling (older versions); "
                        "runs any code they hold: only for files you wrote yourself")
    p.add_argument("--prompt_offset", type=cli.nonnegative_int, default=0, help="with checkpoints: where the prompts start in the held-out split")
    p.add_argument("--prompts", type=cli.positive_int, default=1,
                   help="prompts per timed run (checkpoints: windows spread evenly over the held-out split; "
                        "else random); stats are summed over them")
    p.add_argument("--temperature", type=cli.float_in(0), default=0.0,
                   help="0: greedy (speculative output checked against plain); > 0: sampling at this temperature")
    p.add_argument("--new_tokens", type=cli.positive_int, default=128, help="tokens generated per prompt")
    p.add_argument("--prompt_len", type=cli.positive_int, default=1024, help="prompt tokens")
    p.add_argument("--repeats", type=cli.positive_int, default=3, help="timed runs per mode (after one warm-up)")
    p.add_argument("--block_size", type=cli.size, default=64, help="MoBA block size")
    p.add_argument("--top_k", type=cli.positive_int, default=3, help="MoBA top-k blocks")
    p.add_argument("--vocab", type=cli.int_at_least(2), default=32000, help="vocabulary of the random models")
    p.add_argument("--target_layers", type=cli.positive_int, default=12, help="layers of the random target model")
    p.add_argument("--target_hidden", type=cli.positive_int, default=1024, help="hidden size of the random target model")
    p.add_argument("--draft_layers", type=cli.positive_int, default=2, help="layers of the random draft model")
    p.add_argument("--draft_hidden", type=cli.positive_int, default=256, help="hidden size of the random draft model")
    p.add_argument("--head_dim", type=cli.positive_int, default=64, help="head dim of the random models")
    p.add_argument("--init_std", type=cli.positive_float, default=0.02, help="initializer_range of the random models")
    p.add_argument("--draft_noise", type=cli.float_in(0), default=0.0,
                   help="> 0: draft = target + Gaussian noise (this x each tensor's std) instead of a small model")
    p.add_argument("--seed", type=int, default=0, help="random seed (models, prompts, sampling)")
    p.add_argument("--threads", type=cli.positive_int, default=None,
                   help="CPU threads for torch (default: torch's choice); fix it to compare runs on a shared machine")
    p.add_argument("--no_progress", action="store_true", help="no progress bar (e.g. in logs)")
    p.add_argument("--out", default=None, help="output folder (default: bench/results/generate-<device>-<date>)")
    return p


def apply_cpu(args) -> None:
    args.device = "cpu"
    args.dtype = args.dtype or "float32"
    args.vocab = min(args.vocab, 512)
    args.target_layers, args.target_hidden = min(args.target_layers, 2), min(args.target_hidden, 128)
    args.draft_layers, args.draft_hidden = min(args.draft_layers, 1), min(args.draft_hidden, 64)
    args.head_dim = min(args.head_dim, 32)
    args.prompt_len = min(args.prompt_len, 48)
    args.new_tokens = min(args.new_tokens, 16)
    args.repeats = min(args.repeats, 1)
    args.block_size = min(args.block_size, 16)
    args.top_k = min(args.top_k, 2)


def llama(args, layers: int, hidden: int, attn: str, seed: int, device, dtype):
    import transformers

    heads = max(1, hidden // args.head_dim)
    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2) if heads % 2 == 0 else heads,
        max_position_embeddings=args.prompt_len + args.new_tokens + 64, initializer_range=args.init_std,
        pad_token_id=0, eos_token_id=None, bos_token_id=None)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
    return model.to(device=device, dtype=dtype).eval()


@torch.no_grad()
def noisy_copy(model, noise: float, seed: int):
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    for p in out.parameters():
        if p.numel() > 1:
            std = float(p.float().std())
            p.add_((torch.randn(p.shape, generator=g) * (noise * std)).to(p))
    return out


def checkpoints(args, device, dtype):
    """Target and draft from scaling_runs checkpoints, a held-out prompt, the training tokens."""
    from moba.generate import GPTAdapter
    from scaling_runs.checkpoint import CheckpointError, load_gpt, load_model
    from scaling_runs.config import DataConfig
    from scaling_runs.data import load_data

    if not args.draft_run:
        raise SystemExit("--target_run needs --draft_run (the draft checkpoint)")
    trust = args.trust_checkpoint  # off: checkpoints are read as data only (weights_only=True)
    try:
        target_gpt, cfg, run_dir = load_model(args.target_run, device, trust_checkpoint=trust)  # with its config
        draft = load_gpt(args.draft_run, device, trust_checkpoint=trust).to(dtype)
    except CheckpointError as exc:  # one line, non-zero exit (an untrusted file included)
        raise SystemExit(str(exc)) from None
    target = GPTAdapter(target_gpt).eval().to(dtype)
    if target.gpt.cfg.vocab_size != draft.gpt.cfg.vocab_size:
        raise SystemExit(f"target and draft vocabularies differ: {target.gpt.cfg.vocab_size} vs {draft.gpt.cfg.vocab_size}")
    context = target.gpt.cfg.context
    if args.prompt_len + args.new_tokens > context:
        print(f"note: prompt {args.prompt_len} + {args.new_tokens} new tokens > the training context {context}: "
              "positions past it were never trained")
    data = load_data(DataConfig(**cfg["data"]))
    start, last = args.prompt_offset, len(data.val) - args.prompt_len
    if start > last:
        raise SystemExit(f"--prompt_offset {start} + --prompt_len {args.prompt_len} > held-out tokens {len(data.val)}")
    offsets = [start + i * (last - start) // max(1, args.prompts - 1) for i in range(args.prompts)] if args.prompts > 1 else [start]
    prompts = [torch.as_tensor(data.val[o : o + args.prompt_len].astype("int64"))[None].to(device) for o in offsets]
    args.vocab = target.gpt.cfg.vocab_size
    args.block_size, args.top_k = target.gpt.cfg.block_size, target.gpt.cfg.top_k  # reported as run
    kind = f"checkpoint {args.draft_run}"
    print(f"target {run_dir}, draft {args.draft_run}; prompts: {len(prompts)} held-out windows of {args.prompt_len} "
          f"tokens from offset {start}")
    return target, draft, kind, prompts, data.train


def merge_stats(stats) -> GenerationStats:
    """The stats of several generation calls summed (rates then come out as pooled ratios)."""
    total = GenerationStats()
    for st in stats:
        for f in dataclasses.fields(GenerationStats):
            setattr(total, f.name, getattr(total, f.name) + getattr(st, f.name))
    return total


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def summarize(runs: list, n_prompt: int) -> dict:
    """Stats of the median-time run, plus the spread of tokens/s over the runs."""
    order = sorted(range(len(runs)), key=lambda i: runs[i][1].seconds)
    out, st = runs[order[len(order) // 2]]
    return {
        "tokens_per_second": st.tokens_per_second,
        "tokens_per_second_all": [r[1].tokens_per_second for r in runs],
        "seconds": st.seconds,
        "seconds_all": [r[1].seconds for r in runs],
        "prefill_seconds": st.prefill_seconds,
        "prefill_tokens": st.prefill_tokens,
        "new_tokens": st.new_tokens,
        "acceptance_rate": st.acceptance_rate,
        "inner_acceptance_rate": st.inner_acceptance_rate,
        "mean_accepted_length": st.mean_accepted_length,
        "tokens_per_target_forward": st.tokens_per_target_forward,
        "target_forwards": st.target_forwards,
        "draft_forwards": st.draft_forwards,
        "target_tokens": st.target_tokens,
        "draft_tokens": st.draft_tokens,
        "rounds": st.rounds,
        "proposed": st.proposed,
        "accepted": st.accepted,
        "inner_proposed": st.inner_proposed,
        "inner_accepted": st.inner_accepted,
    }, st, out


def run(args) -> dict:
    import transformers

    from moba.integrations.transformers import register_moba

    t_start = time.perf_counter()
    if args.cpu:
        apply_cpu(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    attn = register_moba(args.block_size, args.top_k, name="moba_genbench")

    if args.target_run:
        target, draft, draft_kind, prompts, train_tokens = checkpoints(args, device, dtype)
    else:
        if args.draft_run or args.ngram_corpus == "train":
            raise SystemExit("--draft_run and --ngram_corpus train need --target_run")
        target = llama(args, args.target_layers, args.target_hidden, attn, args.seed, device, dtype)
        if args.draft_noise > 0:
            draft = noisy_copy(target, args.draft_noise, args.seed + 1)
            draft_kind = f"target + noise {args.draft_noise}"
        else:
            draft = llama(args, args.draft_layers, args.draft_hidden, attn, args.seed + 1, device, dtype)
            draft_kind = "small random model"
        g = torch.Generator().manual_seed(args.seed + 2)
        prompts = [torch.randint(1, args.vocab, (1, args.prompt_len), generator=g).to(device) for _ in range(args.prompts)]
        train_tokens = None

    corpus_kind = args.ngram_corpus or ("train" if args.target_run else "prompt")
    t_ngram = time.perf_counter()
    if corpus_kind == "draft":
        corpus = [generate_plain(draft, p, args.new_tokens)[0].tolist() for p in prompts]
    elif corpus_kind == "train":
        corpus = [train_tokens]
    else:
        corpus = [p[0].tolist() for p in prompts]
    ngram = NGramDraft(corpus, n=args.ngram_n)
    t_ngram = time.perf_counter() - t_ngram

    sample = {"do_sample": args.temperature > 0, "temperature": args.temperature or 1.0}

    def one(mode, prompt, generator):
        if mode == "plain":
            return generate_plain(target, prompt, args.new_tokens, return_stats=True, generator=generator, **sample)
        if mode == "speculative":
            return generate_speculative(target, draft, prompt, args.new_tokens, gamma=args.gamma,
                                        generator=generator, **sample)
        if mode == "tree":
            return generate_tree_speculative(target, draft, prompt, args.new_tokens, depth=args.gamma,
                                             branching=args.tree_branching)
        return generate_speculative(target, draft, prompt, args.new_tokens, gamma=args.gamma,
                                    draft_drafter=ngram, gamma_inner=args.gamma_inner, generator=generator, **sample)

    def call(mode, bar):
        """Every prompt once: (the outputs, the summed stats)."""
        g = torch.Generator(device=device).manual_seed(args.seed + 3)
        outs, stats = [], []
        for p in prompts:
            out, st = one(mode, p, g)
            outs.append(out)
            stats.append(st)
            bar.update(1)
        return outs, merge_stats(stats)

    results, points, reference = {}, [], None
    modes = list(MODES[:3])
    if args.tree_branching >= 2 and getattr(target, "supports_tree", False) and not sample["do_sample"]:
        modes.append("tree")
    else:
        print("tree mode skipped: it needs --target_run checkpoints, greedy decoding and --tree_branching >= 2")
    repeats = max(1, args.repeats)
    bar = tqdm(total=len(modes) * (1 + repeats) * len(prompts), unit="generation", disable=args.no_progress,
               desc="generate_speed")
    for mode in modes:
        bar.set_postfix_str(f"{mode} (warm-up)")
        call(mode, bar)  # warm-up (kernels, allocator, caches)
        bar.set_postfix_str(mode)
        runs = [call(mode, bar) for _ in range(repeats)]
        summary, st, out = summarize(runs, args.prompt_len)
        bar.write(f"{mode}: {summary['tokens_per_second']:.1f} tok/s")
        if reference is None:
            reference = out
        summary["matches_plain"] = (all(torch.equal(a, b) for a, b in zip(out, reference, strict=True))
                                    if not sample["do_sample"] else None)  # sampled: same law, not same tokens
        results[mode] = summary
        points.append(roofline_point(f"decode {mode} (gamma={args.gamma})" if mode != "plain" else "decode plain",
                                     st, target, None if mode == "plain" else draft))
    bar.close()

    dev_name = device_name(device)
    meta = {
        "device": str(device),
        "device_name": dev_name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": utc_now(),
        **git_state(),
        "argv": sys.argv[1:],
        "config": {k: v for k, v in vars(args).items() if k != "out"} | {
            "dtype": str(dtype).replace("torch.", ""), "draft_kind": draft_kind, "ngram_corpus": corpus_kind,
            "ngram_build_seconds": t_ngram,
            "target_params": _n_params(target), "draft_params": _n_params(draft)},
        "note": CPU_NOTE if device.type == "cpu" else "",
    }
    out_dir = Path(args.out) if args.out else RESULTS / (
        f"generate-{'cpu' if device.type == 'cpu' else dev_name.replace(' ', '_')}-{dt.date.today():%Y%m%d}")
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"metadata": meta, "modes": results}
    with open(out_dir / "generate_speed.json", "w") as f:
        json.dump(report, f, indent=1)
    with open(out_dir / "points.json", "w") as f:
        json.dump({"device_name": dev_name, "points": points}, f, indent=1)

    print(f"{dev_name}  torch {torch.__version__}  transformers {transformers.__version__}  {meta['config']['dtype']}")
    print(f"target {meta['config']['target_params'] / 1e6:.2f}M params, draft {meta['config']['draft_params'] / 1e6:.2f}M "
          f"({draft_kind}); prompt {args.prompt_len}, {args.new_tokens} new tokens, gamma {args.gamma}, "
          f"MoBA block {args.block_size} top-{args.top_k}")
    print(f"{'mode':12s} {'tok/s':>9s} {'accept':>7s} {'acc/round':>9s} {'tok/fwd':>7s} {'T fwd':>6s} {'D fwd':>6s} "
          f"{'n-gram acc':>10s}  =plain")
    for mode, r in results.items():
        print(f"{mode:12s} {r['tokens_per_second']:9.1f} {r['acceptance_rate']:7.3f} {r['mean_accepted_length']:9.2f} "
              f"{r['tokens_per_target_forward']:7.2f} {r['target_forwards']:6d} {r['draft_forwards']:6d} "
              f"{format(r['inner_acceptance_rate'], '.3f') if mode == 'staged' else '-':>10s}  {r['matches_plain']}")
    if device.type == "cpu":
        print(f"NOTE: {CPU_NOTE}")
    print(f"wrote {out_dir / 'generate_speed.json'} and {out_dir / 'points.json'} ({time.perf_counter() - t_start:.1f} s)")
    print(f"roofline: python -m bench.roofline {out_dir / 'points.json'} --no_model --out {out_dir / 'roofline.png'}")
    report["out_dir"] = str(out_dir)
    return report


def main(argv: list[str] | None = None) -> dict:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    from moba._core.cli import run

    raise SystemExit(run(main, "bench.generate_speed"))
