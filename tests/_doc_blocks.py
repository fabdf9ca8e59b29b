"""What the documentation tests read: the README and docs/ pages, their marked python blocks,
the setups that stand in for what a reader brings, and the shell commands they show.

Used by ``tests/test_readme.py`` (the front page) and ``tests/test_docs.py`` (the docs/ pages).

Marker: an HTML comment on the line(s) before a ```python block (invisible on GitHub)::

    <!-- cpu-test -->
    <!-- cpu-test setup=NAME: what the setup provides, for the reader -->

Blocks without a setup run in order in one namespace per page, as a reader pasting them top to
bottom would (a later block may use ``q``, ``k``, ``v`` from an earlier one). A block with
``setup=NAME`` runs in a fresh namespace filled by ``SETUPS[NAME]``: the names a real user
brings (a model path, a tokenized prompt) replaced by tiny random stand-ins, so the block runs
offline, on CPU, in seconds. The pages' own sizes are kept small for the same reason.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MARKER = re.compile(r"^<!-- cpu-test(?: setup=(?P<setup>[\w-]+)(?::[^>]*)?)? -->$")


def doc_pages() -> list[Path]:
    """The README and every docs/ page, README first."""
    return [README, *sorted(DOCS.glob("*.md"))]


def marked_blocks(text: str, name: str = "README.md") -> list[tuple[int, str | None, str]]:
    """(line number, setup name or None, code) of every marked ```python block of one page."""
    lines = text.splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if not line.startswith("<!-- cpu-test"):
            continue
        m = MARKER.match(line.strip())
        if m is None:
            raise AssertionError(f"{name}:{i + 1}: malformed marker {line!r}")
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        if j >= len(lines) or lines[j].strip() != "```python":
            raise AssertionError(f"{name}:{i + 1}: a cpu-test marker must precede a ```python block")
        end = lines.index("```", j + 1)
        blocks.append((j + 1, m.group("setup"), "\n".join(lines[j + 1 : end])))
    return blocks


def unmarked_python_blocks(text: str) -> list[int]:
    """Line numbers of ```python blocks with no cpu-test marker before them (they would never run)."""
    lines = text.splitlines()
    found = []
    for i, line in enumerate(lines):
        if line.strip() != "```python":
            continue
        j = i - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        if j < 0 or not lines[j].startswith("<!-- cpu-test"):
            found.append(i + 1)
    return found


def run_plain_blocks(blocks, name: str) -> dict:
    """Run a page's blocks without a setup, in order, in one namespace; return the namespace."""
    namespace: dict = {}
    torch.manual_seed(0)
    with torch.inference_mode(False):
        for line, setup, code in blocks:
            if setup is None:
                exec(compile(code, f"{name}:{line}", "exec"), namespace)  # noqa: S102
    return namespace


# --------------------------------------------------------------------------- setups
def _tiny_llama_config(layers: int = 4):
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=None,
    )


def _tiny_llama(tmp_path: Path) -> dict:
    """path: a tiny random Llama saved with save_pretrained; inputs: a tokenized prompt."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_tiny_llama_config())
    model.save_pretrained(tmp_path / "tiny-llama")
    ids = torch.randint(2, 96, (1, 20))
    return {"path": str(tmp_path / "tiny-llama"), "inputs": {"input_ids": ids, "attention_mask": torch.ones_like(ids)}}


def _tiny_gpts(tmp_path: Path) -> dict:
    """target, draft: tiny random scaling_runs GPTs (MoBA) as ``GPTAdapter``s, what
    ``scaling_runs.checkpoint.load_gpt(run_dir)`` returns; input_ids (1, L); corpus: token lists."""
    from moba.generate import GPTAdapter
    from scaling_runs.config import ModelConfig
    from scaling_runs.model import GPT

    torch.manual_seed(0)
    small = dict(n_head=4, n_kv_head=2, n_embd=32, vocab_size=96, block_size=8, top_k=2, context=128)
    target = GPTAdapter(GPT(ModelConfig(n_layer=2, **small))).eval()
    draft = GPTAdapter(GPT(ModelConfig(n_layer=1, **small))).eval()
    corpus = [torch.randint(0, 96, (200,)).tolist() for _ in range(3)]
    return {"target": target, "draft": draft, "input_ids": torch.tensor([corpus[0][:24]]), "corpus": corpus}


SETUPS = {"tiny_llama": _tiny_llama, "tiny_gpts": _tiny_gpts}


# --------------------------------------------------------------------------- shell commands
def shell_commands(text: str) -> list[str]:
    """Every ``python ...`` / ``torchrun ...`` command of a page's ```bash blocks, with
    continuation lines joined and trailing comments removed."""
    commands, in_bash, pending = [], False, ""
    for line in text.splitlines():
        if line.strip().startswith("```"):
            in_bash = line.strip() == "```bash"
            continue
        if not in_bash:
            continue
        line = pending + line.split("  #")[0].strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if line.startswith(("python ", "torchrun ")):
            commands.append(" ".join(line.split()))
    return commands


def entry_point(command: str) -> list[str]:
    """``python -m pkg.mod ...`` -> ["-m", "pkg.mod"]; ``python path.py ...`` -> ["path.py"]."""
    words = command.split()
    if words[0] == "torchrun":
        words = ["python"] + [w for w in words[1:] if not w.startswith("--nproc")]
    return words[1:3] if words[1] == "-m" else words[1:2]
