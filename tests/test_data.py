"""The training data: standard-library split, passkey tasks, packed rows, determinism."""

import numpy as np
import pytest
import torch

from nsa_core import data, tokenizer


@pytest.fixture(scope="module")
def corpus() -> np.ndarray:
    return np.frombuffer(b"def f(x):\n    return x + 1\n\n" * 400, dtype=np.uint8)


def test_split_is_by_name_disjoint_and_stable(tmp_path):
    for i in range(60):
        sub = tmp_path / ("pkg" if i % 2 else "") / f"mod_{i}.py"
        sub.parent.mkdir(exist_ok=True)
        sub.write_text(f"x = {i}\n")
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "site-packages" / "third_party.py").write_text("y = 1\n")
    files = data.stdlib_sources(tmp_path)
    assert [f.relative_to(tmp_path).as_posix() for f in files] == sorted(
        f.relative_to(tmp_path).as_posix() for f in files)
    assert all("site-packages" not in f.parts for f in files) and len(files) == 60
    train, heldout = data.split_sources(files, tmp_path, 0.3)
    assert set(train).isdisjoint(heldout) and len(train) + len(heldout) == 60
    assert 5 <= len(heldout) <= 30  # about 30% of 60
    # Membership depends on the file's own path only, not on which other files exist.
    _, heldout_half = data.split_sources(files[:30], tmp_path, 0.3)
    assert set(heldout_half) == set(heldout) & set(files[:30])


def test_is_heldout_rejects_bad_fraction():
    with pytest.raises(ValueError, match="heldout_fraction"):
        data.is_heldout("a.py", 1.0)


def test_read_corpus_joins_files_with_blank_lines(tmp_path):
    (tmp_path / "a.py").write_bytes(b"A")
    (tmp_path / "b.py").write_bytes(b"B")
    corpus = data.read_corpus([tmp_path / "a.py", tmp_path / "b.py"])
    assert bytes(corpus) == b"A\n\nB\n\n"


def test_corpus_summary_counts_what_the_splits_read_and_tells_corpora_apart(tmp_path):
    for i in range(40):
        (tmp_path / f"mod_{i:02d}.py").write_text(f"x = {i}\n" * (i + 1))
    summary = data.corpus_summary(tmp_path, heldout_fraction=0.3)
    train, heldout = data.split_sources(data.stdlib_sources(tmp_path), tmp_path, 0.3)
    assert (summary["train_files"], summary["heldout_files"]) == (len(train), len(heldout))
    assert summary["train_tokens"] == len(data.stdlib_corpus("train", heldout_fraction=0.3, root=tmp_path))
    assert summary["heldout_tokens"] == len(data.stdlib_corpus("heldout", heldout_fraction=0.3, root=tmp_path))
    assert summary["root"] == str(tmp_path) and not summary["test_suite"]
    assert "without the library's own tests" in data.describe_corpus(summary)
    assert data.corpus_summary(tmp_path, heldout_fraction=0.3) == summary  # deterministic
    # One changed byte, or the same bytes under another name, is another corpus.
    (tmp_path / "mod_05.py").write_text("x = 6\n" * 6)
    changed = data.corpus_summary(tmp_path, heldout_fraction=0.3)
    assert changed["sha256"] != summary["sha256"] and changed["train_tokens"] == summary["train_tokens"]
    (tmp_path / "mod_05.py").rename(tmp_path / "mod_05b.py")
    assert data.corpus_summary(tmp_path, heldout_fraction=0.3)["sha256"] != changed["sha256"]
    # A library with its tests (hundreds of test/test_*.py in a full installation) says so.
    (tmp_path / "test").mkdir()
    for i in range(50):
        (tmp_path / "test" / f"test_m{i}.py").write_text("pass\n")
    assert data.corpus_summary(tmp_path, heldout_fraction=0.3)["test_suite"]


def test_single_key_task_marks_exactly_the_answer():
    hay = tokenizer.encode("0123456789" * 20)
    task = data.single_key_task(hay, "31415", 0.5)
    ids, mask = task.ids, task.answer_mask
    answer = [t for t, m in zip(ids, mask, strict=True) if m]
    assert answer == tokenizer.encode("31415") + [tokenizer.EOS]
    assert ids[-7] == tokenizer.SEP and all(mask[-6:]) and not any(mask[:-6])
    text = tokenizer.decode(ids)
    needle = data.NEEDLE.format(key="31415")
    assert text.count(needle) == 1 and text.endswith(data.QUESTION + "31415")
    # The needle sits at half the haystack: 100 haystack tokens before it (plus its newline).
    assert text.index(needle) == 101


def test_multi_key_task_asks_every_name_in_order():
    keys = {"red": "11111", "blue": "22222"}
    task = data.multi_key_task(tokenizer.encode("x" * 300), keys, [0.2, 0.7], ["blue", "red"])
    answers = [t for t, m in zip(task.ids, task.answer_mask, strict=True) if m]
    assert answers == tokenizer.encode("22222") + [tokenizer.EOS] + tokenizer.encode("11111") + [tokenizer.EOS]
    text = tokenizer.decode(task.ids)
    assert text.index(data.NAMED_NEEDLE.format(name="red", key="11111")) < text.index(
        data.NAMED_NEEDLE.format(name="blue", key="22222")) < text.index(data.NAMED_QUESTION.format(name="blue"))


