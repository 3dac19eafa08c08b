"""Generated data: deterministic per seed, and the recall / diagnostic targets really are
the answers at the stated distances."""

import re

import numpy as np
import pytest
import torch
from conftest import shared_path

import memlm
from memlm.data.batches import RandomWindows
from memlm.data.synthetic import (
    ATTRIBUTES,
    copy_task,
    mqar,
    needle,
    recall_stream,
    recall_targets,
    spans_to_tokens,
    stories_text,
)
from memlm.data.tokenizers import make_tokenizer
from memlm.errors import DataError
from memlm.registry import DATASETS
from memlm.types import IGNORE_INDEX

# ----- builtin:recall ---------------------------------------------------------------------------


def test_recall_stream_is_deterministic_per_seed():
    a = recall_stream(20_000, seed=1)
    assert a == recall_stream(20_000, seed=1)
    assert a[0] != recall_stream(20_000, seed=2)[0]


def test_recall_text_is_plain_ascii_of_the_asked_length():
    text, spans = recall_stream(30_000, seed=0)
    assert text.isascii() and "\0" not in text
    assert 30_000 <= len(text) < 30_100
    assert len(spans) > 100


def test_every_answer_span_is_the_latest_statement_of_that_fact_at_the_stated_gap():
    text, spans = recall_stream(50_000, seed=0)
    for s in spans:
        assert text[s.start : s.end] == s.answer
        assert s.answer.isdigit() and len(s.answer) == ATTRIBUTES[s.attribute]
        question = f"what is the {s.attribute} of {s.key}? "
        assert text[s.start - len(question) : s.start] == question
        statement = f"the {s.attribute} of {s.key} is "
        assert text[s.fact_start - len(statement) : s.fact_start] == statement
        assert text[s.fact_start : s.fact_start + len(s.answer) + 1] == s.answer + "."
        assert s.gap == s.start - s.fact_start
        # no restatement of the same fact in between: the recalled value is unambiguous
        between = text[s.fact_start : s.start - len(question)]
        assert statement not in between


def test_recall_gaps_cover_a_short_window_and_far_beyond_it():
    _, spans = recall_stream(100_000, seed=0, gap_range=(200, 2000))
    gaps = np.array([s.gap for s in spans])
    near, far = (gaps < 64).mean(), ((gaps >= 200) & (gaps <= 2100)).mean()
    assert 0.1 < near < 0.4
    assert far > 0.5
    assert near + far > 0.95  # almost nothing lands between the two ranges


def test_answer_spans_map_to_token_positions():
    text, spans = recall_stream(5000, seed=0)
    byte = make_tokenizer("byte")
    ids, token_spans = spans_to_tokens(text, spans, byte)
    for s, t in zip(spans, token_spans):
        assert (t.start, t.end, t.gap, t.token_gap) == (s.start, s.end, s.gap, s.gap)
    targets = recall_targets(ids, token_spans)
    scored = (targets != IGNORE_INDEX).nonzero().flatten()
    # a prediction at t-1 targets answer token t
    assert byte.decode(targets[scored].tolist()) == "".join(s.answer for s in spans)
    assert len(scored) == sum(len(s.answer) for s in spans)


def test_answer_spans_map_through_a_bpe_tokenizer():
    text, spans = recall_stream(5000, seed=0)
    tok = make_tokenizer(f"gpt2:{shared_path('gpt2-bpe')}")
    ids, token_spans = spans_to_tokens(text, spans, tok)
    for s, t in zip(spans, token_spans):
        assert tok.decode(ids[t.start : t.end]).strip() == s.answer
        assert 0 < t.token_gap < s.gap  # several characters per token


def test_stories_are_deterministic_prose_without_recall_questions():
    text = stories_text(20_000, seed=0)
    assert text == stories_text(20_000, seed=0) and text != stories_text(20_000, seed=1)
    assert text.isascii() and "what is the" not in text
    assert text.count("once upon a time") > 20


