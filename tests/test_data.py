"""Tokenizers and corpus preparation: ids are right, saved tokenizers reproduce them,
token files are cached, and every bad input gets an error that names it."""

import json
import sys
import types

import numpy as np
import pytest
import torch
from conftest import shared_path

from memlm.config import DataConfig
from memlm.data import corpus
from memlm.data.corpus import prepare_data, read_text
from memlm.data.tokenizers import (
    ByteTokenizer,
    check_vocab,
    load_tokenizer,
    make_tokenizer,
)
from memlm.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    TokenizerMismatchError,
    UnknownNameError,
)

TEXT = "Hello world! Ünïcödé ☃ and plain ASCII.\nSecond line\ttab."


def gpt2_dir():
    return shared_path("gpt2-bpe")


# ----- tokenizers -------------------------------------------------------------------------------


def test_byte_tokenizer_round_trips_any_text_and_uses_nul_as_eot():
    tok = make_tokenizer("byte")
    ids = tok.encode(TEXT)
    assert ids == list(TEXT.encode("utf-8"))
    assert tok.decode(ids) == TEXT
    assert (tok.vocab_size, tok.eot_id) == (256, 0)
    assert tok.token_strings(tok.encode("a\n")) == ["a", "<0x0A>"]
    assert np.array_equal(tok.encode_array(TEXT), ids)


def test_ids_outside_the_vocabulary_decode_to_replacement_characters():
    # a model with a padded vocabulary may emit such ids; generation must not crash
    assert make_tokenizer("byte").decode([104, 300, 105]) == "h\ufffdi"
    char = make_tokenizer("char", text="hi")
    assert char.decode([0, 99, 1]) == "h\ufffdi"


def test_char_tokenizer_fits_sorted_characters_and_names_an_unknown_one():
    tok = make_tokenizer("char", text="hello world")
    assert tok.chars == sorted(set("hello world"))
    assert tok.eot_id == len(tok.chars) and tok.vocab_size == len(tok.chars) + 1
    assert tok.decode(tok.encode("hello")) == "hello"
    with pytest.raises(DataError, match=r"'x' \(U\+0078\).*byte"):
        tok.encode("hex")
    with pytest.raises(DataError, match="fitted on the corpus"):
        make_tokenizer("char")


@pytest.mark.parametrize("spec", ["char", "bpe:300"])
def test_fitted_tokenizers_reload_and_give_the_same_ids(spec, tmp_path):
    corpus_text = (TEXT + " the quick brown fox jumps over the lazy dog.\n") * 50
    tok = make_tokenizer(spec, text=corpus_text)
    saved = tok.save(tmp_path)
    assert saved == tmp_path / "tokenizer.json"
    again = load_tokenizer(tmp_path)
    assert type(again) is type(tok)
    assert again.encode(corpus_text) == tok.encode(corpus_text)
    assert again.vocab_size == tok.vocab_size and again.eot_id == tok.eot_id
    assert again.fingerprint() == tok.fingerprint()


def test_bpe_tokenizer_has_the_asked_size_and_round_trips_unseen_text():
    words = " ".join(f"w{i}x{i * 7}" for i in range(400))
    tok = make_tokenizer("bpe:300", text=words)
    assert tok.vocab_size == 300 and tok.name == "bpe:300" and tok.eot_id == 0
    assert tok.decode(tok.encode(TEXT)) == TEXT  # byte level: no unknown characters
    assert len(tok.encode("w12x84 w13x91")) < len("w12x84 w13x91")  # it learned merges
    # a corpus with fewer possible merges gives a smaller vocabulary, never a larger one
    assert make_tokenizer("bpe:300", text="abc abd " * 50).vocab_size < 300
    with pytest.raises(DataError, match="too small"):
        make_tokenizer("bpe:100", text="abc")
    with pytest.raises(DataError, match="bpe:4096"):
        make_tokenizer("bpe", text="abc")


def test_gpt2_ids_match_openai():
    tok = make_tokenizer(f"gpt2:{gpt2_dir()}")
    assert tok.encode("Hello world") == [15496, 995]
    assert (tok.vocab_size, tok.eot_id) == (50257, 50256)
    assert tok.decode(tok.encode(TEXT)) == TEXT
    # "<|endoftext|>" in text is text, never the special id
    assert 50256 not in tok.encode("a <|endoftext|> b")
    assert tok.decode([50256]) == "<|endoftext|>"


def test_gpt2_agrees_with_an_independent_bpe_implementation():
    from tokenizers import ByteLevelBPETokenizer

    folder = gpt2_dir()
    text = read_text(str(shared_path("wikitext-2", "valid.txt")))[:100_000] + " ☃ 日本語"
    reference = ByteLevelBPETokenizer(str(folder / "encoder.json"), str(folder / "vocab.bpe"))
    assert make_tokenizer(f"gpt2:{folder}").encode(text) == reference.encode(text).ids


