"""Every README python block marked CPU-runnable runs (issue 17: "a README whose every line works").

Marker: an HTML comment on the line(s) before a ```python block (invisible on GitHub)::

    <!-- cpu-test -->
    <!-- cpu-test setup=NAME: what the setup provides, for the reader -->

Blocks without a setup run in order in one namespace, as a reader pasting them top to bottom
would (a later block may use ``q``, ``k``, ``v`` from an earlier one). A block with
``setup=NAME`` runs in a fresh namespace filled by ``SETUPS[NAME]`` below: the names a real
user brings (a model path, a tokenized prompt) replaced by tiny random stand-ins, so the
block runs offline, on CPU, in seconds. The README's own sizes are kept small for the same
reason.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests._subprocess import run_child

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = re.compile(r"^<!-- cpu-test(?: setup=(?P<setup>[\w-]+)(?::[^>]*)?)? -->$")


def marked_blocks(text: str) -> list[tuple[int, str | None, str]]:
    """(line number, setup name or None, code) of every marked ```python block."""
    lines = text.splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if not line.startswith("<!-- cpu-test"):
            continue
        m = MARKER.match(line.strip())
        if m is None:
            raise AssertionError(f"README.md:{i + 1}: malformed marker {line!r}")
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        if j >= len(lines) or lines[j].strip() != "```python":
            raise AssertionError(f"README.md:{i + 1}: a cpu-test marker must precede a ```python block")
        end = lines.index("```", j + 1)
        blocks.append((j + 1, m.group("setup"), "\n".join(lines[j + 1 : end])))
    return blocks


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


# --------------------------------------------------------------------------- tests
BLOCKS = marked_blocks(README.read_text())


def test_readme_has_marked_blocks():
    setups = {s for _, s, _ in BLOCKS}
    assert len(BLOCKS) >= 6 and None in setups
    assert setups - {None} <= set(SETUPS), f"unknown setups {setups - {None} - set(SETUPS)}"


def test_readme_plain_blocks_run_in_order():
    namespace: dict = {}
    torch.manual_seed(0)
    with torch.inference_mode(False):
        for line, setup, code in BLOCKS:
            if setup is None:
                exec(compile(code, f"README.md:{line}", "exec"), namespace)  # noqa: S102
    assert namespace["out"] is not None


@pytest.mark.parametrize("line,setup,code", [b for b in BLOCKS if b[1] is not None], ids=lambda x: str(x)[:20])
def test_readme_block_with_setup_runs(line, setup, code, tmp_path):
    namespace = {"torch": torch, **SETUPS[setup](tmp_path)}
    exec(compile(code, f"README.md:{line}", "exec"), namespace)  # noqa: S102


# --------------------------------------------------------------------------- shell commands
def readme_commands(text: str) -> list[str]:
    """Every ``python ...`` / ``torchrun ...`` command of the README's ```bash blocks, with
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


def _entry_point(command: str) -> list[str]:
    """``python -m pkg.mod ...`` -> ["-m", "pkg.mod"]; ``python path.py ...`` -> ["path.py"]."""
    words = command.split()
    if words[0] == "torchrun":
        words = ["python"] + [w for w in words[1:] if not w.startswith("--nproc")]
    return words[1:3] if words[1] == "-m" else words[1:2]


ENTRY_POINTS = sorted({tuple(_entry_point(c)) for c in readme_commands(README.read_text())})


def test_readme_commands_are_found():
    assert len(ENTRY_POINTS) >= 8, ENTRY_POINTS  # the parser still reads the README's blocks
    assert ("-m", "scaling_runs.train") in ENTRY_POINTS and ("-m", "bench.attn_speed") in ENTRY_POINTS
    # bench is a package: its tools run as modules, never as script paths
    assert not [e for e in ENTRY_POINTS if e[0].startswith("bench/")], ENTRY_POINTS


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=" ".join)
def test_every_readme_command_exists_and_has_help(entry):
    """Each script or module the README tells users to run starts and prints its usage."""
    import sys

    result = run_child([sys.executable, *entry, "--help"], cwd=README.parent)
    assert result.returncode == 0, f"{' '.join(entry)} --help failed:\n{result.stderr[-2000:]}"
    assert len(result.stdout) > 100, result.stdout  # its help text, not an empty run


def test_readme_sweep_dry_run_command_runs():
    """The README's dry-run command, as written (it only plans: runs, FLOPs, time)."""
    import sys

    command = next(c for c in readme_commands(README.read_text()) if "--dry_run true" in c)
    result = run_child([sys.executable, *command.split()[1:]], cwd=README.parent)
    assert result.returncode == 0, result.stderr[-2000:]
