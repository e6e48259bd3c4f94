"""The MMRec-format loader: valid folders load; each bad input names file, line and problem."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cliper_prod.data.mmrec import load_dataset
from cliper_prod.data.sampling import BPRSampler
from cliper_prod.errors import DataError
from tests.conftest import write_inter

GOOD = [(0, 0, 0), (0, 1, 0), (1, 1, 0), (1, 2, 0), (0, 2, 1), (1, 0, 2)]


def test_loads_splits_counts_and_id_maps(tmp_path: Path) -> None:
    write_inter(tmp_path, GOOD)
    (tmp_path / "u_id_mapping.csv").write_text("user_id\tuserID\nA\t0\nB\t1\n")
    (tmp_path / "i_id_mapping.csv").write_text("asin\titemID\nx\t0\ny\t1\nz\t2\n")
    data = load_dataset(tmp_path)
    assert (data.n_users, data.n_items) == (2, 3)
    assert data.train.tolist() == [[0, 0], [0, 1], [1, 1], [1, 2]]
    assert data.splits["valid"].tolist() == [[0, 2]]
    assert data.splits["test"].tolist() == [[1, 0]]
    assert data.user_ids == ["A", "B"] and data.item_ids == ["x", "y", "z"]


def test_optional_rating_and_timestamp_columns(tmp_path: Path) -> None:
    write_inter(tmp_path, [(u, i, 5, 100, lab) for u, i, lab in GOOD],
                header="userID\titemID\trating\ttimestamp\tx_label")
    assert load_dataset(tmp_path).train.shape == (4, 2)


@pytest.mark.parametrize("rows, header, line, message", [
    (GOOD, "userID\titemID", 1, "lacks column(s) x_label"),
    ([(0, "a", 0)], None, 2, "column 'itemID' must be an integer, got 'a'"),
    ([(0, 0, 0), (0, 1.5, 0)], None, 3, "column 'itemID' must be an integer"),
    ([(0, 0, 0), (1, 1, 7)], None, 3, "unknown x_label 7"),
    ([(0, 0, 0), (0, 1)], None, 3, "expected 3 tab-separated fields, got 2"),
    ([(0, -1, 0)], None, 2, "ids must be non-negative"),
])
def test_bad_rows_name_file_line_and_problem(tmp_path: Path, rows, header, line, message) -> None:
    path = write_inter(tmp_path, rows, header=header or "userID\titemID\tx_label")
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path)
    assert err.value.line == line
    assert message in str(err.value)
    assert str(err.value).startswith(f"{path}:{line}: ")


def test_id_gaps_are_rejected(tmp_path: Path) -> None:
    write_inter(tmp_path, [(0, 0, 0), (0, 3, 0), (1, 1, 0)])
    with pytest.raises(DataError, match=r"itemID ids must be contiguous 0..3; 1 missing \(2\)"):
        load_dataset(tmp_path)


def test_empty_train_split_is_rejected(tmp_path: Path) -> None:
    write_inter(tmp_path, [(0, 0, 1), (0, 1, 2)])
    with pytest.raises(DataError, match="train split .* is empty"):
        load_dataset(tmp_path)


def test_empty_file_and_missing_folder(tmp_path: Path) -> None:
    (tmp_path / "x.inter").write_text("")
    with pytest.raises(DataError, match="file is empty"):
        load_dataset(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no \*.inter file"):
        load_dataset(tmp_path / "empty")


def test_duplicate_pairs_are_rejected(tmp_path: Path) -> None:
    write_inter(tmp_path, GOOD + [(0, 1, 2)])
    with pytest.raises(DataError, match="duplicate interaction userID=0 itemID=1"):
        load_dataset(tmp_path)


def test_feature_rows_must_match_items(tmp_path: Path) -> None:
    write_inter(tmp_path, GOOD)
    np.save(tmp_path / "image_feat.npy", np.zeros((4, 5), dtype=np.float32))
    with pytest.raises(DataError, match="4 feature rows but the dataset has 3 items"):
        load_dataset(tmp_path)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_features_are_rejected(tmp_path: Path, bad: float) -> None:
    write_inter(tmp_path, GOOD)
    feat = np.ones((3, 4), dtype=np.float32)
    feat[2, 1] = bad
    np.save(tmp_path / "text_feat.npy", feat)
    with pytest.raises(DataError, match=r"text_feat.npy: 1 NaN/Inf value\(s\), first in row 2"):
        load_dataset(tmp_path)


def test_unreadable_feature_file(tmp_path: Path) -> None:
    write_inter(tmp_path, GOOD)
    (tmp_path / "image_feat.npy").write_bytes(b"not numpy")
    with pytest.raises(DataError, match="not a readable .npy array"):
        load_dataset(tmp_path)


def test_bad_id_mapping(tmp_path: Path) -> None:
    write_inter(tmp_path, GOOD)
    (tmp_path / "i_id_mapping.csv").write_text("asin\titemID\nx\t0\ny\t9\n")
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path)
    assert err.value.line == 3 and "outside the dataset's 0..2" in str(err.value)


def test_users_absent_from_train_are_dropped_and_reported(tmp_path: Path, caplog) -> None:
    # user 2 only has valid/test rows
    write_inter(tmp_path, GOOD + [(2, 0, 1), (2, 1, 2), (2, 2, 2)])
    data = load_dataset(tmp_path)
    assert data.dropped_cold == {"valid": 1, "test": 2}
    assert 2 not in data.splits["valid"][:, 0] and 2 not in data.splits["test"][:, 0]
    assert "absent from train are excluded" in caplog.text


def test_negatives_are_never_training_items() -> None:
    rng = np.random.default_rng(0)
    train = np.array([[u, i] for u in range(50) for i in rng.choice(10, 8, replace=False)])
    sampler = BPRSampler(train, 10, 64, np.random.default_rng(1))
    seen = {(u, i) for u, i in train}
    count = 0
    for users, pos, neg in sampler.epoch():
        assert all((u, n) not in seen for u, n in zip(users.tolist(), neg.tolist()))
        assert all((u, p) in seen for u, p in zip(users.tolist(), pos.tolist()))
        count += len(users)
    assert count == len(train)  # every positive once per epoch


def test_user_who_saw_every_item_cannot_be_sampled() -> None:
    with pytest.raises(DataError, match="user 0 interacted with all 2 items"):
        BPRSampler(np.array([[0, 0], [0, 1], [1, 0]]), 2, 2, np.random.default_rng(0))


def test_negatives_are_uniform_over_unseen_items() -> None:
    train = np.array([[0, 0], [0, 1]])
    sampler = BPRSampler(train, 6, 2, np.random.default_rng(0))
    neg = sampler.negatives(np.zeros(40000, dtype=np.int64))
    freq = np.bincount(neg, minlength=6) / len(neg)
    assert freq[:2].sum() == 0
    assert np.allclose(freq[2:], 0.25, atol=0.01)


def test_shared_baby_dataset_matches_its_readme() -> None:
    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "amazon" / "baby"
    if not root.exists():
        pytest.skip("../shared/data not present")
    data = load_dataset(root)
    assert (data.n_users, data.n_items) == (19445, 7050)
    assert [len(data.splits[s]) for s in ("train", "valid", "test")] == [119674, 20559, 20559]


def test_fast_and_line_by_line_parsers_read_the_same_rows(tmp_path: Path) -> None:
    # three columns take numpy's reader, an extra rating column the line-by-line parser
    rng = np.random.default_rng(0)
    rows = np.stack([rng.integers(0, 50, 300), rng.integers(0, 40, 300), rng.integers(0, 3, 300)], 1)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    lines = [f"{u}\t{i}\t{x}" for u, i, x in rows.tolist()]
    (tmp_path / "a" / "a.inter").write_text("userID\titemID\tx_label\n" + "\n".join(lines) + "\n\n")
    (tmp_path / "b" / "b.inter").write_text("itemID\trating\tuserID\tx_label\n" + "".join(
        f"{i}\t4.5\t{u}\t{x}\n" for u, i, x in rows.tolist()))
    from cliper_prod.data.mmrec import read_inter
    fast, slow = read_inter(tmp_path / "a" / "a.inter"), read_inter(tmp_path / "b" / "b.inter")
    np.testing.assert_array_equal(fast, rows)
    np.testing.assert_array_equal(slow, rows)
