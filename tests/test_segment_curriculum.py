"""`train.curriculum` stages with their own `bptt_window`: the segment-count curriculum."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memlm.cli import main
from memlm.config import TrainConfig
from memlm.experiments.demo import MODES


def _train_tokens(tmp_path, layout: str) -> list[int]:
    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    config = tmp_path / "cur.yaml"
    config.write_text(f"""
model: {{arch: rmt, n_layer: 1, n_head: 2, d_model: 32, context_len: 8, segment_len: 8,
        num_mem_tokens: 2}}
train:
  batch_size: 2
  bptt_window: 2
  eval_every: 100
  save_every: 100
  log_every: 1
  precision: fp32
  warmup_steps: 0
  curriculum: [{{steps: 2, bptt_window: 1}}, {{steps: 2, bptt_window: 3}}, {{steps: 1}}]
data: {{source: {json.dumps(str(corpus))}, tokenizer: char, seq_len: 8, layout: {layout}}}
""")
    run = tmp_path / "run"
    assert main(["train", str(config), "--out", str(run), "--quiet"]) == 0
    return [json.loads(x)["tokens"] for x in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(x)["kind"] == "train"]


@pytest.mark.parametrize("layout", ["episodes", "stream"])
def test_each_stage_reads_its_own_number_of_segments_per_step(tmp_path, layout):
    tokens = _train_tokens(tmp_path, layout)
    per_step = [b - a for a, b in zip([0, *tokens], tokens)]
    # 2 rows x 8 tokens per segment: 1 segment, 1, then 3, 3, then train.bptt_window (2)
    assert per_step == [16, 16, 48, 48, 32]


def test_stage_bptt_window_is_typed_and_defaults_to_the_run_value():
    cfg = TrainConfig(bptt_window=4, curriculum=[{"steps": 3, "bptt_window": 1}, {"steps": 2}])
    assert [st.bptt_window for st in cfg.curriculum] == [1, None]
    with pytest.raises(Exception, match="bptt_window"):
        TrainConfig(curriculum=[{"steps": 3, "bptt_window": 0}])


def test_demo_curriculum_shares_become_stages_ending_at_the_episode_length():
    mode = MODES["full"]
    stages = type(mode)(**{**mode.__dict__, "steps": 100, "bptt_window": 4,
                           "curriculum": ((0.3, 1), (0.2, 2))}).stages()
    assert stages == [{"steps": 30, "bptt_window": 1}, {"steps": 20, "bptt_window": 2},
                      {"steps": 50, "bptt_window": 4}]
    with pytest.raises(Exception, match="leaves no steps"):
        type(mode)(**{**mode.__dict__, "steps": 10, "curriculum": ((1.0, 1),)}).stages()


def test_demo_trains_the_stateful_models_through_its_curriculum(tmp_path):
    from memlm.experiments.demo import run_demo

    payload = run_demo(tmp_path / "demo", mode="ci", archs=["gpt", "rmt"], progress=False,
                       log=lambda _: None, curriculum=((0.25, 1),))
    assert [st["bptt_window"] for st in payload["setup"]["train"]["curriculum"]] == [1, 4]
    run = Path(payload["rows"][1]["runs"][0])
    tokens = [json.loads(x)["tokens"] for x in (run / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["kind"] == "train"]
    # 20 steps x 8 rows x 16 tokens: 5 steps of 1 segment, then 15 of 4
    assert tokens[-1] == 8 * 16 * (5 * 1 + 15 * 4)