def test_gpt2_saved_form_records_the_files_and_checks_them(tmp_path, monkeypatch):
    tok = make_tokenizer(f"gpt2:{gpt2_dir()}")
    tok.save(tmp_path / "tokenizer.json")
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    assert data["folder"] == str(gpt2_dir().resolve()) and len(data["sha256"]) == 2
    assert load_tokenizer(tmp_path).encode("Hello world") == [15496, 995]

    data["sha256"]["vocab.bpe"] = "0" * 64  # as if trained with other files
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    monkeypatch.delenv("MEMLM_GPT2_BPE_DIR", raising=False)
    with pytest.raises(TokenizerMismatchError, match="differ"):
        load_tokenizer(tmp_path)


def test_gpt2_folder_problems_are_named(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        make_tokenizer(f"gpt2:{tmp_path / 'nope'}")
    (tmp_path / "encoder.json").write_bytes((gpt2_dir() / "encoder.json").read_bytes())
    with pytest.raises(DataError, match="lacks vocab.bpe"):
        make_tokenizer(f"gpt2:{tmp_path}")
    merges = (gpt2_dir() / "vocab.bpe").read_text().split("\n")
    (tmp_path / "vocab.bpe").write_text("\n".join(merges[:1000]))
    with pytest.raises(DataError, match="do not belong together"):
        make_tokenizer(f"gpt2:{tmp_path}")


def test_gpt2_without_a_folder_offline_says_to_pass_one(monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.delenv("MEMLM_GPT2_BPE_DIR", raising=False)
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(DataError, match=r"gpt2:/path/to/dir.*MEMLM_GPT2_BPE_DIR"):
        make_tokenizer("gpt2")


def test_gpt2_folder_from_the_environment(monkeypatch):
    monkeypatch.setenv("MEMLM_GPT2_BPE_DIR", str(gpt2_dir()))
    assert make_tokenizer("gpt2").encode("Hello world") == [15496, 995]


def test_unknown_tokenizer_lists_the_valid_names():
    with pytest.raises(UnknownNameError, match=r"'wordpiece'.*bpe, byte, char, gpt2"):
        make_tokenizer("wordpiece")


def test_check_vocab_refuses_a_model_with_fewer_ids():
    tok = make_tokenizer("byte")
    check_vocab(tok, 256)
    check_vocab(tok, 320)  # a padded model vocabulary is fine
    with pytest.raises(
        TokenizerMismatchError, match=r"256 ids.*runs/x.*vocab_size 97.*runs/x/tokenizer.json"
    ):
        check_vocab(tok, 97, where="runs/x")


def test_load_tokenizer_reports_missing_and_damaged_files(tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="damaged"):
        load_tokenizer(tmp_path)


def test_load_tokenizer_reads_a_run_folder(tmp_path):
    """A training run keeps its tokenizer as memlm_tokenizer.json; load_tokenizer finds it."""
    from memlm.config import RunConfig
    from memlm.train.trainer import train

    cfg = RunConfig.from_dict({
        "model": {"arch": "gpt", "n_layer": 1, "d_model": 16, "n_head": 2, "context_len": 8},
        "train": {"max_steps": 1, "batch_size": 2, "precision": "fp32"},
        "data": {"source": "builtin:recall:chars=3000", "tokenizer": "char"}})
    train(cfg, tmp_path / "run", progress=False)
    tok = load_tokenizer(tmp_path / "run")
    assert tok.decode(tok.encode("the code of")) == "the code of"


# ----- corpus -----------------------------------------------------------------------------------


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def cfg(tmp_path, source, **kw):
    return DataConfig(source=str(source), cache_dir=str(tmp_path / "cache"), **kw)


def test_a_file_becomes_train_then_val_tokens(tmp_path):
    text = "abcdefghij" * 100
    f = write(tmp_path / "a.txt", text)
    data = prepare_data(cfg(tmp_path, f, val_fraction=0.1), progress=False)
    assert isinstance(data.train, np.memmap) and data.train.dtype == np.uint16
    assert (len(data.train), len(data.val)) == (900, 100)
    joined = np.concatenate([data.train, data.val])
    assert data.tokenizer.decode(joined.tolist()) == text  # train first, val is the tail
    assert data.meta["n_train"] == 900 and data.meta["cache_hit"] is False


def test_second_prepare_is_a_cache_hit_and_a_changed_file_is_not(tmp_path):
    f = write(tmp_path / "a.txt", "some text to tokenise " * 50)
    first = prepare_data(cfg(tmp_path, f), progress=False)
    second = prepare_data(cfg(tmp_path, f), progress=False)
    assert second.meta["cache_hit"] is True
    assert second.meta["files"] == first.meta["files"]
    assert np.array_equal(first.train, second.train)
    write(f, "other text entirely " * 50)
    third = prepare_data(cfg(tmp_path, f), progress=False)
    assert third.meta["cache_hit"] is False
    assert third.meta["files"] != first.meta["files"]


def test_a_different_tokenizer_never_reuses_cached_ids(tmp_path):
    f = write(tmp_path / "a.txt", "abcabcabc " * 50)
    prepare_data(cfg(tmp_path, f, tokenizer="byte"), progress=False)
    char = prepare_data(cfg(tmp_path, f, tokenizer="char"), progress=False)
    assert char.meta["cache_hit"] is False and char.tokenizer.name == "char"


def test_cache_dir_defaults_to_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMLM_CACHE", str(tmp_path / "envcache"))
    f = write(tmp_path / "a.txt", "text " * 100)
    data = prepare_data(DataConfig(source=str(f)), progress=False)
    assert data.meta["files"]["train"].startswith(str(tmp_path / "envcache"))


class BigVocab(ByteTokenizer):
    """Byte ids, but claims 70,000 ids: its tokens must be stored as uint32."""

    @property
    def vocab_size(self):
        return 70_000

    def to_dict(self):
        return {"kind": "byte", "test_vocab": 70_000}


def test_token_dtype_is_uint32_past_65536_ids(tmp_path):
    f = write(tmp_path / "a.txt", "x" * 100)
    assert prepare_data(cfg(tmp_path, f), progress=False).train.dtype == np.uint16
    data = prepare_data(cfg(tmp_path, f), tokenizer=BigVocab(), progress=False)
    assert data.train.dtype == np.uint32 and data.meta["dtype"] == "uint32"


def test_folder_glob_and_list_sources_read_documents_in_order_with_eot_between(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    write(d / "b.txt", "second")
    write(d / "a.txt", "first")
    write(d / "notes.md", "ignored")
    tok = make_tokenizer("byte")
    expected = tok.encode("first") + [tok.eot_id] + tok.encode("second")
    for source in (d, d / "*.txt", f"{d / 'a.txt'},{d / 'b.txt'}"):
        data = prepare_data(cfg(tmp_path, source, val_fraction=0.2), progress=False)
        assert np.concatenate([data.train, data.val]).tolist() == expected


def test_val_source_is_tokenised_separately(tmp_path):
    train = write(tmp_path / "train.txt", "abab" * 100)
    val = write(tmp_path / "val.txt", "abz")
    data = prepare_data(cfg(tmp_path, train, val_source=str(val), tokenizer="char"), progress=False)
    assert len(data.train) == 400
    # the char vocabulary also covers the val text, so 'z' is known
    assert data.tokenizer.decode(data.val.tolist()) == "abz"


def test_tokenising_in_chunks_gives_the_same_ids_as_at_once(tmp_path, monkeypatch):
    text = read_text(str(shared_path("tinyshakespeare", "input.txt")))[:50_000]
    f = write(tmp_path / "s.txt", text)
    tok = make_tokenizer(f"gpt2:{gpt2_dir()}")
    monkeypatch.setattr(corpus, "CHUNK_CHARS", 1000)
    data = prepare_data(cfg(tmp_path, f, val_fraction=0.1), tokenizer=tok, progress=False)
    assert np.concatenate([data.train, data.val]).tolist() == tok.encode(text)


def test_builtin_sources_need_no_files(tmp_path):
    data = prepare_data(cfg(tmp_path, "builtin:recall:chars=20000"), seed=3, progress=False)
    assert data.meta["n_train"] + data.meta["n_val"] >= 20_000
    text = data.tokenizer.decode(data.train.tolist())
    assert "what is the" in text and text.isascii()
    again = prepare_data(cfg(tmp_path, "builtin:recall:chars=20000"), seed=3, progress=False)
    assert again.meta["cache_hit"] is True
    other = prepare_data(cfg(tmp_path, "builtin:recall:chars=20000"), seed=4, progress=False)
    assert other.meta["cache_hit"] is False  # another seed generates other text
    with pytest.raises(UnknownNameError, match="recall, stories"):
        prepare_data(cfg(tmp_path, "builtin:recal"), progress=False)
    with pytest.raises(DataError, match="options are KEY=VALUE with KEY in .*chars, .*gap, .*near, .*seed"):
        prepare_data(cfg(tmp_path, "builtin:recall:size=10"), progress=False)


@pytest.mark.parametrize(
    "make_source, message",
    [
        (lambda p: p / "missing.txt", r"'.*missing\.txt' does not exist"),
        (lambda p: write(p / "empty.txt", "  \n"), r"empty\.txt' is empty"),
        (
            lambda p: (p / "nul.bin").write_bytes(b"abc\0def") and p / "nul.bin",
            r"nul\.bin' looks binary \(a NUL byte at offset 3\)",
        ),
        (
            lambda p: (p / "latin.txt").write_bytes(b"caf\xe9 au lait") and p / "latin.txt",
            r"latin\.txt' looks binary: it is not valid UTF-8 \(byte 3\)",
        ),
        (lambda p: p / "*.nothing", r"pattern '.*\*\.nothing' matches no file"),
        (lambda p: (p / "emptydir").mkdir() or p / "emptydir", r"holds no \*\.txt file"),
    ],
    ids=["missing", "empty", "nul-bytes", "not-utf8", "glob-no-match", "folder-no-txt"],
)
def test_bad_sources_raise_a_data_error_naming_them(tmp_path, make_source, message):
    source = make_source(tmp_path)
    with pytest.raises(DataError, match=message):
        prepare_data(cfg(tmp_path, source), progress=False)


def test_too_little_text_to_split(tmp_path):
    f = write(tmp_path / "tiny.txt", "ab")
    with pytest.raises(DataError, match="too few to split"):
        prepare_data(cfg(tmp_path, f), progress=False)


def test_hf_source_without_datasets_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DataError, match=r"pip install datasets"):
        prepare_data(cfg(tmp_path, "hf:wikitext:wikitext-2-raw-v1"), progress=False)


def test_hf_source_offline_says_it_needs_network(tmp_path, monkeypatch):
    fake = types.ModuleType("datasets")

    def load_dataset(name, config=None, split=None):
        raise ConnectionError(f"Couldn't reach {name} on the Hub")

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(DataError, match=r"'wikitext'.*'wikitext-2-raw-v1'.*needs network"):
        prepare_data(cfg(tmp_path, "hf:wikitext:wikitext-2-raw-v1"), progress=False)


# ----- episodes: the RMT training regime -------------------------------------------------------


def test_episodes_start_from_a_fresh_memory_and_continue_within_the_episode():
    from memlm.data.batches import RandomEpisodes

    tokens = np.arange(10_000, dtype=np.uint16)  # token value == position: easy to follow
    src = RandomEpisodes(tokens, batch_size=4, seq_len=8, segments=3, seed=1)
    for _ in range(2):  # two episodes of three segments
        segs = [src.next_batch() for _ in range(3)]
        assert segs[0].new_stream.all() and not segs[1].new_stream.any()
        assert not segs[2].new_stream.any()
        # the segments are consecutive windows of one stretch of text per row
        joined = torch.cat([b.input_ids for b in segs], dim=1)
        assert torch.equal(joined[:, 1:] - joined[:, :-1], torch.ones(4, 23, dtype=torch.long))
        assert torch.equal(segs[2].targets[:, -1], joined[:, -1] + 1)


def test_episodes_are_a_function_of_the_seed_and_resume_exactly():
    from memlm.data.batches import RandomEpisodes

    tokens = np.random.default_rng(0).integers(0, 500, 5_000).astype(np.uint16)
    a = RandomEpisodes(tokens, batch_size=2, seq_len=16, segments=2, seed=7)
    seen = [a.next_batch().input_ids for _ in range(5)]  # stops mid-episode
    b = RandomEpisodes(tokens, batch_size=2, seq_len=16, segments=2, seed=7)
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(a.next_batch().input_ids, b.next_batch().input_ids) for _ in range(4))
    c = RandomEpisodes(tokens, batch_size=2, seq_len=16, segments=2, seed=7)
    assert all(torch.equal(x, c.next_batch().input_ids) for x in seen)
    d = RandomEpisodes(tokens, batch_size=2, seq_len=16, segments=2, seed=8)
    assert not torch.equal(seen[0], d.next_batch().input_ids)


def test_episodes_too_long_for_the_text_are_refused():
    from memlm.data.batches import RandomEpisodes

    with pytest.raises(DataError, match="bptt_window"):
        RandomEpisodes(np.arange(50, dtype=np.uint16), batch_size=2, seq_len=16, segments=4)


def test_trainer_reads_one_episode_per_step_for_stateful_models(tmp_path):
    from memlm.config import RunConfig
    from memlm.data.batches import RandomEpisodes
    from memlm.train.trainer import Trainer

    cfg = RunConfig.from_dict({
        "model": {"arch": "rmt", "n_layer": 1, "d_model": 32, "n_head": 2, "context_len": 8},
        "train": {"max_steps": 2, "batch_size": 2, "bptt_window": 3, "precision": "fp32"},
        "data": {"source": "builtin:recall:chars=4000", "tokenizer": "byte",
                 "layout": "episodes"}})
    trainer = Trainer(cfg, progress=False)
    assert isinstance(trainer.source, RandomEpisodes) and trainer.source.segments == 3
    trainer.train_step()
    assert (trainer.source.episode, trainer.source.segment) == (0, 3)  # one whole episode
    with pytest.raises(ConfigError, match="episodes"):
        DataConfig(layout="chunks")
