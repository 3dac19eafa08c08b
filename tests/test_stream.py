"""Streaming: any length, segment by segment, in constant memory, for every memlm model."""

import gc
import math

import numpy as np
import pytest
import torch

import memlm
from memlm.data.sources import iter_text_chunks
from memlm.data.tokenizers import make_tokenizer
from memlm.errors import DataError, SequenceTooLongError
from memlm.eval.stream import bucket_name, stream, stream_file

V, L = 256, 8
SMALL = dict(vocab_size=V, n_layer=2, d_model=32, n_head=4, context_len=L)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def build(kind: str):
    extra = {"num_mem_tokens": 2, **({"d_mem": 8} if kind == "armt" else {})}
    model = memlm.build(kind, **SMALL, **(extra if kind != "gpt" else {}))
    if kind == "armt":
        with torch.no_grad():
            for layer in model.backbone.layers():
                layer.memory.w_v.weight.normal_(0, 0.2)
    return model.eval()


@pytest.mark.parametrize("kind", ["rmt", "armt"])
def test_streaming_equals_one_forward_over_the_whole_sequence(kind):
    model = build(kind)
    ids = torch.randint(0, V, (5 * L + 4,))
    with torch.no_grad():
        whole = model(ids[None, :-1], targets=ids[None, 1:])
    steps = list(model.stream(ids, segment_len=L))
    logits = torch.cat([s.output.logits for s in steps], dim=1)
    assert (logits - whole.logits).abs().max() < 1e-5
    nll = sum(s.nll_sum for s in steps) / sum(s.n_scored for s in steps)
    assert abs(nll - whole.loss.item()) < 1e-5
    assert [s.start for s in steps] == [0, 8, 16, 24, 32, 40]


def test_stateless_models_stream_each_segment_on_its_own():
    model = build("gpt")
    ids = torch.randint(0, V, (3 * L + 1,))
    steps = list(model.stream(ids, segment_len=L))
    with torch.no_grad():
        for s in steps:
            alone = model(ids[None, s.start : s.start + L]).logits
            assert torch.equal(s.output.logits, alone) and s.state is None
    with pytest.raises(SequenceTooLongError):
        next(model.stream(ids, segment_len=2 * L))


def test_stream_file_reads_text_lazily_and_reports(tmp_path):
    tok = make_tokenizer("byte")
    text = "".join(f"line {i}: the code of mia is {i * 7919 % 10000}.\n" for i in range(60))
    path = tmp_path / "book.txt"
    path.write_text(text)
    ids = np.asarray(tok.encode(text), dtype=np.uint16)
    ids.tofile(tmp_path / "book.bin")
    model = build("armt")
    report = stream_file(model, tok, path, segment_len=L, progress=False)
    assert report["n_scored"] == len(ids) - 1
    assert report["n_segments"] == math.ceil((len(ids) - 1) / L)
    assert math.isclose(report["ppl"], math.exp(report["loss"]))
    assert math.isclose(sum(report["nll_seg"].values()), report["loss"] * report["n_scored"],
                        rel_tol=1e-9)
    assert sum(report["count_seg"].values()) == report["n_scored"]
    assert report["peak_rss_bytes"] > 0 and report["tokens_per_s"] > 0
    from_bin = stream_file(model, tok, tmp_path / "book.bin", segment_len=L, progress=False)
    assert abs(from_bin["loss"] - report["loss"]) < 1e-9


def test_text_chunks_cut_only_where_tokenisation_cannot_change(tmp_path):
    text = "a  \nb\n\nc d\n e\tf\n\n\n g\nh" * 20
    path = tmp_path / "t.txt"
    path.write_text(text)
    chunks = list(iter_text_chunks(path, chunk_chars=7))
    assert "".join(chunks) == text and len(chunks) > 10
    cut = 0
    for c in chunks[:-1]:  # every cut is "x\n|y" or "\n| y", never after a blank line
        cut += len(c)
        before, after = text[cut - 2 : cut], text[cut : cut + 2]
        assert before[1] == "\n"
        assert (not before[0].isspace() and not after[0].isspace()) or (
            after[0] == " " and not after[1].isspace())
    tok = make_tokenizer("byte")
    assert sum((tok.encode(c) for c in chunks), []) == tok.encode(text)


def test_rows_split_the_stream_and_every_token_is_scored_once():
    model = build("rmt")
    ids = np.random.default_rng(0).integers(0, V, 7 * L + 3)
    two = stream_file(model, None, ids, segment_len=L, batch_size=2, progress=False)
    assert two["n_scored"] == len(ids) - 1
    half = math.ceil((len(ids) - 1) / 2)  # row 1 starts at token `half`, with fresh memory
    rows = [stream_file(model, None, ids[: half + 1], L, progress=False),
            stream_file(model, None, ids[half:], L, progress=False)]
    total = sum(r["loss"] * r["n_scored"] for r in rows)
    assert abs(total - two["loss"] * two["n_scored"]) < 1e-3
    with pytest.raises(DataError, match="batch_size > 1"):
        next(stream(model, iter([ids]), L, batch_size=2))


def test_memory_stays_constant_over_long_streams():
    model = build("armt")
    source = (np.random.default_rng(i).integers(0, V, 64) for i in range(10_000))
    shapes, live = {}, {}
    for step in stream(model, source, segment_len=L):
        if step.index in (50, 400):
            gc.collect()
            shapes[step.index] = [t.shape for layer in step.state.layers for t in layer]
            live[step.index] = sum(torch.is_tensor(o) for o in gc.get_objects())
        if step.index == 400:
            break
    assert shapes[50] == shapes[400]
    assert live[400] <= live[50]


def test_segment_buckets_grow_by_powers_of_four():
    names = [bucket_name(n) for n in (1, 2, 4, 5, 16, 17, 64, 65, 300)]
    assert names == ["1", "2-4", "2-4", "5-16", "5-16", "17-64", "17-64", "65-256", "257-1024"]
