"""The main job: demo, compare (matched sizes, confidence intervals), diagnose, report."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import memlm
from memlm.cli import main
from memlm.errors import ConfigError
from memlm.eval.recall import bucket_of, make_recall_streams, recall_eval
from memlm.experiments.compare import count_params, match_params, mean_ci
from memlm.experiments.demo import verdict, verdict_rows, verdict_table
from memlm.inspect.fmt import sig3, wilson
from memlm.specs import parse_count


def test_mean_and_confidence_interval():
    mean, ci = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert ci == pytest.approx(4.303 * 1.0 / math.sqrt(3), rel=1e-3)  # t(2) * s / sqrt(n)
    assert math.isnan(mean_ci([5.0])[1])


def test_parse_count_reads_k_and_m_suffixes():
    assert parse_count("5M") == 5_000_000
    assert parse_count("20k") == 20_000
    assert parse_count(1234) == 1234


@pytest.mark.parametrize("arch", memlm.architectures())
def test_every_architecture_can_be_sized_to_a_parameter_target(arch):
    base = dict(n_layer=2, n_head=4, context_len=32, vocab_size=256)
    cfg, n = match_params(arch, 400_000, base)
    assert abs(n - 400_000) / 400_000 <= 0.05
    assert count_params(arch, **cfg) == n == memlm.build(arch, **cfg).num_params()


# ----- recall scoring: what a model can and cannot see ---------------------------------------


class _LastDigit(torch.nn.Module):
    """Predicts, at every position, the most recent digit it can see (else token 0).

    Stateless: it sees only its input window. Stateful: it also carries the last digit
    of earlier segments in its state, i.e. a perfect one-value memory.
    """

    def __init__(self, stateful: bool, window: int):
        super().__init__()
        self.is_stateful = stateful
        self.config = SimpleNamespace(context_len=window)
        self.digits = torch.tensor([ord(c) for c in "0123456789"])  # byte tokenizer ids
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def init_state(self, batch_size, device=None):
        return torch.full((batch_size,), -1)

    def forward(self, ids, state=None):
        last = state.clone() if state is not None else torch.full((ids.shape[0],), -1)
        logits = torch.zeros(*ids.shape, 256)
        for t in range(ids.shape[1]):
            is_digit = torch.isin(ids[:, t], self.digits)
            last = torch.where(is_digit, ids[:, t], last)
            logits[:, t].scatter_(1, last.clamp_min(0)[:, None], 1.0)
            logits[last < 0, t, 0] = 2.0
        return SimpleNamespace(logits=logits, state=last)


def _recall_streams(window):
    from memlm.data.tokenizers import make_tokenizer

    return make_recall_streams(make_tokenizer("byte"), 3, 3000, seed=5, gap_range=(80, 300),
                               near_range=(28, 56), near_fraction=0.5, max_open=1, digits=1)


@pytest.mark.parametrize("stateful", [False, True])
def test_recall_scoring_separates_what_is_in_the_window_from_what_needs_memory(stateful):
    window = 64
    ids, spans = _recall_streams(window)
    res = recall_eval(_LastDigit(stateful, window), ids, spans, window, precision="fp32")
    assert res["n_near"] > 10 and res["n_far"] > 10
    assert res["recall_near"] == 1.0  # the fact is inside the window: visible without memory
    # beyond the window only a carried memory can answer
    assert res["recall_far"] == (1.0 if stateful else 0.0)
    for label in ("1-2w", "2-4w"):
        assert res["buckets"][label]["n"] > 0
        assert res["buckets"][label]["accuracy"] == res["recall_far"]
    assert sum(b["n"] for b in res["buckets"].values()) == res["n_near"] + res["n_far"]


def test_episode_scoring_reads_each_answer_from_a_fresh_memory():
    """With `episode_segments` = K, a stateful model sees only the K segments before an
    answer: facts further back than that are out of reach even for a perfect memory."""
    window = 64
    ids, spans = _recall_streams(window)
    model = _LastDigit(True, window)
    long_enough = recall_eval(model, ids, spans, window, precision="fp32", episode_segments=6)
    assert long_enough["recall_far"] == 1.0  # every gap is <= 300 tokens < 6 windows
    short = recall_eval(model, ids, spans, window, precision="fp32", episode_segments=2)
    assert short["recall_near"] == 1.0 and short["buckets"]["1-2w"]["accuracy"] == 1.0
    assert short["buckets"]["2-4w"]["accuracy"] < 1.0  # some facts lie before the episode


def test_distance_buckets_are_in_windows():
    assert [bucket_of(g, 64) for g in (1, 64, 65, 128, 129, 256, 257, 10_000)] == [
        "<=1w", "<=1w", "1-2w", "1-2w", "2-4w", "2-4w", ">4w", ">4w"]


def test_easy_recall_options_keep_the_default_text_and_give_one_open_one_digit_facts():
    from memlm.data.synthetic import builtin_text, recall_stream

    assert builtin_text("recall:chars=3000", seed=4) == recall_stream(3000, seed=4)[0]
    text, spans = recall_stream(20_000, seed=1, gap_range=(40, 80), near_fraction=0.0,
                                max_open=1, digits=1, fact_prob=1.0, n_keys=3, filler_words=2)
    assert spans and all(len(s.answer) == 1 for s in spans)
    assert {s.key for s in spans} <= {"ada", "ben", "cal"}
    # one fact open at a time: each answer's fact comes after the previous answer
    assert all(b.fact_start > a.start for a, b in zip(spans, spans[1:]))
    assert "park" in text and "forest" not in text  # filler keeps the first 2 places
    assert builtin_text("recall:chars=20000,gap=40-80,near=0,open=1,digits=1,facts=1,keys=3,"
                        "filler=2", seed=1) == text


def test_one_key_one_attribute_leaves_only_the_value_to_predict():
    from memlm.data.synthetic import builtin_text, recall_stream
    from memlm.errors import DataError

    text, spans = recall_stream(20_000, seed=2, near_fraction=0.5, max_open=1, digits=1,
                                fact_prob=1.0, n_keys=1, n_attributes=1, filler_words=2)
    assert spans and {(s.key, s.attribute) for s in spans} == {("ada", "code")}
    assert len({s.answer for s in spans}) == 9  # the value still varies: 1-9
    assert builtin_text("recall:chars=20000,near=0.5,open=1,digits=1,facts=1,keys=1,attrs=1,"
                        "filler=2", seed=2) == text
    with pytest.raises(DataError, match="n_attributes must be in"):
        recall_stream(100, n_attributes=5)


def _far_payload(far, n, seeds=1):
    rows = [{"arch": a, "metrics": {"recall_far": {"mean": p, "values": [p] * seeds},
                                    "n_far": {"values": [n] * seeds}}}
            for a, p in far.items()]
    return {"baseline": "gpt", "rows": rows}


def test_verdict_needs_a_significant_win_not_a_lucky_handful():
    rows = {r["arch"]: r for r in verdict_rows(_far_payload(
        {"gpt": 0.10, "armt": 0.30, "rmt": 0.12}, 400))}
    assert rows["gpt"]["verdict"] == "baseline"
    # the demo's verdict (z > 1.96). Issue 15 asks z > 3 on every seed; this exact run (the
    # grid's seed 0 / fp32 / 1 thread, benchmarks/results/demo_robustness.json) measured ARMT
    # 0.135 against 0.0982, z = 2.73, so z > 3 is not claimed
    assert rows["armt"]["verdict"] == "beats the baseline" and rows["armt"]["z"] > 1.96
    assert rows["rmt"]["verdict"] == "does NOT beat the baseline"
    # the same lead on 20 answers is noise
    rows = {r["arch"]: r for r in verdict_rows(_far_payload({"gpt": 0.10, "armt": 0.25}, 20))}
    assert rows["armt"]["verdict"] == "does NOT beat the baseline"
    # guessing digits at chance does not beat a baseline that has not learned to answer yet
    rows = {r["arch"]: r for r in verdict_rows(_far_payload({"gpt": 0.0, "dnc": 0.11}, 400),
                                               chance=1 / 9)}
    assert rows["dnc"]["verdict"] == "does NOT beat the baseline"
    assert "not above chance" in rows["dnc"]["note"]


def test_architectures_without_memory_across_segments_get_their_reason_not_a_verdict():
    rows = {r["arch"]: r for r in verdict_rows(_far_payload(
        {"gpt": 0.10, "gmt": 0.5, "tmt": 0.1, "armt": 0.5}, 400))}
    for arch in ("gmt", "tmt"):
        assert rows[arch]["verdict"] == "no memory across segments"
        assert "window" in rows[arch]["note"]
    assert rows["armt"]["verdict"] == "beats the baseline"


def test_verdict_table_has_three_significant_digits_wilson_intervals_and_marks():
    table = verdict_table(_far_payload({"gpt": 0.1, "armt": 0.7854321, "rmt": 0.12}, 1114))
    assert table["columns"][:3] == ["arch", "recall beyond window", "95% CI (Wilson)"]
    cells = {row[0]: row for row in table["rows"]}
    assert cells["armt"][1] == "0.785" and cells["armt"][3] == "1,114"
    assert cells["armt"][4].endswith("**") and not cells["rmt"][4].endswith("*")
    lo, hi = (float(x) for x in cells["armt"][2].split("-"))
    assert lo < 0.785 < hi
    text = verdict(_far_payload({"gpt": 0.1, "armt": 0.7854321}, 1114))
    assert "armt" in text and "beats the baseline" in text and "e+" not in text


def test_sig3_never_prints_exponents_and_wilson_keeps_a_bound_at_zero():
    assert [sig3(v) for v in (0.7854, 1.0064, 19734.25, -9180.9, 9.999, 0.0)] == [
        "0.785", "1.01", "19,700", "-9,180", "10.0", "0"]
    assert sig3(-0.0147, signed=True) == "-0.0147" and sig3(0.67, signed=True) == "+0.670"
    assert sig3(float("nan")) == "n/a"
    lo, hi = wilson(0, 50)
    assert lo == 0.0 and 0.05 < hi < 0.09  # the normal approximation would give 0 +- 0
    lo, hi = wilson(50, 50)
    assert hi == 1.0 and 0.9 < lo < 0.95
    assert wilson(30, 100)[0] < 0.3 < wilson(30, 100)[1]


# ----- the demo -------------------------------------------------------------------------------


def test_recall_plot_takes_0_and_100_percent_points(tmp_path):
    """At 0% and 100% a Wilson bound equals the point up to rounding (y - lo = -2.8e-17 at
    0 of 11): the plot must still draw, after every model has trained (it once crashed the
    demo there)."""
    from memlm.eval.recall import BUCKETS
    from memlm.experiments.demo import bucket_key, plot_recall_by_distance

    labels = [label for label, _, _ in BUCKETS]
    assert 0.0 - wilson(0, 11)[0] < 0.0  # the rounding this test is about
    rows = [{"arch": a, "seeds": [0], "metrics": {bucket_key(lab): {"mean": v}
                                                  for lab in labels}}
            for a, v in (("gpt", 0.0), ("armt", 1.0), ("rmt", 6 / 6))]
    payload = {"rows": rows, "baseline": "gpt",
               "setup": {"answers_per_bucket": {lab: n for lab, n in zip(labels, (11, 6, 21, 0))}}}
    path = plot_recall_by_distance(payload, tmp_path / "r.png")
    assert path.stat().st_size > 1000


def test_demo_settings_are_checked_before_any_training(capsys, tmp_path):
    assert main(["demo", "--ci", "--seeds", "0,one", "--out", str(tmp_path)]) != 0
    assert "--seeds takes a comma list of integers" in capsys.readouterr().err
    assert main(["demo", "--ci", "--threads", "0", "--out", str(tmp_path)]) == 2
    assert "--threads must be >= 1, got 0" in capsys.readouterr().err
    from memlm.experiments.demo import run_demo

    with pytest.raises(ConfigError, match="unknown demo setting.*'stepz'"):
        run_demo(tmp_path, mode="ci", stepz=3)
    with pytest.raises(ConfigError, match="layout must be stream or episodes"):
        run_demo(tmp_path, mode="ci", layout="random")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--ci", "--out", str(out), "--quiet"]) == 0
    return out


def test_demo_runs_every_architecture_and_writes_table_and_report(demo_dir):
    payload = json.loads((demo_dir / "results.json").read_text())
    archs = [r["arch"] for r in payload["rows"]]
    assert archs[0] == "gpt" and set(archs) == set(memlm.architectures())
    for row in payload["rows"]:
        for key in ("val_nll", "recall_near", "recall_far", "tokens_per_sec"):
            assert key in row["metrics"], (row["arch"], key)
    assert "far recall" in payload["verdict"]
    verdicts = {row[0]: row[-1] for row in payload["verdict_table"]["rows"]}
    assert list(verdicts) == archs and verdicts["gpt"] == "baseline"
    for arch in archs[1:]:  # one measured verdict per memory architecture
        assert verdicts[arch] in ("beats the baseline", "does NOT beat the baseline",
                                  "no memory across segments"), (arch, verdicts[arch])
    assert verdicts["gmt"] == verdicts["tmt"] == "no memory across segments"
    # memory health on held-out text, per layer where the memory is per layer
    health = payload["memory_health"]
    assert {"health_gmt_never_src_l1", "health_gmt_top_tgt_share_l2"} <= set(health["gmt"])
    assert {"health_dnc_slots_written", "health_dnc_top_write_share"} <= set(health["dnc"])
    assert "health_armt_write_gate_l1" in health["armt"] and health["gpt"] == {}
    for arch in ("gmt", "dnc", "armt"):  # ... also in each run's metrics.jsonl
        run = Path(next(r for r in payload["rows"] if r["arch"] == arch)["runs"][0])
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert any(r["kind"] == "memory_health" and set(health[arch]) <= set(r)
                   for r in records)
    # the inspected example spans segments: fact in segment 1, its question in segment 3
    window = payload["setup"]["window"]
    example = payload["inspect"]
    assert example["fact_token"] // window == 0 and example["answer_token"] // window == 2
    # stateful models train on episodes from a fresh memory and are scored the same way
    assert payload["setup"]["data"]["layout"] == "episodes"
    buckets = ("<=1w", "1-2w", "2-4w", ">4w")
    answers = payload["setup"]["answers_per_bucket"]  # one scoring text for every model
    assert set(answers) == set(buckets) and answers["1-2w"] > 0
    for row in payload["rows"]:  # recall by distance, counted on the same answers for all
        assert all(f"recall_{label}" in row["metrics"] for label in buckets)
        assert row["metrics"]["n_far"]["values"] == [sum(answers[b] for b in buckets[1:])]
    assert (demo_dir / "curves.png").exists()
    assert (demo_dir / "recall_vs_distance.png").exists()
    html = (demo_dir / "report.html").read_text()
    assert "<table>" in html and "data:image/png;base64," in html
    assert "recall_vs_distance" in html  # every PNG of the folder is embedded
    assert "src=\"http" not in html  # self-contained: nothing to fetch
    assert "<h2>Verdict</h2><table>" in html and "<h2>Memory health</h2>" in html
    assert example["text"].split("?")[0].split(".")[0] in html  # the spanning example
    tables = re.sub(r'src="data:[^"]*"', "", html.split("<h2>What the memory did")[0])
    assert "e+0" not in tables and "e-0" not in tables  # 3 digits, no exponents


def test_report_renders_in_headless_chromium(demo_dir, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
         "--window-size=1280,2400", "--hide-scrollbars", f"--screenshot={shot}",
         (demo_dir / "report.html").resolve().as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert shot.exists(), proc.stderr[-2000:]
    from PIL import Image

    img = Image.open(shot).convert("L")
    lo, hi = img.getextrema()
    assert hi - lo > 100, "the screenshot is blank"
    dark = sum(img.histogram()[:128])  # pixels darker than mid-grey
    assert dark > 2000, "almost nothing was drawn"
    # the verdict and comparison tables (7 architectures) fit a 1280 px window: the body is
    # centred at most 1220 px wide, so the right margin stays blank unless a table overflows
    assert img.size[0] == 1280
    margin = img.crop((img.size[0] - 24, 0, img.size[0], img.size[1]))
    assert margin.getextrema()[0] > 200, "something runs past the right edge of a 1280 px window"
    if os.environ.get("MEMLM_REPORT_SHOT"):  # keep the picture to look at
        shutil.copy(shot, os.environ["MEMLM_REPORT_SHOT"])
    # the DOM really holds the comparison table
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile2'}", "--dump-dom",
         (demo_dir / "report.html").resolve().as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout
    assert "<table>" in dom and "gpt" in dom and "Memory health" in dom
    assert "beats the baseline" in dom or "does NOT beat the baseline" in dom


def test_compare_matches_sizes_and_reports_intervals(tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(["compare", "gpt", "gpt", "--params", "60k", "--steps", "4", "--seeds", "0,1",
                 "--batch-size", "4", "--n-layer", "1", "--context-len", "32",
                 "--data", "builtin:stories:chars=20000", "--tokenizer", "byte",
                 "--out", str(out), "--quiet"])
    assert code == 0
    payload = json.loads((out / "results.json").read_text())
    row = payload["rows"][0]
    assert abs(row["params"] - 60_000) / 60_000 <= 0.05
    assert len(row["metrics"]["val_nll"]["values"]) == 2
    assert math.isfinite(row["metrics"]["val_nll"]["ci95"])
    assert (out / "curves.png").exists() and (out / "report.html").exists()
    assert "±" in capsys.readouterr().out


def test_diagnose_trains_then_prints_accuracy_by_difficulty(capsys):
    code = main(["diagnose", "gpt", "--task", "mqar", "--pairs", "2,4", "--distance", "0,40",
                 "--train-steps", "5", "--samples", "4", "--context-len", "64",
                 "--seq-len", "64"])
    assert code == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and out.count("\n") >= 6


@pytest.mark.slow
def test_full_demo_memory_beats_the_dense_baseline_beyond_the_window(tmp_path):
    """The full demo setting (1,000 steps, seed 0) for the dense baseline and the four
    architectures that carry memory across segments: each beats the baseline on far recall
    with z > 3 (issue 15's bar), and the dense model stays near chance.
    benchmarks/demo_robustness.py checks the same over seeds, precisions and thread counts."""
    from memlm.experiments.demo import CHANCE, run_demo

    archs = ["gpt", "armt", "rmt", "dnc", "tmt-xmem"]
    payload = run_demo(tmp_path / "demo", mode="full", archs=archs, seeds=(0,),
                       progress=False, log=lambda _: None, workers=2)
    rows = {r["arch"]: r for r in verdict_rows(payload)}
    for arch in archs[1:]:
        assert rows[arch]["verdict"] == "beats the baseline", (arch, rows[arch])
        assert rows[arch]["z"] > 3, (arch, rows[arch]["z"], rows[arch]["recall_far"])
    assert rows["gpt"]["ci_low"] < CHANCE + 0.05 and rows["gpt"]["recall_far"] < 0.2
