"""Results store: atomic appends, last-row-per-key reads, schema growth, compaction, 16 writers."""
from __future__ import annotations

import multiprocessing as mp

import numpy as np
import pandas as pd
import pytest

from analysis.store import ResultsStore, read_table


def _row(run, step, loss, **extra):
    return dict(run_id=run, step=step, val_loss=loss, **extra)


def test_append_read_last_row_per_key(tmp_path):
    st = ResultsStore(tmp_path / "store")
    assert st.read("train").empty
    st.append("train", [_row("a", 0, 3.0), _row("a", 10, 2.0), _row("b", 0, 4.0)])
    st.append("train", [_row("a", 10, 1.5)])  # re-emitted after a resume
    df = st.read("train")
    assert len(df) == 3
    got = df.set_index(["run_id", "step"])["val_loss"].to_dict()
    assert got == {("a", 0): 3.0, ("a", 10): 1.5, ("b", 0): 4.0}
    assert "_seq" not in df.columns and "_seq" in st.read("train", internal=True).columns
    # one line with pandas over the directory reads the raw parts (no temp files visible)
    raw = pd.read_parquet(tmp_path / "store" / "train")
    assert len(raw) == 4
    assert not [p for p in (tmp_path / "store" / "train").iterdir() if not p.name.startswith("part-")]


def test_seq_strictly_increasing_and_new_columns(tmp_path):
    st = ResultsStore(tmp_path)
    st.append("train", pd.DataFrame([_row("a", i, float(i)) for i in range(5)]))
    st.append("train", [_row("a", 5, 0.1, val_loss__hcp=0.2, package_versions={"torch": "2.11"})])
    df = st.read("train", internal=True)
    assert np.all(np.diff(df["_seq"].to_numpy()) > 0)
    assert df["val_loss__hcp"].isna().sum() == 5 and df["val_loss__hcp"].iloc[-1] == 0.2
    assert df["package_versions"].iloc[-1] == '{"torch": "2.11"}'
    assert read_table(tmp_path, "train").shape == (6, 5)


def test_bad_rows(tmp_path):
    st = ResultsStore(tmp_path)
    with pytest.raises(ValueError, match="key column 'step' missing"):
        st.append("train", [dict(run_id="a", val_loss=1.0)])
    with pytest.raises(ValueError, match="key column 'run_id' has missing values"):
        st.append("train", [dict(run_id=None, step=1)])
    with pytest.raises(ValueError, match="table name"):
        st.append("../x", [dict(a=1)])
    assert st.append("train", []) == 0


def test_keyless_table_keeps_all_rows_and_compaction(tmp_path):
    st = ResultsStore(tmp_path)
    for i in range(4):
        st.append("notes", [dict(x=i), dict(x=i)])
        st.append("train", [_row("r", i % 2, float(i))])
    assert len(st.read("notes")) == 8
    before = st.read("train")
    assert st.compact("train") == 4 and st.compact("notes") == 4
    assert len(st.parts("train")) == 1 and len(st.parts("notes")) == 1
    pd.testing.assert_frame_equal(st.read("train"), before)
    assert len(st.read("notes")) == 8
    st.append("train", [_row("r", 0, -1.0)])  # after compaction, newer rows still win
    assert st.read("train").set_index("step").loc[0, "val_loss"] == -1.0


def _writer(args):
    root, w, n_appends = args
    st = ResultsStore(root)
    for i in range(n_appends):
        # own keys re-emitted (last value must win) + one key shared by every writer
        st.append("train", [_row(f"w{w}", 0, float(i), writer=w, i=i), _row("shared", 0, float(w), writer=w, i=i)])
        if w == 0 and i % 3 == 0:
            st.compact("train")
    return w


def _reader(root, n_reads, q):
    """Rows never disappear once visible, even while compactions delete the parts they came from."""
    st, seen, ok = ResultsStore(root), set(), True
    for _ in range(n_reads):
        df = st.read("train")
        keys = set(df["run_id"]) if len(df) else set()
        ok &= seen <= keys
        seen = keys
    q.put(ok)


def test_sixteen_concurrent_writers_with_compaction(tmp_path):
    ctx = mp.get_context("fork")
    n_appends = 6
    q = ctx.Queue()
    reader = ctx.Process(target=_reader, args=(str(tmp_path), 30, q))
    reader.start()
    with ctx.Pool(16) as pool:
        assert sorted(pool.map(_writer, [(str(tmp_path), w, n_appends) for w in range(16)])) == list(range(16))
    assert q.get(timeout=120) is True
    reader.join(timeout=60)
    st = ResultsStore(tmp_path)
    df = st.read("train", internal=True)
    assert len(df) == 17
    own = df[df.run_id != "shared"].set_index("run_id")
    for w in range(16):  # every writer's last value survived appends racing with compaction
        assert own.loc[f"w{w}", "val_loss"] == n_appends - 1
    # the shared key holds the row with the globally largest stamp among all 16 * n_appends writes
    shared = df[df.run_id == "shared"].iloc[0]
    assert shared["i"] == n_appends - 1
    # each append stamps the own row s and the shared row s + 1, so the winner is the writer whose
    # last own row has the largest stamp
    assert shared["_seq"] == own["_seq"].max() + 1
    assert shared["writer"] == own.loc[own["_seq"].idxmax(), "writer"]
    st.compact("train")
    assert len(st.parts("train")) == 1 and len(st.read("train")) == 17


class _CompactDuringRead(ResultsStore):
    """Runs a compaction (by another store object) between listing the parts and reading them."""

    raced = False

    def _read_parts(self, parts):
        if not self.raced and len(parts) > 1:
            self.raced = True
            assert ResultsStore(self.root).compact("train") == len(parts)
        return super()._read_parts(parts)


def test_read_survives_compaction_between_listing_and_reading(tmp_path):
    for i in range(3):
        ResultsStore(tmp_path).append("train", [_row(f"r{i}", 0, float(i))])
    st = _CompactDuringRead(tmp_path)
    df = st.read("train")
    assert st.raced and sorted(df.run_id) == ["r0", "r1", "r2"]
