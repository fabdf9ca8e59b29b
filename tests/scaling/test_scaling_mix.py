from scaling_runs import tasks as T
from scaling_runs.config import DataConfig
from scaling_runs.data import load_data
from tests._helpers import make_text_corpus


def test_mixing_adds_the_requested_share_of_task_tokens_to_training_only(tmp_path):
    main = make_text_corpus(tmp_path / "main", n_files=6, words=2000)
    T.write_corpus(tmp_path / "tasks", 30, lengths=(200,), filler="The sky is blue. " * 20, n_files=3)
    base = load_data(DataConfig(data=str(main)))
    mixed = load_data(DataConfig(data=str(main), mix=str(tmp_path / "tasks"), mix_fraction=0.25))
    assert (mixed.val == base.val).all() and mixed.source == "text+mix"
    assert abs((mixed.train.size - base.train.size) / mixed.train.size - 0.25) < 1e-3
    assert b"pass key" in bytes(mixed.train[base.train.size:]) or b"lookups" in bytes(mixed.train[base.train.size:])
    assert mixed.data_hash != base.data_hash
