"""BABILong: bAbI parsing, sample construction, scoring, the training source, evaluation.

Tests that need bAbI files or corpora read them from ../shared/data and skip when
absent; the filler, the synthetic task and the inline stories always run.
"""

from __future__ import annotations

import functools
import re

import numpy as np
import pytest
import torch

import memlm
from memlm import specs
from memlm.data import babi as babi_mod
from memlm.data import babilong as bl
from memlm.data import background
from memlm.data.filler import BABI_STOPLIST, QA1_5_LABELS, TEMPLATES, content_words, filler_sentence
from memlm.data.tokenizers import make_tokenizer
from memlm.errors import ConfigError, DataError
from memlm.eval import babilong as ev
from memlm.registry import DATASETS
from memlm.types import IGNORE_INDEX
from tests.conftest import shared_path

TINY_STORY = """\
1 Mary moved to the bathroom.
2 John went to the hallway.
3 Where is Mary? \tbathroom\t1
4 Daniel went back to the hallway.
5 Sandra moved to the garden.
6 Where is Daniel? \thallway\t4
1 John journeyed to the office.
2 Where is John? \toffice\t1
"""


@pytest.fixture(scope="module")
def byte_tok():
    return make_tokenizer("byte")


@pytest.fixture(scope="module")
def gpt2_tok():
    return make_tokenizer(f"gpt2:{shared_path('gpt2-bpe')}")


# ----- parsing -------------------------------------------------------------------------------


def test_parse_inline_story():
    samples = babi_mod.parse_babi(TINY_STORY.split("\n"), task="qa1", split="test")
    assert len(samples) == 3
    s = samples[1]
    # the earlier question line is not a fact; facts keep their order
    assert s.facts == ("Mary moved to the bathroom.", "John went to the hallway.",
                       "Daniel went back to the hallway.", "Sandra moved to the garden.")
    assert (s.question, s.answer, s.supporting) == ("Where is Daniel?", "hallway",
                                                   ("Daniel went back to the hallway.",))
    assert (s.story_index, s.question_index, s.sample_index) == (0, 1, 1)
    assert samples[2].facts == ("John journeyed to the office.",) and samples[2].story_index == 1


@pytest.mark.parametrize("text, what", [
    ("1 Mary moved to the bathroom.\nx John went.\n", "line 2"),
    ("1 Mary moved to the bathroom.\n3 John went to the hallway.\n", "line 2"),
    ("1 Mary moved.\n2 Where is Mary?\tx\t1\n3 Where is Mary?\tx\t2\n", "line 3"),
    ("1 Mary moved.\n2 Where is Mary?\t\t1\n", "line 2"),
])
def test_parse_errors_name_file_and_line(text, what):
    with pytest.raises(DataError, match=f"story.txt:{what.split()[1]}"):
        babi_mod.parse_babi(text.split("\n"), source="story.txt")


def test_parse_qa1_test_file(babi_dir):
    samples = babi_mod.load_task("qa1", "test", babi_dir)
    assert len(samples) == 1000
    s0, s1 = samples[0], samples[1]
    assert s0.facts == ("John travelled to the hallway.", "Mary journeyed to the bathroom.")
    assert (s0.question, s0.answer) == ("Where is John?", "hallway")
    assert s0.supporting == ("John travelled to the hallway.",)
    assert s1.facts == ("John travelled to the hallway.", "Mary journeyed to the bathroom.",
                        "Daniel went back to the bathroom.", "John moved to the bedroom.")
    assert (s1.question, s1.answer) == ("Where is Mary?", "bathroom")


def test_all_20_tasks_parse(babi_dir):
    for n in range(1, 21):
        test = babi_mod.load_task(f"qa{n}", "test", babi_dir)
        assert len(test) == 1000, n
        assert all(s.supporting and s.answer for s in test)
        assert len(babi_mod.load_task(f"qa{n}", "train", babi_dir)) >= 1000


def test_answers_are_verbatim(babi_dir):
    qa8 = {s.answer for s in babi_mod.load_task("qa8", "test", babi_dir)}
    qa19 = {s.answer for s in babi_mod.load_task("qa19", "test", babi_dir)}
    assert "football,apple" in qa8 and "s,s" in qa19


def test_train_prefers_10k_and_test_files_are_used_for_test(babi_dir):
    assert "en-10k" in str(babi_mod.find_task_file("qa1", "train", babi_dir))
    assert babi_mod.find_task_file("qa1", "test", babi_dir).name.endswith("_test.txt")
    assert len(babi_mod.load_task("qa1", "train", babi_dir)) == 10000


def test_synthetic_task_needs_no_files():
    train = babi_mod.load_task("synth-qa1", "train")
    test = babi_mod.load_task("synth-qa1", "test")
    assert len(test) == 1000 and len(train) == 10000
    for s in test[:50]:
        name = s.question.split()[-1].rstrip("?")
        # the answer is the named person's latest place, and the support says so
        latest = [f for f in s.facts if f.startswith(name + " ")][-1]
        assert s.supporting == (latest,) and latest.endswith(f" {s.answer}.")
    assert {s.facts for s in train[:200]}.isdisjoint({s.facts for s in test[:200]})


# ----- background text ---------------------------------------------------------------------


def test_sentence_splitter_rules():
    assert len(background.split_sentences("Mr. Smith went home. He slept.")) == 2
    assert len(background.split_sentences("H. americanus is a lobster.")) == 1
    assert len(background.split_sentences('It ended. "Yes," she said.')) == 2
    assert background.split_sentences("First Citizen: Before we proceed, hear me. All: Speak.") == [
        "First Citizen: Before we proceed, hear me.", "All: Speak."]


def test_wikitext_cleanup_rejoins_tokenised_numbers_and_punctuation():
    text = " = Heading = \n\n The 1 @,@ 000 @-@ year war ( long ) did n't end . It 's over .\n"
    paras = background.wikitext_paragraphs(text)
    assert paras == ["The 1,000-year war (long) didn't end. It's over."]


def test_wikitext_drops_unk_sentences(tmp_path):
    d = tmp_path / "wikitext-2"
    d.mkdir()
    (d / "test.txt").write_text(" = H = \n Good sentence here . A <unk> sentence . Fine again .\n")
    assert background.corpus_sentences(background.corpus_files(d)) == ["Good sentence here.", "Fine again."]


def test_one_corpus_train_and_eval_sentences_are_disjoint(byte_tok):
    path = shared_path("tinyshakespeare", "input.txt")
    bg = background.load_background(path, byte_tok)
    train = {bg.train.sentence(i).tobytes() for i in range(bg.train.n)}
    evl = {bg.eval.sentence(i).tobytes() for i in range(bg.eval.n)}
    assert train.isdisjoint(evl) and len(evl) > 100
    assert bg.train.n > 8 * bg.eval.n  # a 90/10 cut


def test_pool_cache_is_reused_and_keyed(tmp_path, byte_tok):
    corpus = tmp_path / "c.txt"
    corpus.write_text(" ".join(f"The quick fox number {i} jumped over dogs." for i in range(50)))
    cache = tmp_path / "cache"
    a = background.load_background(corpus, byte_tok, cache_dir=cache)
    files = list(cache.glob("*.npz"))
    assert len(files) == 1
    background._POOL_MEMO.clear()  # force a disk read
    b = background.load_background(corpus, byte_tok, cache_dir=cache)
    assert a.fingerprint == b.fingerprint
    assert np.array_equal(a.train.tokens, b.train.tokens)
    corpus.write_text(" ".join(f"Another text, {i}, with new words." for i in range(50)))
    assert background.load_background(corpus, byte_tok, cache_dir=cache).fingerprint != a.fingerprint


# ----- filler ----------------------------------------------------------------------------------


def test_filler_vocabulary_is_babi_free(gpt2_tok):
    assert len(TEMPLATES) >= 12 and len(content_words()) >= 250
    words, n_tokens, k = set(), 0, 0
    while n_tokens < 200_000:
        s = filler_sentence(0, k)
        words.update(w.lower() for w in re.findall(r"[A-Za-z]+", s))
        length = len(gpt2_tok.encode(" " + s))
        assert 10 <= length <= 40, s
        assert s[0].isupper() and s.endswith(".")
        n_tokens += length
        k += 1
    assert not words & BABI_STOPLIST
    assert not [w for w in words for label in QA1_5_LABELS if label in w]


