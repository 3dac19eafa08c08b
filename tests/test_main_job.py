"""The main job: demo, compare (matched sizes, confidence intervals), diagnose, report."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest

import memlm
from memlm.cli import main
from memlm.eval.compare import count_params, match_params, mean_ci, parse_count


def test_mean_and_confidence_interval():
    mean, ci = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert ci == pytest.approx(4.303 * 1.0 / math.sqrt(3), rel=1e-3)  # t(2) * s / sqrt(n)
    assert math.isnan(mean_ci([5.0])[1])


def test_parse_count():
    assert parse_count("5M") == 5_000_000
    assert parse_count("20k") == 20_000
    assert parse_count(1234) == 1234


@pytest.mark.parametrize("arch", memlm.architectures())
def test_every_architecture_can_be_sized_to_a_parameter_target(arch):
    base = dict(n_layer=2, n_head=4, context_len=32, vocab_size=256)
    cfg, n = match_params(arch, 400_000, base)
    assert abs(n - 400_000) / 400_000 <= 0.05
    assert count_params(arch, **cfg) == n == memlm.build(arch, **cfg).num_params()


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
    assert (demo_dir / "curves.png").exists()
    html = (demo_dir / "report.html").read_text()
    assert "<table>" in html and "data:image/png;base64," in html
    assert "src=\"http" not in html  # self-contained: nothing to fetch


def test_report_renders_in_headless_chromium(demo_dir, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
         "--window-size=1200,1600", f"--screenshot={shot}",
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
    # the DOM really holds the comparison table
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile2'}", "--dump-dom",
         (demo_dir / "report.html").resolve().as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout
    assert "<table>" in dom and "gpt" in dom


def test_compare_matches_sizes_and_reports_intervals(tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(["compare", "gpt", "gpt", "--params", "60k", "--steps", "4", "--seeds", "2",
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
