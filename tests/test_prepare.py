"""`loom prepare` and `loom stats` on real files, and their handling of bad input."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainer import prepare as prepare_module
from launch.cli import main
from trainer.dataset import TokenDataset
from trainer.prepare import PrepareError, SourceOptions, prepare
from trainer.stats import dataset_stats, read_lengths


@pytest.fixture
def corpus(tmp_path):
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    texts = {"a.py": "print('hello')\n", "pkg/b.py": "x = 1\n" * 300, "pkg/c.txt": "héllo wörld ✓\n" * 7,
             "d.md": "# title\n" + "word " * 2000}
    for name, text in texts.items():
        (src / name).write_text(text, encoding="utf-8")
    (src / "empty.txt").write_text("")
    (src / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    return src, texts


def no_leftovers(parent):
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_prepare_folder_round_trips_text(corpus, tmp_path):
    src, texts = corpus
    out = tmp_path / "ds"
    manifest = prepare(src, out, show_progress=False)
    assert manifest["documents"] == 4 and manifest["skipped"] == {"empty": 1, "undecodable": 1}
    ds = TokenDataset(out)
    table = pa.ipc.open_file(pa.memory_map(str(out / manifest["shards"][0]["file"]))).read_all()
    assert table.schema.names == ["tokens", "length", "doc_id", "source", "supervised"]
    assert table.column("doc_id").to_pylist() == [0, 1, 2, 3]
    by_source = {s.split("src/")[1]: i for i, s in enumerate(table.column("source").to_pylist())}
    for name, text in texts.items():
        ids = ds.tokens(by_source[name])
        assert ids[-1] == 257  # <eos>
        assert bytes(ids[:-1].astype(np.uint8)).decode("utf-8") == text
    assert manifest["tokens"] == sum(len(t.encode()) + 1 for t in texts.values())


def test_stats_match_numpy_and_write_png(corpus, tmp_path, capsys):
    src, texts = corpus
    out = tmp_path / "ds"
    prepare(src, out, show_progress=False)
    lengths = np.array(sorted(len(t.encode()) + 1 for t in texts.values()))
    stats = dataset_stats(out)
    assert stats["documents"] == 4 and stats["tokens"] == lengths.sum()
    assert stats["median"] == np.median(lengths) and stats["max"] == lengths.max()
    assert stats["p99"] == pytest.approx(np.percentile(lengths, 99))
    assert sum(b["tokens"] for b in stats["buckets"]) == lengths.sum()
    assert main(["stats", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["p90"] == pytest.approx(np.percentile(lengths, 90))
    png = (out / "lengths.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert main(["stats", str(out)]) == 0
    table = capsys.readouterr().out
    assert "tokens per length bucket" in table and "1 empty, 1 undecodable" in table


def test_jsonl_and_parquet_sources(tmp_path):
    rows = [{"text": "alpha"}, {"text": ""}, {"other": "x"}, {"text": "beta gamma"}]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    m = prepare(jsonl, tmp_path / "j", show_progress=False)
    assert m["documents"] == 2 and m["skipped"] == {"bad_json": 1, "empty": 1, "no_text": 1}
    pq.write_table(pa.table({"body": ["one", None, "three"]}), tmp_path / "d.parquet")
    m = prepare(tmp_path / "d.parquet", tmp_path / "p", opts=SourceOptions(text_key="body"), show_progress=False)
    assert m["documents"] == 2 and m["skipped"] == {"no_text": 1}


def test_hf_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["the cat sat on the mat"] * 50,
                            trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]", "<|endoftext|>"]))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("the cat sat")
    m = prepare(tmp_path / "src", tmp_path / "ds", tokenizer_spec=str(path), show_progress=False)
    eos = tok.token_to_id("<|endoftext|>")
    ids = TokenDataset(tmp_path / "ds").tokens(0).tolist()
    assert ids == tok.encode("the cat sat").ids + [eos]
    assert m["tokenizer"]["vocab_size"] == tok.get_vocab_size() and m["tokenizer"]["eos_id"] == eos


@pytest.mark.parametrize("make, message", [
    (lambda d: (d / "e.txt").write_text("") and None or d / "e.txt", "no usable documents in {src} (1 empty)"),
    (lambda d: (d / "bad.txt").write_bytes(b"\xff\xfe\xfa") and None or d / "bad.txt",
     "no usable documents in {src} (1 undecodable)"),
    (lambda d: pq.write_table(pa.table({"content": ["x"]}), d / "t.parquet") or d / "t.parquet",
     "parquet file {src} has no column 'text' (columns: content); pass --text-key"),
    (lambda d: d / "missing", "source not found: {src}"),
])
def test_bad_sources_fail_cleanly(tmp_path, capsys, make, message):
    src = make(tmp_path)
    out = tmp_path / "out"
    assert main(["prepare", str(src), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == f"loom: error: {message.format(src=src)}\n"
    assert not out.exists() and not no_leftovers(tmp_path)


def test_interrupted_prepare_leaves_nothing(corpus, tmp_path, monkeypatch):
    src, _ = corpus
    calls = {"n": 0}
    real_add = prepare_module.ShardWriter.add

    def interrupt_on_third(self, ids, source):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        real_add(self, ids, source)

    monkeypatch.setattr(prepare_module.ShardWriter, "add", interrupt_on_third)
    with pytest.raises(KeyboardInterrupt):
        prepare(src, tmp_path / "ds", show_progress=False)
    assert not (tmp_path / "ds").exists() and not no_leftovers(tmp_path)


def test_existing_output_is_kept_unless_forced(corpus, tmp_path):
    src, _ = corpus
    out = tmp_path / "ds"
    first = prepare(src, out, show_progress=False)
    assert prepare(src, out, show_progress=False).get("up_to_date")
    (src / "new.txt").write_text("more text")
    with pytest.raises(PrepareError, match="pass --force to replace it"):
        prepare(src, out, show_progress=False)
    assert json.loads((out / "index.json").read_text()) == first  # untouched
    assert prepare(src, out, force=True, show_progress=False)["documents"] == 5
    assert not no_leftovers(tmp_path)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "keep.txt").write_text("user data")
    with pytest.raises(PrepareError, match="exists and is not a Loom dataset"):
        prepare(src, tmp_path / "plain", show_progress=False)
    assert (tmp_path / "plain" / "keep.txt").read_text() == "user data"


def test_lengths_column_matches_tokens(small_dataset):
    ds = TokenDataset(small_dataset)
    lengths = read_lengths(small_dataset)
    assert len(ds) == lengths.size > 30
    assert all(ds.tokens(i).size == lengths[i] for i in range(len(ds)))