def test_filler_is_index_addressable_and_varied():
    first = [filler_sentence(3, k) for k in range(10_000)]
    assert len(set(first)) >= 9000
    assert filler_sentence(3, 1234) == first[1234]  # sentence k depends only on (seed, k)
    assert filler_sentence(4, 1234) != first[1234]


# ----- sample construction ---------------------------------------------------------------------


def _strip_facts(sample: bl.BabilongSample, fact_ids) -> np.ndarray:
    keep = np.ones(len(sample.context), bool)
    for off, f in zip(sample.fact_offsets, fact_ids):
        keep[off:off + len(f)] = False
    return sample.context[keep]


@pytest.mark.parametrize("bg_name", ["filler", "wikitext", "shakespeare"])
@pytest.mark.parametrize("tok_name", ["byte", "gpt2"])
def test_exact_length_and_fact_integrity(bg_name, tok_name, byte_tok, babi_dir, request):
    tok = byte_tok if tok_name == "byte" else request.getfixturevalue("gpt2_tok")
    source = {"filler": None, "wikitext": shared_path("wikitext-2"),
              "shakespeare": shared_path("tinyshakespeare", "input.txt")}[bg_name]
    builder = bl.BabilongBuilder(tok, source, babi_dir=babi_dir)
    pool = builder.background.eval
    for length in (1000, 4000):
        es = builder.eval_set("qa2", length, n_samples=8)
        for s in es.samples:
            assert len(s.context) == length - 300
            facts = builder.fact_ids(s.babi)
            # facts in order, each one contiguous run at its recorded offset
            assert s.fact_offsets == sorted(s.fact_offsets)
            for off, f in zip(s.fact_offsets, facts):
                assert np.array_equal(s.context[off:off + len(f)], f)
            # without the facts: consecutive pool sentences, only the last one cut
            rest = _strip_facts(s, facts)
            if s.background_wraps == 0:
                rng = builder.rng("qa2", "test", s.C, s.babi.sample_index)
                k = pool.random_start(rng)
                expect = []
                while sum(map(len, expect)) < len(rest):
                    expect.append(pool.sentence(k))
                    k += 1
                assert np.array_equal(rest, np.concatenate(expect)[: len(rest)])


def test_facts_start_at_sentence_boundaries(byte_tok, babi_dir):
    builder = bl.BabilongBuilder(byte_tok, None, babi_dir=babi_dir)
    s = builder.eval_set("qa1", 1000, n_samples=5).samples[-1]
    text = byte_tok.decode(s.context.tolist())
    for f in s.babi.facts:
        i = text.index(" " + f)
        # the background sentence before a fact is whole, unless the fact sits in the
        # last gap, after the one truncated sentence (then only facts follow it)
        after = text[i:]
        for g in s.babi.facts:
            after = after.replace(" " + g, "", 1)
        assert i == 0 or text[i - 1] in ".!?" or after == ""


def test_zero_length_is_facts_only(byte_tok, babi_dir):
    builder = bl.BabilongBuilder(byte_tok, None, babi_dir=babi_dir)
    for s in builder.eval_set("qa1", "0k", n_samples=5).samples:
        assert np.array_equal(s.context, np.concatenate(builder.fact_ids(s.babi)))
        assert s.support_depth == 0.0 and s.background_wraps == 0


def test_samples_are_order_independent(byte_tok):
    builder = bl.BabilongBuilder(byte_tok, None, seed=7)
    qs = builder.questions("synth-qa1", "test")[:50]
    alone = builder.build("synth-qa1", qs[17], 700, "test")
    batch = [builder.build("synth-qa1", q, 700, "test") for q in qs]
    reverse = [builder.build("synth-qa1", q, 700, "test") for q in reversed(qs)][::-1]
    fresh = bl.BabilongBuilder(byte_tok, None, seed=7).build("synth-qa1", qs[17], 700, "test")
    for other in (batch[17], reverse[17], fresh):
        assert np.array_equal(alone.context, other.context)
        assert alone.fact_offsets == other.fact_offsets
    other_seed = bl.BabilongBuilder(byte_tok, None, seed=8).build("synth-qa1", qs[17], 700, "test")
    assert not np.array_equal(alone.context, other_seed.context)


def test_gap_distribution_is_uniform():
    # 2-token sentences: 201 gaps in a 402-token context, so deciles are nearly exact
    pool = background.SentencePool(np.arange(4000, dtype=np.int32) % 50 + 1,
                           np.arange(0, 4001, 2), "toy")
    fact = [np.array([99, 99], np.int32)]
    rng = np.random.default_rng(5)
    depths = np.array([bl.build_context(fact, 402, pool, rng).fact_offsets[0] / 402
                       for _ in range(20_000)])
    assert abs(depths.mean() - 0.5) < 0.01
    counts = np.bincount(np.minimum((depths * 10).astype(int), 9), minlength=10) / len(depths)
    assert np.all(np.abs(counts - 0.1) < 0.01), counts


def test_placement_window_restricts_depth():
    pool = background.SentencePool(np.ones(4000, np.int32), np.arange(0, 4001, 4), "toy")
    fact = [np.array([7, 7], np.int32)]
    for i in range(200):
        ctx = bl.build_context(fact, 402, pool, np.random.default_rng(i), placement=(0.5, 0.75))
        assert 201 <= ctx.fact_offsets[0] < 301 - 2


def test_over_long_samples_are_skipped_and_counted(byte_tok, babi_dir):
    builder = bl.BabilongBuilder(byte_tok, None, babi_dir=babi_dir)
    es = builder.eval_set("qa3", 1000, n_samples=20)  # qa3 stories are long
    assert es.n_skipped > 0 and len(es.samples) == 20
    assert all(sum(len(f) for f in builder.fact_ids(s.babi)) <= 700 for s in es.samples)
    with pytest.raises(DataError, match="qa3.*400"):
        builder.eval_set("qa3", 400, n_samples=5)


def test_train_and_test_never_mix(byte_tok, babi_dir):
    builder = bl.BabilongBuilder(byte_tok, None, babi_dir=babi_dir)
    test_files = {s.split for s in builder.questions("qa1", "test")}
    assert test_files == {"test"}
    train = builder.questions("qa1", "train")
    val = builder.questions("qa1", "val")
    assert {s.split for s in train} == {"train"} and len(train) + len(val) == 10000
    # val is a held-out tail of train stories: no story is in both
    assert max(s.story_index for s in train) < min(s.story_index for s in val)
    # and the filler streams of train and evaluation differ
    assert builder.background.train.seed != builder.background.eval.seed


def test_gpt2_marker_and_answer_tokens(gpt2_tok, babi_dir):
    builder = bl.BabilongBuilder(gpt2_tok, None, babi_dir=babi_dir)
    s = builder.eval_set("qa1", 0, n_samples=1).samples[0]
    assert s.marker_ids.tolist() == [35353] and s.answer_ids.tolist() == [23959]  # " hallway"
    assert s.prompt()[-1] == 35353


# ----- scoring ---------------------------------------------------------------------------------


def test_exact_match_normalisation():
    assert ev.exact_match(" Hallway.", "hallway")
    assert not ev.exact_match("hallway kitchen", "hallway")
    assert ev.exact_match("apple, milk", "apple,milk")
    assert not ev.exact_match("milk,apple", "apple,milk")
    assert ev.exact_match("  the   Office ", "the office")


def test_prediction_cut_at_eos_newline_and_marker(byte_tok):
    ids = byte_tok.encode(" kitchen") + [byte_tok.eot_id] + byte_tok.encode("junk")
    assert ev.extract_prediction(ids, byte_tok, byte_tok.eot_id) == " kitchen"
    assert ev.extract_prediction(byte_tok.encode(" garden\nmore"), byte_tok) == " garden"
    assert ev.extract_prediction(byte_tok.encode("x GEN office"), byte_tok) == " office"


def test_label_match_needs_exactly_the_answer_labels_ignoring_the_question():
    rooms = babi_mod.TASK_LABELS["qa1"]
    q = "Where is Mary?"
    assert ev.label_match("The most recent location of Mary is the kitchen.", "kitchen", q, rooms)
    assert not ev.label_match("the kitchen or the garden", "kitchen", q, rooms)
    assert ev.label_match("milk and apple", "apple,milk", "What is Mary carrying?",
                          babi_mod.TASK_LABELS["qa8"])
    # a label from the question is ignored: only "garden" counts here
    assert ev.label_match("from the kitchen to the garden", "garden",
                          "Where was Mary before the kitchen?", rooms)


