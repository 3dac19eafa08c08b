"""Inspection beyond one window and memory-health numbers (issue 15)."""

from __future__ import annotations

import math

import pytest
import torch

import memlm
from memlm.data.tokenizers import make_tokenizer
from memlm.experiments.demo import (
    BASE_MODEL,
    WINDOW,
    arch_overrides,
    inspect_example,
    recall_source,
)
from memlm.inspect.health import dnc_health, gmt_health, health_lines, memory_health
from memlm.inspect.segments import traced_forward
from memlm.registry import INSPECTORS


def _tiny(arch: str):
    torch.manual_seed(0)
    return memlm.build(arch, vocab_size=64, **BASE_MODEL, **arch_overrides(arch)).eval()


def test_dnc_inspection_reads_long_text_in_windows_with_the_memory_carried():
    model = _tiny("dnc")
    ids = torch.randint(0, 64, (2, 3 * WINDOW + 5))
    out = traced_forward(model, ids)
    state, logits = model.init_state(2), []
    with torch.no_grad():
        for lo in range(0, ids.shape[1], WINDOW):
            step = model(ids[:, lo : lo + WINDOW], state=state)
            state, logits = step.state, logits + [step.logits]
    torch.testing.assert_close(out.logits, torch.cat(logits, 1))  # same as carried windows
    assert out.trace["write_gate"].shape == ids.shape  # one trace row per token
    assert out.trace["write_address"].shape[:2] == ids.shape
    text = INSPECTORS.get("dnc")(model, [f"t{i}" for i in range(ids.shape[1])], ids[:1],
                                 None, None, None, False)
    assert f"{ids.shape[1]} tokens" in text and "memory health: dnc_slots_written" in text


def test_gmt_inspection_accepts_text_longer_than_its_window(tmp_path):
    model = _tiny("gmt")
    ids = torch.randint(0, 64, (1, 2 * WINDOW + 3))
    with pytest.raises(Exception, match="longer than the model's context_len"):
        model(ids, trace=True)  # one call cannot read it ...
    out = traced_forward(model, ids)  # ... windows can, each on its own (GMT is stateless)
    assert out.trace["src_probs"].shape[:2] == ids.shape
    first = model(ids[:, :WINDOW], trace=True)
    torch.testing.assert_close(out.logits[:, :WINDOW], first.logits)
    text = INSPECTORS.get("gmt")(model, [f"t{i}" for i in range(ids.shape[1])], ids, out,
                                 tmp_path, None, False)
    assert f"t{ids.shape[1] - 1}" in text  # the last token of the third window is listed
    assert "layer 2: gmt_never_src" in text  # the health numbers are printed per layer


def test_armt_inspection_prints_the_write_gate_level():
    model = _tiny("armt")
    ids = torch.randint(0, 64, (1, 3 * WINDOW))
    text = INSPECTORS.get("armt")(model, [f"t{i}" for i in range(ids.shape[1])], ids, None,
                                  None, None, False)
    assert "layer 1: armt_write_gate" in text and "layer 2: armt_write_gate" in text


def test_gmt_health_counts_never_used_slots_and_the_busiest_slot():
    """A collapsed router (every token to slot 3) must read as collapsed, not as 'dead = 0'."""
    b, t, n_layer, k = 2, 10, 2, 8
    src = torch.full((b, t, n_layer, k), 0.01)
    src[..., 3] = 1.0  # every token's top source slot is 3 in both layers
    tgt = src.clone()
    tgt[:, :5, 1] = 0.01
    tgt[:, :5, 1, 6] = 1.0  # layer 2 targets: half slot 6, half slot 3
    h = gmt_health({"src_probs": src, "tgt_probs": tgt})
    assert h["health_gmt_never_src_l1"] == pytest.approx(7 / 8)
    assert h["health_gmt_top_src_share_l1"] == 1.0
    assert h["health_gmt_never_tgt_l2"] == pytest.approx(6 / 8)
    assert h["health_gmt_top_tgt_share_l2"] == 0.5
    assert any(line.startswith("layer 2:") for line in health_lines(h))


def test_dnc_health_counts_slots_written_and_the_top_slot_share():
    address = torch.zeros(1, 4, 5)
    address[0, :3, 1] = 1.0
    address[0, 3, 4] = 1.0
    gate = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    h = dnc_health({"write_gate": gate, "write_address": address})
    assert h["health_dnc_slots_written"] == pytest.approx(2 / 5)
    assert h["health_dnc_top_write_share"] == pytest.approx(0.75)
    assert h["health_dnc_write_gate"] == 1.0


@pytest.mark.parametrize("arch", ["gmt", "dnc", "armt", "rmt", "gpt"])
def test_memory_health_of_every_demo_memory(arch):
    h = memory_health(_tiny(arch), torch.randint(0, 64, (3, 2 * WINDOW)))
    assert all(math.isfinite(v) for v in h.values())
    expected = {"gmt": "health_gmt_never_src_l2", "dnc": "health_dnc_slots_written",
                "armt": "health_armt_write_gate_l2", "rmt": "health_rmt_mem_change"}
    assert (expected[arch] in h) if arch in expected else h == {}


def test_the_inspected_example_has_its_fact_two_segments_before_its_question():
    from memlm.data.synthetic import builtin_text

    text = builtin_text(recall_source(20_000).removeprefix("builtin:"))
    tok = make_tokenizer("bpe:400", text)
    ex = inspect_example(tok, WINDOW)
    assert ex["fact_token"] // WINDOW == 0 and ex["answer_token"] // WINDOW == 2
    ids = tok.encode(ex["text"])
    assert tok.decode(ids) == ex["text"] and ex["text"].startswith("the ")
    assert "segment 1" in ex["about"] and "segment 3" in ex["about"]
