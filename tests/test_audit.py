"""`memlm audit` fails a model that sees the future and passes honest ones.

The leaking model below is the classic bug: self-attention without the causal
mask. Every position can read the token it must predict, so perturbing the
future moves past logits, a prefix run alone differs from the same prefix in a
longer run, and after a little training on uniform random tokens it predicts
them far better than the log(V) floor any causal model is bound by.
"""

import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memlm
from memlm import testing
from memlm.config import ModelConfig
from memlm.errors import ConfigError
from memlm.models.base import ForwardContext, MemLM, ModelOutput
from memlm.models.decoder import Decoder
from memlm.nn.attention import CausalSelfAttention
from memlm.testing.audit import ProbeResult, all_passed, audit, format_audit

TINY = dict(vocab_size=64, n_layer=1, d_model=32, n_head=2, context_len=64)


class UnmaskedAttention(CausalSelfAttention):
    """The bug under test: attention over ALL positions, future included."""

    def forward(self, x, rope=None, cache=None, ctx=None):
        b, t, d = x.shape
        q, k, v = self.split_heads(x)
        if rope is not None:
            q, k = rope(q, slice(0, t)), rope(k, slice(0, t))
        y = F.scaled_dot_product_attention(q, k, v)  # no is_causal: leaks the future
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class LeakyLM(MemLM):
    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.decoder = Decoder(config, make_attn=lambda c, i: UnmaskedAttention(c.d_model, c.n_head))
        self.init_weights()

    def forward(self, input_ids, targets=None, state=None, trace=False, cache=None) -> ModelOutput:
        ctx = ForwardContext(trace)
        logits = self.decoder.head(self.decoder.hidden(input_ids, ctx))
        return self.assemble_output(logits, targets, ctx)


@dataclass
class CarryConfig(ModelConfig):
    arch: str = "gpt"


class CarryLM(MemLM):
    """A minimal honest stateful model: the mean hidden state of earlier segments is
    carried in `state` and added to every position of the next segment."""

    is_stateful = True

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.decoder = Decoder(config)
        self.mix = nn.Linear(config.d_model, config.d_model)
        self.init_weights()

    def init_state(self, batch_size: int, device: Any = None) -> torch.Tensor:
        return torch.zeros(batch_size, self.config.d_model, device=device)

    def forward(self, input_ids, targets=None, state=None, trace=False, cache=None) -> ModelOutput:
        if state is None:
            state = self.init_state(input_ids.shape[0], input_ids.device)
        ctx = ForwardContext(trace)
        h = self.decoder.hidden(input_ids, ctx) + self.mix(state)[:, None]
        return self.assemble_output(self.decoder.head(h), targets, ctx, h.mean(1))


def by_name(results: list[ProbeResult]) -> dict[str, ProbeResult]:
    return {r.name: r for r in results}


def test_a_model_that_sees_the_future_fails_every_leak_probe():
    torch.manual_seed(0)
    results = by_name(audit(LeakyLM(ModelConfig(**TINY)), seq_len=32, floor_steps=60))
    for name in ("future perturbation (eval)", "future perturbation (train, dropout off)",
                 "prefix consistency", "random-token floor"):
        assert not results[name].passed, f"{name} should catch the leak: {results[name]}"
        assert results[name].deviation > results[name].tolerance
    # it learned to copy the next token: far below the log(64) floor, not by noise
    assert results["random-token floor"].deviation > 0.3
    assert results["cache equivalence"].skipped  # LeakyLM has no KV cache
    assert not all_passed(list(results.values()))


def test_dense_gpt_passes_including_train_mode_with_dropout_and_the_kv_cache():
    model = memlm.build("gpt", **TINY, dropout=0.2)
    model.train()
    results = audit(model, seq_len=32, floor_steps=40)
    assert all_passed(results), format_audit(results)
    named = by_name(results)
    assert not named["cache equivalence"].skipped
    assert named["future perturbation (train, dropout off)"].deviation <= 1e-4
    assert model.training and model.config.dropout == 0.2  # audit left the model alone


def test_audit_does_not_change_the_audited_weights():
    model = memlm.build("gpt", **TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    audit(model, seq_len=16, floor_steps=5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_stateful_model_gets_a_fresh_state_and_passes():
    results = audit(CarryLM(ModelConfig(**TINY)), seq_len=24, floor_steps=30)
    assert all_passed(results), format_audit(results)
    assert by_name(results)["cache equivalence"].skipped


def test_huggingface_gpt2_passes_with_its_own_kv_cache():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=1,
                                     n_head=2, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    results = audit(model, seq_len=32, floor_steps=30)
    assert all_passed(results), format_audit(results)
    cache = by_name(results)["cache equivalence"]
    assert not cache.skipped and cache.deviation < 1e-4


def test_a_smaller_token_range_sets_a_lower_floor():
    model = memlm.build("gpt", **TINY)
    r = testing.random_token_floor(model, vocab_size=16, seq_len=16, steps=40)
    assert r["floor"] == pytest.approx(math.log(16))
    assert r["gap"] < 0.05  # an honest model reaches ~log(16), never meaningfully below


def test_report_prints_pass_fail_with_deviation_and_verdict():
    lines = []
    results = audit(memlm.build("gpt", **TINY), seq_len=16, floor=False,
                    report=lambda r: lines.append(r.status))
    assert lines == [r.status for r in results] and "FAIL" not in lines
    text = format_audit(results + [ProbeResult("made-up probe", False, 0.5, 0.1, "x")])
    assert "PASS  future perturbation (eval)" in text
    assert "FAIL  made-up probe" in text and "deviation       0.5  tolerance     0.1" in text
    assert text.splitlines()[-1].startswith("NOT CAUSAL: 1 probe(s) failed (made-up probe)")


def test_bad_arguments_get_clear_errors():
    model = memlm.build("gpt", **TINY)
    with pytest.raises(ConfigError, match="seq_len=100"):
        audit(model, seq_len=100)
    with pytest.raises(ConfigError, match="vocab_size=1000"):
        audit(model, vocab_size=1000)
    with pytest.raises(ConfigError, match="memlm model .* or a transformers causal LM"):
        audit(nn.Linear(2, 2))