def test_babilong_table_averages_accuracy_over_tasks_per_length():
    rows = [ev.LengthResult(t, 1000, 700, n_evaluated=10, correct=c)
            for t, c in zip(ev.QA1_5, (10, 8, 6, 4, 2))]
    table = ev.BabilongTable(rows, "m", "filler", "test", "generate", 0)
    assert table.accuracy("qa2", "1k") == 80.0
    assert table.mean_accuracy(1000) == 60.0 and table.to_dict()["babilong_score"] == {"1k": 60.0}
    assert "score" in str(table)


def test_accuracy_is_split_by_how_many_statements_follow_the_support():
    # story 0: Mary's fact is followed by one statement, Daniel's by one; story 1: none
    samples = babi_mod.parse_babi(TINY_STORY.split("\n"), task="qa1", split="test")
    empty = np.zeros(0, np.int32)

    def built(b):
        return bl.BabilongSample("qa1", "test", 0, b, empty, empty, empty, empty, [], [], 0, 0)

    assert [built(b).statements_after_support for b in samples] == [1, 1, 0]
    three_back = babi_mod.parse_babi(
        "1 Mary moved to the bathroom.\n2 John went to the hallway.\n3 Daniel went to the "
        "office.\n4 Sandra went to the garden.\n5 Where is Mary?\tbathroom\t1\n".split("\n"),
        task="qa1", split="test")
    assert built(three_back[0]).statements_after_support == 3
    row = ev.LengthResult("qa1", 0, 0)
    for b, em in zip(samples + three_back, (True, False, True, True)):
        row.add(built(b), em, em)
    # bins: support last (0), one statement after (1), two or more (2+)
    assert row.recency_n == [1, 2, 1] and row.recency_correct == [1, 1, 1]
    assert row.to_dict()["recency_correct"] == [1, 1, 1]


def test_length_and_task_spec_parsing():
    assert specs.parse_lengths("0k,1k,4k,16k,64k") == [0, 1000, 4000, 16000, 64000]
    assert specs.parse_lengths(["1M", 512]) == [1_000_000, 512]
    assert ev.parse_task_spec("babilong:qa1@0k,1k,4k") == ("qa1", [0, 1000, 4000])
    assert ev.parse_task_spec("babilong:qa1-qa3@2k").task == "qa1+qa2+qa3"
    with pytest.raises(ConfigError):
        specs.parse_length("four")
    with pytest.raises(ConfigError):
        ev.parse_task_spec("babilong:qa1@")


# ----- the training source -----------------------------------------------------------------------


def _source(tok, split="train", seq_len=400, batch_size=4, **kw):
    return DATASETS.get("babilong")("babilong:synth-qa1", tokenizer=tok, batch_size=batch_size,
                                    seq_len=seq_len, seed=3, split=split, **kw)


def test_source_scores_only_answer_and_eos(byte_tok):
    src = _source(byte_tok)
    batch = src.next_batch()
    assert batch.input_ids.shape == (4, 400) and batch.new_stream.all()
    for x, y in zip(batch.input_ids, batch.targets):
        scored = (y != IGNORE_INDEX).nonzero().flatten()
        text = byte_tok.decode(y[scored].tolist())
        # the scored targets are exactly " <place>" + eos, right after the marker
        assert re.fullmatch(r" (bathroom|bedroom|garden|hallway|kitchen|office)\x00", text)
        first = int(scored[0])
        assert byte_tok.decode(x[first - 2:first + 1].tolist()) == "GEN"
        assert (y[int(scored[-1]) + 1:] == IGNORE_INDEX).all()  # padding is never scored


def test_source_is_a_function_of_seed_and_step(byte_tok):
    a = _source(byte_tok)
    batches = [a.next_batch() for _ in range(3)]
    b = _source(byte_tok)
    b.load_state_dict({"step": 2})
    assert torch.equal(b.next_batch().input_ids, batches[2].input_ids)
    assert a.state_dict() == {"step": 3}
    r0 = _source(byte_tok, batch_size=2, rank=0, world_size=2).next_batch()
    r1 = _source(byte_tok, batch_size=2, rank=1, world_size=2).next_batch()
    assert torch.equal(torch.cat([r0.input_ids, r1.input_ids]), batches[0].input_ids)


def test_source_window_keeps_the_answer(byte_tok):
    batch = _source(byte_tok, seq_len=600).next_batch()
    clipped = DATASETS.get("babilong")("babilong:synth-qa1:window=128", tokenizer=byte_tok,
                                       batch_size=4, seq_len=600, seed=3, split="train")
    cb = clipped.next_batch()
    assert cb.input_ids.shape == (4, 128)
    assert cb.n_tokens == batch.n_tokens  # every answer token is still scored


def test_val_split_uses_held_out_stories(byte_tok):
    train, val = _source(byte_tok), _source(byte_tok, split="val")
    assert train.C == val.C
    train_stories = {q.story_index for q in train._questions["synth-qa1"]}
    val_stories = {q.story_index for q in val._questions["synth-qa1"]}
    assert train_stories.isdisjoint(val_stories)


def test_source_rejects_too_short_seq_len(byte_tok):
    with pytest.raises(ConfigError, match="seq_len"):
        _source(byte_tok, seq_len=10)


# ----- evaluation ----------------------------------------------------------------------------------


def test_evaluate_end_to_end_without_files(byte_tok, tmp_path):
    model = memlm.build("gpt", vocab_size=256, n_layer=1, n_head=2, d_model=32, context_len=128)
    records = tmp_path / "r.jsonl"
    table = ev.evaluate_babilong(model, byte_tok, "synth-qa1", "0k,1k", n_samples=4,
                                 max_new_tokens=3, records=records)
    assert [r.n_evaluated for r in table.rows] == [4, 4]
    assert all(0 <= r.accuracy <= 100 and sum(r.depth_n) == 4 for r in table.rows)
    assert "saw only the last 118 tokens" in str(table)  # 128 - the answer reserve
    assert len(records.read_text().splitlines()) == 8


def test_score_mode_agrees_with_generation_for_a_perfect_model(byte_tok):
    """A model that always answers correctly must score 100 in both modes."""
    builder = bl.BabilongBuilder(byte_tok, None)
    es = builder.eval_set("synth-qa1", 0, n_samples=6)
    answers = {tuple(s.prompt().tolist()): np.append(s.answer_ids, 0).tolist() for s in es.samples}
    prompt_lengths = sorted({len(k) for k in answers})

    class Oracle(memlm.models.base.MemLM):
        is_stateful = False

        def __init__(self):
            super().__init__(memlm.config.ModelConfig(context_len=4096))
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, targets=None, state=None, trace=False, cache=None):
            logits = torch.zeros(*input_ids.shape, 256)
            for b, row in enumerate(input_ids.tolist()):
                for plen in prompt_lengths:  # find this row's prompt, then emit its answer
                    ans = answers.get(tuple(row[:plen]), []) if plen <= len(row) else []
                    for j, tok in enumerate(ans[: len(row) - plen + 1]):
                        logits[b, plen - 1 + j, tok] = 1.0
            return memlm.models.base.ModelOutput(logits=logits)

    for mode in ("generate", "score"):
        table = ev.evaluate_babilong(Oracle(), byte_tok, "synth-qa1", [0], n_samples=6, mode=mode,
                                     builder=builder)
        assert table.rows[0].accuracy == 100.0, mode


# ----- integration with the trainer and the recurrent models -------------------------------------


