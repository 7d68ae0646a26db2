"""The wide training corpus (echo_exec/train_tiny.corpus_split): the stdlib split unchanged, Debian documentation
added and held out by the same path-hash rule, compressed files read decompressed, duplicates dropped, and a
training run on it (a few steps) records what it read."""

from __future__ import annotations

import gzip
import json

import echo_exec.train_tiny as tt


def _fake_docs(tmp_path, monkeypatch):
    lic = tmp_path / "common-licenses"
    doc = tmp_path / "doc"
    lic.mkdir()
    (lic / "GPL-3").write_text("GNU GENERAL PUBLIC LICENSE\n" * 50)
    for i in range(40):
        d = doc / f"pkg{i}"
        d.mkdir(parents=True)
        (d / "copyright").write_text(f"Format: deb\nFiles: *\nCopyright: {i} Someone\nLicense: MIT\n")
        (d / "changelog.gz").write_bytes(gzip.compress(f"pkg{i} (1.{i}) unstable; urgency=low\n".encode() * 20))
        (d / "image.png").write_bytes(b"\x89PNG\0\0")  # not documentation text
    (doc / "pkg0" / "README").write_text("GNU GENERAL PUBLIC LICENSE\n" * 50)  # a duplicate of GPL-3
    monkeypatch.setattr(tt, "DOC_ROOTS", (lic, doc))
    return lic, doc


def test_wide_corpus_adds_documentation_and_holds_some_out(tmp_path, monkeypatch):
    _fake_docs(tmp_path, monkeypatch)
    train0, held0 = tt.corpus_split("stdlib")
    train, held = tt.corpus_split("wide")
    assert train[:len(train0)] == train0 and held[:len(held0)] == held0
    docs_train, docs_held = train[len(train0):], held[len(held0):]
    names = {f.name for f in docs_train + docs_held}
    assert names == {"GPL-3", "copyright", "changelog.gz"}  # no image, the README duplicate dropped
    assert len(docs_train) + len(docs_held) == 81
    assert all(tt.is_heldout(f.as_posix()) for f in docs_held)
    assert not set(docs_train) & set(docs_held)
    data = tt.encode_files([f for f in docs_train if f.suffix == ".gz"][:1])
    assert bytes(data[1:-1].astype("uint8")).startswith(b"pkg")  # decompressed


def test_doc_budget_caps_the_added_bytes(tmp_path, monkeypatch):
    _fake_docs(tmp_path, monkeypatch)
    train0, held0 = tt.corpus_split("stdlib")
    train, held = tt.corpus_split("wide", doc_bytes=2000)
    added = train[len(train0):] + held[len(held0):]
    assert 1 <= len(added) <= 3


def test_a_tiny_wide_run_records_its_corpus(tmp_path, monkeypatch):
    _fake_docs(tmp_path, monkeypatch)
    monkeypatch.setattr(tt, "eval_loss", lambda *a, **k: {"heldout_ce": 0.0})  # the test checks the recipe
    out = tmp_path / "model"
    meta = tt.train(tt.TrainArgs(role="target", out_dir=out, steps=2, batch_size=2, seq_len=32, corpus="wide",
                                 warmup_steps=1), log=lambda m: None)
    saved = json.loads((out / "train_meta.json").read_text())
    assert saved["corpus"] == "wide" and saved["doc_files"] > 0 and len(saved["train_files_sha1"]) == 40
    assert meta["steps"] == 2 and (out / "model.safetensors").exists()
