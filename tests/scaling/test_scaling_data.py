"""Data pipeline of scaling_runs: shards, text corpora, the embedded corpus, batch sampling."""

from __future__ import annotations

import numpy as np
import pytest

from scaling_runs.config import DataConfig
from scaling_runs.data import (
    DOC_SEPARATOR,
    HEADER_BYTES,
    MIN_STDLIB_TOKENS,
    batch_offsets,
    build_stdlib_corpus,
    get_batch,
    is_val_path,
    load_data,
    read_shard,
    stdlib_files,
    write_shard,
)
from tests._helpers import make_text_corpus


def test_shard_roundtrip_and_split(tmp_path):
    write_shard(tmp_path / "d_train_000.bin", np.arange(1000) % 300)
    write_shard(tmp_path / "d_val_000.bin", np.arange(200) % 7)
    tokens = read_shard(tmp_path / "d_train_000.bin")
    np.testing.assert_array_equal(tokens, np.arange(1000) % 300)
    data = load_data(DataConfig(data=str(tmp_path)))
    assert data.source == "shards" and data.train.size == 1000 and data.val.size == 200
    assert data.vocab_size == 300


def _corrupt(path, how):
    raw = bytearray(path.read_bytes())
    header = np.frombuffer(bytes(raw[:HEADER_BYTES]), dtype=np.int32).copy()
    if how == "magic":
        header[0] = 12345
    elif how == "version":
        header[1] = 7
    if how in ("magic", "version"):
        raw[:HEADER_BYTES] = header.tobytes()
    elif how == "truncated":
        raw = raw[:-10]
    elif how == "short":
        raw = raw[:100]
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("how, message", [("magic", "bad magic"), ("version", "version"),
                                          ("truncated", "truncated"), ("short", "header")])
def test_corrupt_shards_are_rejected_with_the_file_name(tmp_path, how, message):
    path = tmp_path / f"broken_{how}.bin"
    write_shard(path, np.arange(100))
    _corrupt(path, how)
    with pytest.raises(ValueError, match=message) as err:
        load_data(DataConfig(data=str(path)))
    assert path.name in str(err.value)


def test_text_corpus_is_deterministic_and_split_by_file(tmp_path):
    root = make_text_corpus(tmp_path / "txt")
    a = load_data(DataConfig(data=str(root), val_fraction=0.25))
    b = load_data(DataConfig(data=str(root), val_fraction=0.25))
    assert a.data_hash == b.data_hash and a.vocab_size == 256
    np.testing.assert_array_equal(a.train, b.train)
    val_names = sorted(p.name for p in root.iterdir() if is_val_path(p.name, 0.25))
    expected_val = b"".join((root / n).read_bytes() + bytes([DOC_SEPARATOR]) for n in val_names)
    assert val_names and a.val.tobytes() == expected_val
    (root / "f00.txt").write_text("changed\n")
    assert load_data(DataConfig(data=str(root), val_fraction=0.25)).data_hash != a.data_hash


def test_batches_are_a_function_of_seed_and_step():
    tokens = np.arange(10_000, dtype=np.uint16) % 256
    x1, y1 = get_batch(tokens, 32, 8, seed=3, step=5)
    x2, y2 = get_batch(tokens, 32, 8, seed=3, step=5)
    assert x1.equal(x2) and y1.equal(y2)
    assert not get_batch(tokens, 32, 8, seed=3, step=6)[0].equal(x1)
    assert not get_batch(tokens, 32, 8, seed=4, step=5)[0].equal(x1)
    assert y1[:, :-1].equal(x1[:, 1:])  # targets are the next tokens
    # rank / micro-batch slices tile the global batch
    parts = [get_batch(tokens, 32, 8, 3, 5, start, start + 2)[0] for start in range(0, 8, 2)]
    import torch

    assert torch.cat(parts).equal(x1)
    assert batch_offsets(10_000, 32, 8, 3, 5).max() <= 10_000 - 33


def test_embedded_corpus_builder_on_a_subset(tmp_path):
    files = stdlib_files()
    # the whole default corpus is large enough (sizes only, without reading every file)
    assert sum(p.stat().st_size for _, p in files) >= MIN_STDLIB_TOKENS
    assert [r for r, _ in files] == sorted(r for r, _ in files)
    assert not any("site-packages" in r for r, _ in files)
    a = build_stdlib_corpus(cache_dir=tmp_path, max_files=60, min_tokens=0, val_fraction=0.2)
    assert (tmp_path / f"stdlib-{a.info['manifest_key']}" / "meta.json").exists()
    b = build_stdlib_corpus(cache_dir=tmp_path, max_files=60, min_tokens=0, val_fraction=0.2)  # from the cache
    assert a.data_hash == b.data_hash
    np.testing.assert_array_equal(a.train, b.train)
    subset = files[:60]
    train = b"".join(p.read_bytes() + b"\0" for r, p in subset if not is_val_path(r, 0.2))
    val = b"".join(p.read_bytes() + b"\0" for r, p in subset if is_val_path(r, 0.2))
    assert a.train.tobytes() == train and a.val.tobytes() == val
    # a tampered cache is detected and rebuilt
    (tmp_path / f"stdlib-{a.info['manifest_key']}" / "train.u8").write_bytes(b"xx")
    c = build_stdlib_corpus(cache_dir=tmp_path, max_files=60, min_tokens=0, val_fraction=0.2)
    assert c.data_hash == a.data_hash
    with pytest.raises(ValueError, match="tokens"):
        build_stdlib_corpus(cache_dir=tmp_path, max_files=3, min_tokens=10**9)


def test_optional_local_tokenizer(tmp_path):
    pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    root = make_text_corpus(tmp_path / "txt")
    words = sorted({w for p in root.iterdir() for w in p.read_text().split()})
    vocab = {"[UNK]": 0, "[EOS]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]").save_pretrained(
        tmp_path / "tok")
    data = load_data(DataConfig(data=str(root), tokenizer=str(tmp_path / "tok"), val_fraction=0.25))
    assert data.vocab_size == len(vocab) and data.train.dtype == np.uint16
    assert data.train.max() < len(vocab) and (data.train == 1).sum() >= 1  # EOS after every file
    assert data.describe()["tokenizer"] == str(tmp_path / "tok")