def test_preset_trains_through_the_curriculum(tmp_path):
    """The preset's model and curriculum run in the trainer (shrunk to 2 + 2 steps)."""
    from memlm.config import load_run_config
    from memlm.train.trainer import train

    cfg = load_run_config("armt-babilong-tiny").with_overrides({
        "model.d_model": 32, "model.n_head": 2, "model.segment_len": 32,
        "model.context_len": 32, "model.num_mem_tokens": 4, "model.d_mem": 8,
        "train.curriculum": [{"steps": 2, "seq_len": 128}, {"steps": 2, "seq_len": 160}],
        "train.max_steps": 4, "train.batch_size": 2, "train.eval_batches": 1,
        "data.source": "babilong:synth-qa1",
    })
    result = train(cfg, progress=False)
    assert [h["step"] for h in result.history if h.get("kind") == "train"][-1] == 4
    assert result.final["tokens"] > 0  # validation scored answer tokens only
    table = ev.evaluate_babilong(result.model, result.tokenizer, "synth-qa1", "0k", n_samples=2,
                                 max_new_tokens=2)
    assert table.rows[0].n_evaluated == 2 and "segments of 32 tokens" in str(table)


def test_stateful_prefix_reading_matches_the_models_own_generation(byte_tok):
    """Reading the prompt segment by segment then generating equals generating from the
    whole prompt: the evaluator keeps the model's segment boundaries."""
    model = memlm.build("rmt", vocab_size=256, n_layer=1, n_head=2, d_model=32, context_len=16,
                        num_mem_tokens=2)
    prompt = torch.randint(1, 256, (2, 70))
    # C = 64: the context segments end where the question starts, on the model's own grid
    mine = ev._generate(model, prompt, 64, eos=0, max_new_tokens=4)
    theirs = model.generate(prompt, 4)[:, 70:]
    assert torch.equal(mine[:, : theirs.shape[1]], theirs[:, : mine.shape[1]])


def test_memory_reset_control_sees_only_the_question_segment(byte_tok):
    """reset_memory: the answer depends on the question segment alone (the control run)."""
    torch.manual_seed(0)
    model = memlm.build("armt", vocab_size=256, n_layer=1, n_head=2, d_model=32, context_len=16,
                        num_mem_tokens=2, d_mem=8)
    with torch.no_grad():  # a non-zero write path, so memory changes the answer
        for p in model.memory_parameters():
            p.normal_(0, 0.5)
    prompt = torch.randint(1, 256, (2, 70))
    other = prompt.clone()
    other[:, :61] = torch.randint(1, 256, (2, 61))  # a different context, same question
    ans = torch.randint(1, 256, (2, 3))
    a = ev._teacher_forced(model, prompt, 61, ans, reset_memory=True)
    b = ev._teacher_forced(model, other, 61, ans, reset_memory=True)
    assert torch.equal(a, b)
    la = model(torch.cat([prompt[:, 61:], ans[:, :-1]], 1), state=model.init_state(2)).logits
    assert torch.equal(a, la[:, -3:].argmax(-1))
    # with memory carried, the context reaches the answer logits
    with torch.no_grad():
        s1, t1 = ev._consume_prefix(model, prompt, 61)
        s2, t2 = ev._consume_prefix(model, other, 61)
        x = torch.cat([t1, ans[:, :-1]], 1)
        assert not torch.allclose(model(x, state=s1).logits, model(x, state=s2).logits)


# ----- memlm's one protocol: the question starts the final segment ---------------------------

ALL_LENGTHS = ("0k", "1k", "2k", "4k", "8k", "16k", "32k", "64k", "128k", "256k", "512k", "1M")


class _SegmentRecorder:
    """A stand-in stateful model that records the segments the evaluator feeds it."""

    is_stateful = True

    def __init__(self, segment_len: int):
        self.config = type("C", (), {"segment_len": segment_len, "context_len": segment_len})()
        self.seen: list[int] = []

    def init_state(self, batch_size, device=None):
        return None

    def __call__(self, ids, state=None):
        self.seen.append(ids.shape[1])
        return type("O", (), {"state": None})()


@pytest.fixture(scope="module")
def word_tok(babi_dir):
    return make_tokenizer(f"word:512:{babi_dir}")


