"""`data.score: answers`: only the answers of generated recall text are targets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from memlm.cli import main
from memlm.config import DataConfig
from memlm.data.batches import RandomEpisodes, RandomWindows, StreamRows
from memlm.data.corpus import prepare_data
from memlm.data.synthetic import builtin_answers
from memlm.errors import ConfigError, DataError
from memlm.eval.perplexity import evaluate
from memlm.nn.loss import lm_loss
from memlm.registry import build
from memlm.types import IGNORE_INDEX

SOURCE = "builtin:recall:chars=4000,gap=40-80,near=0.5,open=1,digits=1,facts=1.0"


def _data(tmp_path, tokenizer="bpe:300", **kw):
    cfg = DataConfig(source=SOURCE, tokenizer=tokenizer, score="answers",
                     cache_dir=str(tmp_path / "cache"), **kw)
    return prepare_data(cfg, seed=3, progress=False)


@pytest.mark.parametrize("tokenizer", ["byte", "bpe:300"])
def test_the_mask_marks_exactly_the_answer_tokens(tmp_path, tokenizer):
    data = _data(tmp_path, tokenizer)
    text, spans = builtin_answers(SOURCE[len("builtin:"):], seed=3)
    tokens = np.concatenate([data.train, data.val])
    mask = np.concatenate([data.train_scored, data.val_scored])
    assert len(data.train_scored) == len(data.train) and len(data.val_scored) == len(data.val)
    # the marked tokens, run by run, decode to the answers (a token may carry the space
    # before the value), in order and none missing
    runs, current = [], []
    for tok, keep in zip(tokens.tolist(), mask.tolist()):
        if keep:
            current.append(tok)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    decoded = [data.tokenizer.decode(r).strip() for r in runs]
    assert decoded == [s.answer for s in spans]
    assert len(spans) > 20


def test_batches_keep_only_the_marked_targets():
    tokens = np.arange(100, dtype=np.int64)  # token value = its position
    scored = np.zeros(100, dtype=bool)
    scored[[5, 17, 18, 40, 77]] = True
    sources = [RandomWindows(tokens, 4, 10, seed=1, scored=scored),
               RandomEpisodes(tokens, 4, 10, segments=3, seed=1, scored=scored),
               StreamRows(tokens, 4, 10, seed=1, scored=scored)]
    for source in sources:
        for _ in range(6):
            b = source.next_batch()
            kept = b.targets != IGNORE_INDEX
            # every kept target is a marked token, with its own value; and a batch that
            # holds a marked token as a target keeps it
            for r in range(b.input_ids.shape[0]):
                for t, x in enumerate(b.input_ids[r].tolist()):
                    assert bool(kept[r, t]) == bool(scored[x + 1])
            assert torch.equal(b.targets[kept], (b.input_ids + 1)[kept])


def test_a_mask_of_the_wrong_length_is_refused():
    with pytest.raises(DataError, match="scored-token mask"):
        RandomWindows(np.arange(100), 2, 8, scored=np.ones(99, dtype=bool))


@pytest.mark.parametrize("source, error, words", [
    ("builtin:stories:chars=3000", DataError, "builtin:stories"),
    ("FILE", DataError, "builtin:recall"),
])
def test_sources_without_answers_are_refused_in_one_line(tmp_path, source, error, words):
    if source == "FILE":
        f = tmp_path / "t.txt"
        f.write_text("some text. " * 200)
        source = str(f)
    cfg = DataConfig(source=source, tokenizer="byte", score="answers",
                     cache_dir=str(tmp_path / "cache"))
    with pytest.raises(error, match=words) as e:
        prepare_data(cfg, progress=False)
    assert "\n" not in str(e.value) and "data.score" in str(e.value)


def test_lm_loss_is_the_mean_and_zero_without_scored_targets():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11, requires_grad=True)
    targets = torch.randint(0, 11, (3, 7))
    targets[0, :4] = IGNORE_INDEX
    want = F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1), ignore_index=IGNORE_INDEX)
    assert lm_loss(logits, targets).item() == want.item()
    none = lm_loss(logits, torch.full_like(targets, IGNORE_INDEX))
    none.backward()
    assert none.item() == 0.0 and float(logits.grad.abs().sum()) == 0.0


def test_evaluate_scores_only_the_marked_tokens(tmp_path):
    data = _data(tmp_path)
    model = build("gpt", **{"n_layer": 1, "n_head": 2, "d_model": 16,
                         "context_len": 16, "vocab_size": data.tokenizer.vocab_size})
    tokens, scored = np.asarray(data.val), data.val_scored
    got = evaluate(model, tokens, seq_len=16, batch_size=4, precision="fp32", scored=scored)
    # by hand: non-overlapping 16-token windows, every answer target scored once
    x = torch.as_tensor(tokens[:-1].astype(np.int64))
    y = torch.as_tensor(tokens[1:].astype(np.int64))
    y = y.masked_fill(~torch.from_numpy(scored[1:]), IGNORE_INDEX)
    with torch.no_grad():
        model.eval()
        logits = torch.cat([model(x[i : i + 16][None]).logits[0] for i in range(0, len(x), 16)])
    want = F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum")
    count = int((y != IGNORE_INDEX).sum())
    assert got["tokens"] == count == int(scored[1:].sum()) > 0
    assert got["nll"] == pytest.approx(float(want) / count, rel=1e-5)


def _run(tmp_path, extra: str = "", arch: str = "armt") -> list[dict]:
    config = tmp_path / "ans.yaml"
    model = ("{arch: armt, n_layer: 1, n_head: 2, d_model: 32, context_len: 16, segment_len: 16,"
             " num_mem_tokens: 2, d_mem: 8}" if arch == "armt" else
             "{arch: gpt, n_layer: 1, n_head: 2, d_model: 32, context_len: 16}")
    config.write_text(f"""