@pytest.mark.parametrize("length", [300, 700, 2000])
def test_sample_task_has_exact_length(corpus, length):
    rng = np.random.default_rng(0)
    for _ in range(5):
        task = data.sample_task(corpus, length, rng, multi_key_prob=0.5)
        assert len(task.ids) == len(task.answer_mask) == length
        assert task.ids[0] == tokenizer.BOS and task.ids[-1] == tokenizer.EOS


@pytest.mark.parametrize("length", [300, 2048])
def test_start_needles_come_right_after_bos(corpus, length):
    rng = np.random.default_rng(1)
    opening = tokenizer.encode("\n" + data.NEEDLE.split("{key}")[0])  # newline, the needle up to its key
    for _ in range(5):
        task = data.sample_task(corpus, length, rng, multi_key_prob=0.0, start_needle_prob=1.0)
        assert len(task.ids) == length and task.ids[0] == tokenizer.BOS
        assert task.ids[1:1 + len(opening)] == opening
    # Off by default, and then no random draw is spent on it: existing recipes keep their rows.
    a = data.sample_task(corpus, length, np.random.default_rng(2), multi_key_prob=0.3)
    b = data.sample_task(corpus, length, np.random.default_rng(2), multi_key_prob=0.3, start_needle_prob=0.0)
    assert a == b and a.ids[1:1 + len(opening)] != opening


def test_curriculum_stages_double_up_to_the_row_length():
    mix = data.TaskMix(seq_len=4096, min_task_len=512, curriculum_frac=0.5)
    assert mix.stage_lengths == [512, 1024, 2048, 4097]
    scheduled = [mix.scheduled_stage(p) for p in np.linspace(0, 1, 21)]
    assert scheduled[0] == 0 and scheduled[10:] == [3] * 11  # the last stage by curriculum_frac
    assert all(a <= b for a, b in zip(scheduled, scheduled[1:], strict=False))
    # A stage earned early is kept; the schedule still moves a slow run on; never past the last stage.
    assert mix.stage_at(0.0, earned=2) == 2 and mix.stage_at(0.3, earned=0) == mix.scheduled_stage(0.3) > 0
    assert mix.stage_at(0.0, earned=9) == 3 and mix.max_task_len(3) == 4097
    assert data.TaskMix(seq_len=1024, min_task_len=1024).stage_lengths == [1024, 1025]
    with pytest.raises(ValueError, match="min_task_len"):
        data.TaskMix(seq_len=1000, min_task_len=2000)


def test_rows_never_hold_a_task_longer_than_the_stage_allows(corpus):
    mix = data.TaskMix(seq_len=4096, min_task_len=256)
    rng = np.random.default_rng(0)
    for _ in range(3):
        row = data.training_row(corpus, mix, 0, rng)
        bos = [i for i, t in enumerate(row.ids) if t == tokenizer.BOS] + [len(row.ids)]
        # Stage 0 tasks are exactly min_task_len long (the last one may stretch to fill the row).
        assert all(b - a == 256 for a, b in zip(bos[:-2], bos[1:-1], strict=True))


def test_training_batch_is_deterministic_and_answers_follow_sep(corpus):
    mix = data.TaskMix(seq_len=1024, min_task_len=256)
    x, y, answer = data.training_batch(corpus, mix, batch_size=2, stage=0, seed=3, rank=0, step=5)
    assert x.shape == y.shape == answer.shape == (2, 1024)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    x2, _, _ = data.training_batch(corpus, mix, batch_size=2, stage=0, seed=3, rank=0, step=5)
    other_rank, _, _ = data.training_batch(corpus, mix, batch_size=2, stage=0, seed=3, rank=1, step=5)
    assert torch.equal(x, x2) and not torch.equal(x, other_rank)
    # A step's rows depend on the global batch only, not on how it is split across processes.
    whole, _, _ = data.training_batch(corpus, mix, batch_size=4, stage=0, seed=3, rank=0, step=5)
    assert torch.equal(whole, torch.cat([x, other_rank]))
    # Every answer run starts right after <sep> and ends with <eos>; short tasks pack several per row.
    for row in range(2):
        idx = answer[row].nonzero().flatten().tolist()
        starts = [i for i in idx if i - 1 not in idx]
        assert len(starts) >= 2
        assert all(x[row, s] == tokenizer.SEP for s in starts)
        assert all(chr(int(y[row, s + k])).isdigit() for s in starts for k in range(5))
        assert all(y[row, s + 5] == tokenizer.EOS for s in starts)


def test_heldout_rows_start_with_bos(corpus):
    rows = data.heldout_rows(corpus, seq_len=100, rows=3)
    assert rows.shape == (3, 101) and (rows[:, 0] == tokenizer.BOS).all()
    assert bytes(rows[0, 1:].tolist()) == bytes(corpus[:100])
    with pytest.raises(ValueError, match="shorter than one row"):
        data.heldout_rows(corpus[:50], seq_len=100, rows=1)