def test_question_is_in_the_last_segment_for_every_task_and_length(word_tok, babi_dir):
    """Every evaluation prompt of every task at every length 0k..1M: the evaluator's last
    segment is exactly question + marker, every earlier segment is full-length or the
    first one, and no segment is longer than L. Prompts are laid out from their
    metadata (C, question) for every fitting test question, and a recording model runs
    the evaluator's own segmenting code on real prompts where they are cheap to build."""
    builder = bl.BabilongBuilder(word_tok, None, babi_dir=babi_dir)
    L = 128
    for n in range(1, 21):
        task = f"qa{n}"
        questions = builder.questions(task, "test")
        for name in ALL_LENGTHS:
            length = specs.parse_length(name)
            C = bl.context_budget(length)
            fitting = [q for q in questions if C == 0 or builder.fits(q, C, C // 8)]
            assert fitting, (task, name)
            tails = {len(builder.question_ids(q)) + len(builder.marker_ids) for q in fitting}
            for q in fitting[:: max(1, len(fitting) // 50)]:
                c = C if C else sum(len(f) for f in builder.fact_ids(q))
                for tail in tails:
                    bounds = bl.prompt_segments(c, c + tail, L)
                    assert bounds[-1] == (c, c + tail)
                    assert all(b - a == L for a, b in bounds[1:-1])
                    assert all(0 < b - a <= L for a, b in bounds)
                    assert bounds[0][0] == 0 and all(
                        x[1] == y[0] for x, y in zip(bounds, bounds[1:]))
            if length <= 4000:  # real prompts through the evaluator's code
                es = builder.eval_set(task, length, n_samples=3)
                for s in es.samples:
                    prompt = torch.from_numpy(s.prompt().astype(np.int64))[None]
                    rec = _SegmentRecorder(L)
                    _, tail = ev._consume_prefix(rec, prompt, len(s.context))
                    q = np.concatenate([s.question_ids, s.marker_ids])
                    assert tail[0].numpy().tolist() == q.tolist()
                    assert sum(rec.seen) == len(s.context)


def test_a_one_million_token_prompt_keeps_the_question_in_its_last_segment(word_tok, babi_dir):
    builder = bl.BabilongBuilder(word_tok, None, babi_dir=babi_dir)
    s = builder.eval_set("qa1", "1M", n_samples=1).samples[0]
    assert len(s.context) == 1_000_000 - 300
    prompt = torch.from_numpy(s.prompt().astype(np.int64))[None]
    rec = _SegmentRecorder(128)
    _, tail = ev._consume_prefix(rec, prompt, len(s.context))
    assert tail[0].numpy().tolist() == np.concatenate([s.question_ids, s.marker_ids]).tolist()
    assert max(rec.seen) == 128 and sum(rec.seen) == len(s.context)


def test_training_rows_put_the_question_where_evaluation_does(word_tok, babi_dir):
    """segment=L: in an n-segment training row the question starts at (n-1)L, i.e. it
    starts the last segment, and every fact lies in the earlier segments."""
    L = 64
    for n_seg in (2, 3, 5):
        src = DATASETS.get("babilong")(f"babilong:qa1:segment={L}:babi={babi_dir}",
                                       tokenizer=word_tok, batch_size=4, seq_len=n_seg * L,
                                       seed=0, split="train")
        assert src.C == (n_seg - 1) * L
        batch = src.next_batch()
        for r in range(4):
            s = src.sample_at(r)
            q = np.concatenate([s.question_ids, s.marker_ids])
            row = batch.input_ids[r].numpy()
            assert row[src.C: src.C + len(q)].tolist() == q.tolist()
            assert max(s.fact_offsets) < (n_seg - 1) * L
            # evaluation cuts the same prompt at the same place
            assert bl.prompt_segments(src.C, src.C + len(q), L)[-1][0] == (n_seg - 1) * L
    with pytest.raises(ConfigError, match="at least two segments"):
        DATASETS.get("babilong")(f"babilong:qa1:segment={L}:babi={babi_dir}", tokenizer=word_tok,
                                 batch_size=2, seq_len=L, seed=0, split="train")


def test_dense_window_reveals_nothing_about_the_answer(byte_tok):
    """The pilot's leak: cutting a row's last N tokens lets the window start encode the
    answer's length. The window is now anchored at the prompt's end: two samples with
    the same prompt and answers of different lengths give the same visible prompt."""
    ids = torch.arange(1, 301)[None].repeat(2, 1)
    att = torch.zeros(2, 300, dtype=torch.bool)
    tm = torch.zeros(2, 300, dtype=torch.bool)
    att[0, :203], tm[0, 200:203] = True, True  # prompt 200 tokens, answer 2 + eos
    att[1, :207], tm[1, 200:207] = True, True  # same prompt, answer 6 + eos
    batch = bl.FinetuneBatch(ids, att, tm, 0).to_batch(window=128, length=128)
    keep = 128 - bl.ANSWER_RESERVE
    for r in range(2):
        assert batch.input_ids[r, :keep].tolist() == list(range(201 - keep, 201))
    assert (batch.targets[:, : keep - 1] == IGNORE_INDEX).all()
    # the evaluator shows a dense model the same last prompt tokens
    assert bl.dense_view(200, 128) == 200 - keep
    with pytest.raises(DataError, match="answer reserve"):
        bl.FinetuneBatch(ids, att | True, tm | True, 0).to_batch(window=128)


def test_word_tokenizer_round_trip_and_buckets(word_tok, tmp_path):
    from memlm.data.tokenizers import load_tokenizer

    text = "Mary journeyed to the bathroom. Where is Mary? GEN bathroom"
    ids = word_tok.encode(" " + text)
    assert len(ids) == 12 and word_tok.decode(ids) == text
    assert word_tok.encode("bathroom") == word_tok.encode(" bathroom")  # one id, no space variant
    odd = word_tok.encode("Zanzibar quixotically")  # not bAbI, not filler: hashed buckets
    assert all(i >= word_tok.vocab_size - 512 for i in odd)
    assert word_tok.decode(word_tok.encode("football,apple")) == "football, apple"
    assert ev.exact_match(word_tok.decode(word_tok.encode("football,apple")), "football,apple")
    word_tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.encode(text) == word_tok.encode(text) and again.vocab_size == word_tok.vocab_size
    # every qa1-qa5 test answer is a known word (the model can produce it)
    for n in range(1, 6):
        for q in babi_mod.load_task(f"qa{n}", "test"):
            assert all(i < word_tok.vocab_size - 512 for i in word_tok.encode(q.answer))


def test_facts_per_segment_grows_stories_with_the_segment_curriculum(word_tok, babi_dir):
    spec = f"babilong:qa1:segment=128:facts_per_segment=5:babi={babi_dir}"
    for n_seg, most, longest in ((2, 5, 4), (3, 10, 10)):  # qa1 stories grow 2 facts a time
        src = DATASETS.get("babilong")(spec, tokenizer=word_tok, batch_size=8,
                                       seq_len=128 * n_seg, seed=0, split="train")
        counts = [len(src._questions["qa1"][i].facts) for i in src._eligible["qa1", src.C]]
        assert max(counts) == longest
        assert all(len(src.sample_at(p).babi.facts) <= most for p in range(16))
    with pytest.raises(ConfigError, match="needs segment"):
        DATASETS.get("babilong")(f"babilong:qa1:facts_per_segment=5:babi={babi_dir}",
                                 tokenizer=word_tok, batch_size=2, seq_len=256, seed=0,
                                 split="train")


def test_next_batch_with_samples_hands_out_the_rows_samples_and_the_same_batch(word_tok,
                                                                              babi_dir):
    """The samples a batch was built from come with it, row by row, and the batch is the
    one next_batch gives: the split scripts read facts from them instead of rebuilding."""
    spec = f"babilong:qa1:segment=64:facts_per_segment=5:min_segments=2:babi={babi_dir}"

    def make():
        return DATASETS.get("babilong")(spec, tokenizer=word_tok, batch_size=8, seq_len=256,
                                        seed=5, split="val")

    paired, plain = make(), make()
    for step in range(2):
        batch, samples = paired.next_batch_with_samples()
        assert torch.equal(batch.input_ids, plain.next_batch().input_ids)
        assert len(samples) == 8
        for r, s in enumerate(samples):
            want = plain.sample_at(step * 8 + r)
            assert s.C == want.C and s.babi == want.babi
            assert np.array_equal(s.context, want.context)


def test_min_segments_rows_draw_their_own_segment_count_and_keep_the_protocol(word_tok,
                                                                                babi_dir):
    """min_segments=M: every row draws its number of L-token segments from M..seq_len/L
    (a seeded function of the row), its question still starts its own last segment, the
    row is right-padded to seq_len, and facts_per_segment limits each row by its own
    count. Without the option every row has the full length, as before."""
    L = 64
    base = f"babilong:qa1:segment={L}:facts_per_segment=5:babi={babi_dir}"

    def make(spec, split="train"):
        return DATASETS.get("babilong")(spec, tokenizer=word_tok, batch_size=32,
                                        seq_len=4 * L, seed=3, split=split)

    plain, mixed = make(base), make(base + ":min_segments=2")
    assert plain.budgets == [3 * L] and mixed.budgets == [3 * L, 2 * L, L]
    assert {plain.sample_at(p).C for p in range(64)} == {3 * L}
    counts = {}
    for p in range(96):
        s = mixed.sample_at(p)
        n = s.C // L + 1  # context segments + the question's
        counts[n] = counts.get(n, 0) + 1
        assert s.C % L == 0 and len(s.babi.facts) + 1 <= 5 * (n - 1) + 1
        facts = mixed.builder.fact_ids(s.babi)
        assert all(off + len(f) <= s.C for off, f in zip(s.fact_offsets, facts))
    assert set(counts) == {2, 3, 4} and min(counts.values()) >= 20  # about uniform
    # the batch: every row padded to seq_len, the answer right after its own question
    batch = mixed.next_batch()
    assert batch.input_ids.shape == (32, 4 * L)
    for r in range(32):
        s = mixed.sample_at(r)
        scored = (batch.targets[r] != IGNORE_INDEX).nonzero()[:, 0]
        assert s.C <= int(scored[0]) < s.C + L  # inside the row's own last segment
    # a pure function of (seed, row): rebuilt, and on the validation split too
    again = make(base + ":min_segments=2")
    assert [again.sample_at(p).C for p in range(32)] == [mixed.sample_at(p).C for p in range(32)]
    assert len({make(base + ":min_segments=2", "val").sample_at(p).C for p in range(32)}) > 1
    assert make(base + ":min_segments=4").budgets == [3 * L]
    for bad, what in ((":min_segments=1", "must be in 2..4"), (":min_segments=5", "2..4")):
        with pytest.raises(ConfigError, match=what):
            make(base + bad)
    with pytest.raises(ConfigError, match="needs segment"):
        make(f"babilong:qa1:min_segments=2:babi={babi_dir}")
    with pytest.raises(ConfigError, match="whole segments"):
        DATASETS.get("babilong")(base + ":min_segments=2", tokenizer=word_tok, batch_size=2,
                                 seq_len=4 * L + 10, seed=0, split="train")


def test_facts_last_rows_put_the_facts_in_one_block_before_the_question(word_tok, babi_dir):
    """facts_last=P: about a share P of training rows (a pure function of seed and row)
    hold every fact in one unbroken block ending where the question segment starts,
    with background before it; the other rows are unchanged."""
    base = f"babilong:qa1:segment=64:babi={babi_dir}"
    make = functools.partial(DATASETS.get("babilong"), tokenizer=word_tok, batch_size=8,
                             seq_len=192, seed=0, split="train")
    plain, mixed = make(base), make(base + ":facts_last=0.5")
    n_last = 0
    for p in range(64):
        a, b = plain.sample_at(p), mixed.sample_at(p)
        assert a.babi.sample_index == b.babi.sample_index and len(b.context) == 128
        facts = np.concatenate([np.asarray(word_tok.encode(" " + f)) for f in b.babi.facts])
        if np.array_equal(b.context[-len(facts):], facts):
            n_last += 1
            assert b.fact_offsets[0] == 128 - len(facts)
        else:
            assert np.array_equal(a.context, b.context)
    assert 16 <= n_last <= 48
    again = make(base + ":facts_last=0.5")
    assert all(np.array_equal(again.sample_at(p).context, mixed.sample_at(p).context)
               for p in range(8))
    with pytest.raises(ConfigError, match="facts_last"):
        make(base + ":facts_last=1.5")


def test_last_support_keep_thins_only_training_questions_answered_by_the_last_statement(
        word_tok, babi_dir):
    """last_support_keep=P: a training question whose support is the story's last
    statement stays with probability P (seeded per question); the others all stay, and
    validation rows are never thinned."""
    base = f"babilong:qa1:segment=64:babi={babi_dir}"

    def make(spec, split="train", seed=0):
        return DATASETS.get("babilong")(spec, tokenizer=word_tok, batch_size=8, seq_len=128,
                                        seed=seed, split=split)

    def split(src):
        qs = src._questions["qa1"]
        last = {int(i) for i in src._eligible["qa1", src.C]
                if max(qs[int(i)].support) == len(qs[int(i)].facts) - 1}
        return last, {int(i) for i in src._eligible["qa1", src.C]} - last

    (last, rest), (kept, rest_k) = split(make(base)), split(make(base + ":last_support_keep=0.25"))
    assert rest_k == rest and kept < last and 0.15 < len(kept) / len(last) < 0.35
    assert split(make(base + ":last_support_keep=0.25"))[0] == kept  # a pure function of seed
    assert split(make(base + ":last_support_keep=0.25", seed=1))[0] != kept
    assert split(make(base + ":last_support_keep=0.25", "val")) == split(make(base, "val"))
    rows = [make(base + ":last_support_keep=0").sample_at(p) for p in range(32)]
    assert all(r.statements_after_support > 0 for r in rows)
    with pytest.raises(ConfigError, match="last_support_keep"):
        make(base + ":last_support_keep=2")


def test_benchmark_pools_the_recency_split_over_lengths_and_skips_old_rows():
    from tests.conftest import load_script

    bench = load_script("benchmarks/babilong.py")
    tables = {
        "armt:0|armt|filler": {"rows": [
            {"recency_n": [10, 5, 5], "recency_correct": [9, 1, 0]},
            {"recency_n": [10, 0, 5], "recency_correct": [10, 0, 1]}]},
        "old:0|gpt|filler": {"rows": [{"depth_n": [1] * 10}]},  # written before the split
    }
    text, out = bench.recency(tables)
    assert out == {"armt:0|armt|filler": {"n": [20, 5, 10], "correct": [19, 1, 1]}}
    assert "95% of 20 | 20% of 5 | 10% of 10" in text and "old" not in text


def test_benchmark_refuses_a_bad_eval_run_in_one_line_before_evaluating(tmp_path, capsys):
    from tests.conftest import load_script

    bench = load_script("benchmarks/babilong.py")
    missing = tmp_path / "no-such-run"
    assert bench.cli(["--eval-only", f"rmt:0={missing}", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("babilong.py: error:") and "no-such-run" in err
    assert "\n" not in err and "Traceback" not in err
    assert bench.cli(["--eval-only", "rmt:x=runs/a"]) == 2
    assert "ARCH:SEED=RUN" in capsys.readouterr().err


def test_story_documents_answer_every_question_in_place():
    # one document per story: its statements once, in order, each question answered where
    # it was asked, in BABILong's prompt form (a corpus joins the stories with end-of-text)
    docs = babi_mod.story_documents(["synth-qa1"], "train")
    items = babi_mod.split_train(babi_mod.load_task("synth-qa1", "train"), "train")
    assert len(docs) == items[-1].story_index + 1
    first = [q for q in items if q.story_index == 0]
    expected = " ".join(" ".join(q.facts[len(p.facts) if p else 0:])
                        + f" {q.question}{bl.MARKER} {q.answer}."
                        for p, q in zip((None, *first), first))
    assert docs[0] == expected
    assert docs[0].count(bl.MARKER) == len(first)


def test_babi_stories_source_never_holds_a_babilong_val_story():
    from memlm.data.corpus import parse_babi_source, read_documents

    assert parse_babi_source("babi:qa1,qa2:dir=/x") == (["qa1", "qa2"], "/x", 0)
    assert parse_babi_source("babi:qa1:permute=3") == (["qa1"], None, 3)
    for bad in ("babi:", "babi:dir=/x", "babi:qa1:depth=3", "babi:qa1:permute=-1"):
        with pytest.raises((ConfigError, DataError), match="babi"):
            parse_babi_source(bad)
    items = babi_mod.load_task("synth-qa1", "train")
    train_items = babi_mod.split_train(items, "train")
    val_items = babi_mod.split_train(items, "val")
    assert len(train_items) + len(val_items) == len(items) and val_items
    assert max(q.story_index for q in train_items) < min(q.story_index for q in val_items)
    assert read_documents("babi:synth-qa1") == babi_mod.story_documents(["synth-qa1"], "train")


def test_rmt_recipe_starts_from_the_backbone_stage_and_trains(tmp_path):
    """gpt-babi-qa1 then rmt-babilong-qa1 (init_from the backbone), each cut to a few steps,
    on the synthetic stand-in; the benchmark points the preset at its own backbone run."""
    from memlm.config import load_run_config
    from memlm.train.trainer import Trainer, train
    from tests.conftest import load_script

    bench = load_script("benchmarks/babilong.py")
    backbone_cfg = bench.preset_config("backbone", 0, babi=None).with_overrides(
        {"train.max_steps": 2, "train.batch_size": 2, "train.eval_batches": 1})
    assert backbone_cfg.data.source == "babi:synth-qa1"
    train(backbone_cfg, tmp_path / "backbone", progress=False)
    rmt = bench.preset_config("rmt", 1, babi=None, backbone=tmp_path / "backbone")
    assert rmt.train.init_from == str(tmp_path / "backbone") and rmt.train.seed == 1
    assert rmt.data.source.startswith("babilong:synth-qa1:segment=64")
    assert load_run_config("rmt-babilong-qa1").train.init_from == "runs/gpt-babi-qa1"
    rmt = rmt.with_overrides({
        "train.curriculum": [{"steps": 2, "seq_len": 128}, {"steps": 1, "seq_len": 192}],
        "train.max_steps": 3, "train.batch_size": 2, "train.eval_batches": 1})
    trainer = Trainer(rmt, None, progress=False)
    gpt = memlm.load(tmp_path / "backbone")
    qkv = "decoder.blocks.0.attn.qkv.weight"
    assert torch.equal(trainer.model.state_dict()[f"backbone.model.{qkv}"],
                       gpt.state_dict()[qkv])
    result = trainer.fit()
    assert [h["step"] for h in result.history if h.get("kind") == "train"][-1] == 3


def test_shortcut_split_scores_every_val_row_by_its_support(tmp_path):
    from memlm.train.trainer import train
    from tests.conftest import load_script

    bench = load_script("benchmarks/babilong_shortcut.py")
    cfg = memlm.config.load_run_config("gpt-babilong-qa1").with_overrides({
        "train.init_from": None, "train.curriculum": [{"steps": 2, "seq_len": 128}],
        "train.max_steps": 2, "train.batch_size": 2, "train.eval_batches": 1,
        "data.source": "babilong:synth-qa1:segment=64:window=64"})
    train(cfg, tmp_path / "gpt", progress=False)
    out = bench.shortcut_split(tmp_path / "gpt", seq_len=128, rows=64)
    # synth-qa1 always has a support: every row is counted, in one of the three columns
    assert sum(out["n"]) == 64 and all(0 <= c <= k for c, k in zip(out["correct"], out["n"]))
    assert out["n"][0] > 0 and out["n"][1] + out["n"][2] > 0
    # every miss is attributed to exactly one source
    assert [sum(m.values()) for m in out["misses"]] == [
        k - c for k, c in zip(out["n"], out["correct"])]


def test_shortcut_miss_source_names_the_statement_a_wrong_answer_came_from():
    from tests.conftest import load_script

    source = load_script("benchmarks/babilong_shortcut.py").miss_source
    facts = ("Mary went to the kitchen.", "John moved to the garden.",
             "Mary journeyed to the office.", "Sandra went to the hallway.")
    question = "Where is Mary?"
    assert source(facts, question, "hallway") == "last, other person"
    assert source(facts, question, "office") == "2nd last, same person"
    assert source(facts, question, "garden") == "earlier, other person"
    assert source(facts, question, "kitchen") == "earlier, same person"
    assert source(facts, question, "bedroom") == "not in the story"


def test_shortcut_split_measures_every_row_at_the_asked_length(tmp_path, monkeypatch):
    """A run trained with min_segments drew rows of several lengths; its split at
    --seq-len 192 must score 3-segment rows only."""
    from memlm.train.trainer import train
    from tests.conftest import load_script

    bench = load_script("benchmarks/babilong_shortcut.py")
    cfg = memlm.config.load_run_config("rmt-babilong-qa1").with_overrides({
        "train.init_from": None, "train.curriculum": [{"steps": 1, "seq_len": 192}],
        "train.max_steps": 1, "train.batch_size": 2, "train.eval_batches": 1,
        "data.source": "babilong:synth-qa1:segment=64:min_segments=2"})
    train(cfg, tmp_path / "rmt", progress=False)
    built = []

    def recording(*args, **kwargs):
        built.append(bench_source(*args, **kwargs))
        return built[-1]

    bench_source = bench.babilong_source
    monkeypatch.setattr(bench, "babilong_source", recording)
    bench.shortcut_split(tmp_path / "rmt", seq_len=192, rows=64)
    assert built[0].budgets == [128] and {built[0].sample_at(p).C for p in range(64)} == {128}


def test_permuted_stories_rename_people_and_rooms_and_keep_every_answer_right(babi_dir):
    """`babi:qa1:permute=K`: K renamed copies per story; each answer is still the asked
    person's latest room in the copy (the rename is a consistent permutation)."""
    import re

    from memlm.data.corpus import read_documents

    plain = read_documents(f"babi:qa1:dir={babi_dir}")
    docs = read_documents(f"babi:qa1:dir={babi_dir}:permute=2")
    assert len(docs) == 3 * len(plain) and docs[::3] == plain
    persons = babi_mod.story_persons(babi_mod.questions("qa1", "train", babi_dir))
    assert persons == ["Daniel", "John", "Mary", "Sandra"]
    changed = answers = 0
    for doc in docs[:300]:
        where: dict[str, str] = {}
        for sentence in re.findall(r"[^.?]+[.?](?:GEN [a-z]+\.)?", doc):
            sentence = sentence.strip()
            asked = re.match(r"Where is (\w+)\?GEN (\w+)\.", sentence)
            if asked:
                assert where[asked.group(1)] == asked.group(2), sentence
                answers += 1
            else:
                words = sentence.rstrip(".").split()
                where[words[0]] = words[-1]
        changed += doc not in plain
    assert answers == sum(doc.count("GEN") for doc in docs[:300])  # every answer checked
    assert changed > 150  # the copies differ from the stories they came from
    assert read_documents(f"babi:qa1:dir={babi_dir}:permute=2") == docs  # seeded


# ----- carry=P: memory handed from row to row ------------------------------------------------

CARRY_SPEC = "babilong:synth-qa1:segment=64:min_segments=3"


def _carry_source(tok, spec=CARRY_SPEC, batch_size=8, seq_len=384):
    return DATASETS.get("babilong")(spec, tokenizer=tok, batch_size=batch_size, seq_len=seq_len,
                                    seed=3, split="train")


def test_carry_marks_a_seeded_share_of_rows_fresh_and_masks_the_padding(byte_tok):
    """carry=P: about 1 - P of the rows start from a fresh memory, the same rows for the
    same seed; the batch marks exactly the real input tokens (the answer's targets inside
    them), so padding segments can leave a carried memory alone. Without carry every row
    is fresh and the batch has no mask, as before."""
    plain = _carry_source(byte_tok).next_batch()
    assert plain.attention_mask is None and bool(plain.new_stream.all())
    fresh = []
    for _ in range(2):
        src = _carry_source(byte_tok, CARRY_SPEC + ":carry=0.75", batch_size=8)
        rows = [src.next_batch_with_samples() for _ in range(25)]
        fresh.append(torch.cat([b.new_stream for b, _ in rows]))
    assert torch.equal(fresh[0], fresh[1])
    assert 0.12 < fresh[0].float().mean() < 0.38  # 200 draws at 0.25
    for batch, samples in rows:
        assert batch.attention_mask.shape == batch.input_ids.shape
        for r, s in enumerate(samples):
            n = len(s.sequence(src.builder.eos)) - 1  # the row's real inputs
            assert batch.attention_mask[r, :n].all() and not batch.attention_mask[r, n:].any()
            scored = (batch.targets[r] != IGNORE_INDEX).nonzero()[:, 0]
            assert int(scored.max()) == n - 1
    # padding of 2 or more whole segments occurs (rows of 3..6 segments of 64 bytes)
    short = [int(b.attention_mask[r].sum()) for b, _ in rows for r in range(8)]
    assert min(short) < 384 - 128


@pytest.mark.parametrize("spec, what", [
    ("babilong:synth-qa1:segment=64:carry=1", "in \\[0, 1\\)"),
    ("babilong:synth-qa1:carry=0.5", "needs segment=L"),
    ("babilong:synth-qa1:segment=64:window=128:carry=0.5", "no window"),
])
def test_carry_refuses_what_has_no_memory_to_carry(byte_tok, spec, what):
    with pytest.raises(ConfigError, match=what):
        _carry_source(byte_tok, spec)


def _carry_config(arch: str, carry: float = 0.5, extra: str = ""):
    from memlm.config import load_run_config

    model = ({"model.d_model": 32, "model.n_head": 2, "model.segment_len": 64,
              "model.context_len": 64, "model.num_mem_tokens": 4, "model.d_mem": 8}
             if arch == "armt" else {"model.context_len": 384})
    return load_run_config("armt-babilong-tiny" if arch == "armt" else "gpt-tiny"
                           ).with_overrides({
        **model, "train.curriculum": [], "train.max_steps": 3, "train.batch_size": 4,
        "train.eval_batches": 1, "train.seed": 5, "data.tokenizer": "byte",
        "data.source": f"{CARRY_SPEC}:carry={carry}{extra}", "data.seq_len": 384,
    })


def _rows(state, r: int):
    """Row r of an ARMT state, as a batch of one."""
    return type(state)(tuple(type(m)(*(x[r:r + 1] for x in m)) for m in state.layers))


def test_trainer_carries_memory_into_the_next_step_and_padding_writes_nothing():
    """With carry=P the trainer hands each row's memory to the same row of the next step
    (a zero memory where the source says fresh) and passes the padding mask, so a row's
    state after a step is its state after its real segments: padding writes nothing."""
    from memlm.train.trainer import Trainer

    trainer = Trainer(_carry_config("armt", carry=0.5), None, progress=False)
    seen = []
    forward = trainer.forward_model

    def spy(ids, targets=None, state=None, **kw):
        out = forward(ids, targets=targets, state=state, **kw)
        mask, rows = kw.get("attention_mask"), []
        with torch.no_grad():  # each row alone, cut after its last segment with text, with
            for r in range(4):  # the weights of this forward (before the optimizer step)
                cut = -(-int(mask[r].sum()) // 64) * 64
                rows.append(trainer.model(ids[r:r + 1, :cut], attention_mask=mask[r:r + 1, :cut],
                                          state=_rows(state, r)).state)
        seen.append((ids, state, mask, out.state, rows))
        return out

    trainer.forward_model = spy
    for _ in range(3):
        trainer.train_step()
    src = trainer.data.make_train(384, 4)
    fresh = [src.next_batch().new_stream for _ in range(3)]
    assert 0 < int(torch.cat(fresh[1:]).sum()) < 8  # seed 5: both kinds of rows occur
    for k in (1, 2):
        state_in, prev = seen[k][1], seen[k - 1][3]
        for r in range(4):
            a_in = state_in.layers[0].A[r]
            if bool(fresh[k][r]):
                assert not a_in.any()
            else:
                assert a_in.any() and torch.equal(a_in, prev.layers[0].A[r].detach())
    _, _, mask, state_out, rows = seen[-1]
    assert mask is not None and bool((~mask).any())  # some padding in the last batch
    for r, alone in enumerate(rows):
        for got, want in zip(alone.layers, state_out.layers):
            scale = float(want.A[r].abs().max()) + 1e-12
            assert torch.allclose(got.A[0], want.A[r], rtol=1e-4, atol=1e-5 * scale)
            assert torch.allclose(got.z[0], want.z[r], rtol=1e-4, atol=1e-6)


def test_carry_with_a_dense_model_is_refused_in_one_line():
    from memlm.train.trainer import Trainer

    trainer = Trainer(_carry_config("gpt"), None, progress=False)
    with pytest.raises(ConfigError, match="but gpt has no memory; drop them"):
        trainer.train_step()


def test_prefix_rows_come_with_seeded_background_and_no_padding_mask(byte_tok):
    """prefix=K: every row brings K segments of background, a seeded function of the row
    (the same for the same seed, different between rows); the row's own memory is not
    carried, so no padding mask is needed. Without the option there is no prefix."""
    assert _carry_source(byte_tok).next_batch().prefix is None
    spec = CARRY_SPEC + ":carry=0.5:prefix=2"
    a, b = _carry_source(byte_tok, spec).next_batch(), _carry_source(byte_tok, spec).next_batch()
    assert a.prefix.shape == (8, 2 * 64) and torch.equal(a.prefix, b.prefix)
    assert len({tuple(r) for r in a.prefix.tolist()}) == 8
    assert a.attention_mask is None and torch.equal(a.new_stream, b.new_stream)
    for row in a.prefix.tolist():  # background only: no question, no answer marker
        text = byte_tok.decode(row)
        assert "?" not in text and bl.MARKER not in text
    with pytest.raises(ConfigError, match="prefix=K .* needs segment=L"):
        _carry_source(byte_tok, "babilong:synth-qa1:prefix=2")


def test_trainer_reads_the_prefix_without_gradient_and_carries_only_the_background():
    """With prefix=K the row starts from the memory after this step's background, read
    without gradient from the previous step's background memory (fresh where the source
    says so); that background memory, never the state after the row's facts and
    question, is what the next step continues."""
    from memlm.train.trainer import Trainer

    trainer = Trainer(_carry_config("armt", carry=0.5, extra=":prefix=2"), None, progress=False)
    seen = []
    forward = trainer.forward_model

    def spy(ids, targets=None, state=None, **kw):
        out = forward(ids, targets=targets, state=state, **kw)
        seen.append((state, out.state))
        return out

    trainer.forward_model = spy
    src = trainer.data.make_train(384, 4)
    batches = [src.next_batch() for _ in range(3)]
    before = None
    for k in range(3):
        start = (trainer.model.init_state(4) if before is None
                 else trainer.model.reset_state_rows(before, batches[k].new_stream))
        with torch.no_grad():  # with the weights this step starts from
            want = trainer.model(batches[k].prefix, state=start).state
        trainer.train_step()
        state_in, state_out = seen[k]
        assert not any(m.A.requires_grad for m in state_in.layers)
        for got, ref in zip(state_in.layers, want.layers):
            assert torch.allclose(got.A, ref.A, atol=1e-5) and torch.allclose(got.z, ref.z)
        assert trainer.prefix_state is state_in  # carried: the background memory ...
        assert not torch.equal(state_out.layers[0].z, state_in.layers[0].z)  # ... not this
        before = trainer.prefix_state


def test_empty_rows_start_from_an_empty_memory_while_their_stream_goes_on():
    """empty=F with prefix=K: a seeded share of rows start from the empty memory (as
    short prompts do); the background stream of their batch row is read and carried all
    the same, so the next step continues it."""
    from memlm.train.trainer import Trainer

    cfg = _carry_config("armt", carry=0.9, extra=":prefix=2:empty=0.5")
    trainer = Trainer(cfg, None, progress=False)
    seen = []
    forward = trainer.forward_model
    trainer.forward_model = lambda ids, targets=None, state=None, **kw: (
        seen.append(state) or forward(ids, targets=targets, state=state, **kw))
    src = trainer.data.make_train(384, 4)
    batches = [src.next_batch() for _ in range(3)]
    empty = torch.stack([b.empty_rows for b in batches])
    assert 0 < int(empty.sum()) < empty.numel()  # seed 5: both kinds occur
    for k in range(3):
        trainer.train_step()
        for r in range(4):
            z_row, z_stream = seen[k].layers[0].z[r], trainer.prefix_state.layers[0].z[r]
            assert z_stream.any()  # the stream read its background either way
            if bool(empty[k, r]):
                assert not z_row.any() and not seen[k].layers[0].A[r].any()
            else:
                assert torch.equal(z_row, z_stream)
    with pytest.raises(ConfigError, match="needs prefix=K"):
        _carry_source(make_tokenizer("byte"), CARRY_SPEC + ":empty=0.2")


PREFIX_KILLER = """
import os, signal, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {root!r})
from tests.test_babilong import _carry_config
from memlm.train.trainer import train

def kill_after(record):
    if record.get("kind") == "train" and record["step"] == 3:
        os.kill(os.getpid(), signal.SIGKILL)

cfg = _carry_config("armt", carry=0.5, extra=":prefix=2").with_overrides(
    {{"train.max_steps": 4, "train.save_every": 2, "train.log_every": 1}})
train(cfg, {out!r}, progress=False, callbacks=(kill_after,))
"""


def test_a_prefix_run_killed_and_resumed_ends_with_the_same_weights(tmp_path):
    """The background memory is part of the checkpoint: a run killed after step 3 and
    resumed from step 2 ends bit-identical to one that never stopped."""
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    from memlm.train.trainer import train

    cfg = _carry_config("armt", carry=0.5, extra=":prefix=2").with_overrides(
        {"train.max_steps": 4, "train.save_every": 2, "train.log_every": 1})
    torch.set_num_threads(1)
    train(cfg, tmp_path / "ref", progress=False)
    root = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, "-c", PREFIX_KILLER.format(
        root=root, out=str(tmp_path / "crashed"))], capture_output=True, text=True, cwd=root)
    assert proc.returncode == -9, proc.stderr
    train(cfg, tmp_path / "crashed", resume=True, progress=False)

    def final(run):
        latest = (run / "LATEST").read_text().strip()
        return load_file(str(run / "checkpoints" / latest / "model.safetensors"))

    a, b = final(tmp_path / "ref"), final(tmp_path / "crashed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_curriculum_stage_adds_its_own_source_options():
    """source_options on one stage: that stage's rows bring a prefix, the stage before's
    do not; a bad option in a later stage fails when the trainer is built (before any
    step), and source_options on a text source is refused in one line."""
    from memlm.train.trainer import Trainer

    stages = [{"steps": 1, "seq_len": 384}, {"steps": 1, "seq_len": 384,
                                             "source_options": "carry=0.5:prefix=2"}]
    cfg = _carry_config("armt", carry=0.5).with_overrides({
        "data.source": CARRY_SPEC, "train.curriculum": stages, "train.max_steps": 2})
    assert cfg.train.curriculum[1].source_options == ":carry=0.5:prefix=2"
    trainer = Trainer(cfg, None, progress=False)
    assert trainer.source.next_batch().prefix is None
    trainer.train_step()
    trainer.train_step()
    assert trainer.source.next_batch().prefix.shape == (4, 128)
    assert trainer.prefix_state is not None
    bad = cfg.with_overrides({"train.curriculum": [stages[0], {**stages[1],
                                                                 "source_options": ":prefx=2"}]})
    with pytest.raises(ConfigError, match="prefx"):
        Trainer(bad, None, progress=False)
    with pytest.raises(ConfigError, match="key=value"):
        cfg.with_overrides({"train.curriculum": [{"steps": 1, "source_options": "prefix"}]})


def test_armt_qa1_preset_runs_all_six_stages_and_its_last_reads_aged_memories(tmp_path):
    """The preset's curriculum, one step per stage on tiny rows: every stage runs with
    stage_handover best, and only the last stage's rows come with a filler prefix."""
    from memlm.config import load_run_config
    from memlm.train.trainer import Trainer

    preset = load_run_config("armt-babilong-qa1")
    assert preset.train.stage_handover == "best"
    stages = [{"steps": 1, "seq_len": 64 + 32 * i, "batch_size": 2, "lr": st.lr,
               "source_options": st.source_options}
              for i, st in enumerate(preset.train.curriculum)]
    assert [bool(s["source_options"]) for s in stages] == [False] * 5 + [True]
    cfg = preset.with_overrides({
        "train.init_from": None, "train.curriculum": stages, "train.max_steps": 6,
        "train.eval_batches": 1, "train.eval_every": 1, "train.save_every": 6,
        "model.n_layer": 1, "data.source": "babilong:synth-qa1:segment=32:min_segments=2"})
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    prefixes = []
    for _ in range(6):
        trainer.train_step()
        prefixes.append(trainer.prefix_state is not None)
        trainer.evaluate()
    assert prefixes == [False] * 5 + [True]