@pytest.mark.slow
def test_a_tiny_model_learns_the_recall_text_quickly():
    """Local structure is low-entropy: 150 steps of a 2-layer GPT beat the unigram entropy
    by a wide margin (about 1.1 vs 3.0 nats), so what stays hard is the long-range recall itself."""
    text, _ = recall_stream(100_000, seed=0)
    tokens = np.frombuffer(text.encode(), np.uint8).astype(np.int64)
    freq = np.bincount(tokens, minlength=256) / len(tokens)
    unigram = float(-(freq[freq > 0] * np.log(freq[freq > 0])).sum())
    model = memlm.build("gpt", vocab_size=256, n_layer=2, d_model=64, n_head=4, context_len=64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches = RandomWindows(tokens, batch_size=16, seq_len=64, seed=0)
    losses = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is as fast and immune to a busy CPU
    try:
        for _ in range(150):
            b = batches.next_batch()
            loss = model(b.input_ids, targets=b.targets).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    assert np.mean(losses[-10:]) < 0.6 * unigram


# ----- token-level diagnostics ------------------------------------------------------------------


def test_mqar_queries_target_the_values_of_their_keys():
    x, y = mqar(n_pairs=6, distance=10, vocab_size=64, n_samples=5, seed=0)
    assert x.shape == y.shape == (5, 12 + 10 + 12) and x.dtype == torch.long
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        kv = dict(zip(row_x[0:12:2], row_x[1:12:2]))
        assert len(kv) == 6 and all(1 <= k < 32 <= v < 64 for k, v in kv.items())
        assert row_x[12:22] == [0] * 10  # the filler between pairs and queries
        for t in range(34):
            if t >= 22 and (t - 22) % 2 == 0:
                assert row_y[t] == kv[row_x[t]] == row_x[t + 1]
            else:
                assert row_y[t] == IGNORE_INDEX


def test_mqar_is_deterministic_and_checks_its_arguments():
    a = mqar(4, 8, 32, 3, seed=5)
    assert all(torch.equal(u, v) for u, v in zip(a, mqar(4, 8, 32, 3, seed=5)))
    assert not torch.equal(a[0], mqar(4, 8, 32, 3, seed=6)[0])
    with pytest.raises(DataError, match="n_pairs"):
        mqar(n_pairs=20, distance=0, vocab_size=32, n_samples=1)


def test_copy_task_targets_the_copied_string():
    x, y = copy_task(length=5, n_samples=4, vocab_size=20, seed=0, delay=3)
    assert x.shape == (4, 14)
    src = x[:, :5]
    assert torch.all(x[:, 5:8] == 0) and torch.all(x[:, 8] == 1)
    assert torch.equal(x[:, 9:], src)
    assert torch.equal(y[:, 8:13], src)  # the separator predicts x1, copied x1 predicts x2 ...
    assert torch.all(y[:, :8] == IGNORE_INDEX) and torch.all(y[:, 13] == IGNORE_INDEX)
    assert torch.equal(x, copy_task(5, 4, 20, seed=0, delay=3)[0])
    assert not torch.equal(x, copy_task(5, 4, 20, seed=1, delay=3)[0])


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_needle_sits_at_its_depth_and_is_asked_at_the_end(depth):
    x, y = needle(haystack_len=40, depth=depth, n_samples=3, vocab_size=50, seed=0, needle_len=3)
    assert x.shape == (3, 40 + 2 * 3 + 2)
    at = int(round(depth * 40))
    assert torch.all(x[:, at] == 1) and (x == 1).sum() == 3  # one needle mark per row
    value = x[:, at + 1 : at + 4]
    assert torch.all(x[:, -4] == 2) and torch.equal(x[:, -3:], value)
    assert torch.equal(y[:, -4:-1], value) and torch.all(y[:, :-4] == IGNORE_INDEX)
    assert not torch.equal(x, needle(40, depth, 3, 50, seed=1, needle_len=3)[0])


def test_diagnostics_are_data_sources_with_exact_resume():
    byte = make_tokenizer("byte")
    make = DATASETS.get("mqar")
    src = make("mqar:pairs=4,distance=8", tokenizer=byte, batch_size=2, seq_len=32, seed=0)
    first = [src.next_batch() for _ in range(3)]
    assert first[0].input_ids.shape == (2, 32)  # 24 tokens padded to seq_len
    assert torch.all(first[0].targets[:, 24:] == IGNORE_INDEX)
    assert first[0].n_tokens == 2 * 4

    resumed = make("mqar:pairs=4,distance=8", tokenizer=byte, batch_size=2, seq_len=32, seed=0)
    resumed.load_state_dict(src.state_dict())
    src2 = make("mqar:pairs=4,distance=8", tokenizer=byte, batch_size=2, seq_len=32, seed=0)
    for _ in range(3):
        src2.next_batch()
    assert torch.equal(resumed.next_batch().input_ids, src2.next_batch().input_ids)

    val = make(
        "mqar:pairs=4,distance=8", tokenizer=byte, batch_size=2, seq_len=32, seed=0, split="val"
    )
    assert not torch.equal(val.next_batch().input_ids, first[0].input_ids)


def test_diagnostic_sources_report_bad_specs():
    byte = make_tokenizer("byte")
    with pytest.raises(DataError, match=re.escape("raise data.seq_len")):
        DATASETS.get("copy")("copy:length=40", tokenizer=byte, batch_size=1, seq_len=32, seed=0)
    with pytest.raises(DataError, match="depth, haystack, needle"):
        DATASETS.get("needle")("needle:deep=0.5", tokenizer=byte, batch_size=1, seq_len=64, seed=0)