model: {model}
train: {{batch_size: 4, bptt_window: 3, max_steps: 6, eval_every: 3, eval_batches: 4,
        save_every: 100, log_every: 1, precision: fp32, warmup_steps: 0}}
data: {{source: "{SOURCE}", tokenizer: "bpe:300", layout: episodes, score: answers{extra}}}
""")
    run = tmp_path / "run"
    assert main(["train", str(config), "--out", str(run), "--quiet"]) == 0
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("arch", ["armt", "gpt"])
def test_training_on_answers_gives_finite_losses_and_an_answer_only_validation(tmp_path, arch):
    records = _run(tmp_path, arch=arch)
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    assert len(train) == 6 and all(np.isfinite(r["loss"]) for r in train)
    assert val and all(np.isfinite(r["val_nll"]) for r in val)
    # answers are one digit of nine: an untrained model's answer loss is near ln(vocab),
    # and the validation scored far fewer tokens than it read
    assert all(0 < r["val_tokens"] < 16 * 4 for r in val)


def test_sliding_layout_and_datasets_refuse_answer_scoring(tmp_path):
    from memlm.config import RunConfig
    from memlm.train.trainer import prepare_bundle

    cfg = RunConfig.from_dict({"model": {"arch": "gpt", "n_layer": 1, "n_head": 2, "d_model": 16,
                                         "context_len": 16},
                               "data": {"source": SOURCE, "tokenizer": "byte", "score": "answers",
                                        "layout": "sliding", "cache_dir": str(tmp_path / "c")}})
    with pytest.raises(ConfigError, match="sliding"):
        prepare_bundle(cfg, stateful=False, progress=False)
    cfg = cfg.with_overrides({"data.source": "babilong:synth-qa1", "data.layout": "auto"})
    with pytest.raises(ConfigError, match="data.score"):
        prepare_bundle(cfg, stateful=False, progress=False)
