"""Speed-motivated kernel choices in memlm/nn/attention.py compute the same thing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import memlm
from memlm.nn import attention
from memlm.nn.attention import (
    CPU_BF16_SDPA_MIN_HEAD_DIM,
    CPU_BF16_SDPA_MIN_T,
    RotaryEmbedding,
    causal_attention,
)
from memlm.testing import assert_causal


def _qkv(t: int, dtype: torch.dtype, seed: int = 0, dh: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 4, t, dh, generator=g).to(dtype).requires_grad_() for _ in range(3)]


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("t", [64, 144])
def test_bf16_attention_runs_the_fp32_kernel_even_under_autocast(t, autocast):
    """The bf16 route is SDPA's fp32 result of the same inputs, rounded once; under autocast
    too (SDPA is on autocast's bf16 list: without disabling it the cast up is undone)."""
    q, k, v = _qkv(t, torch.bfloat16)
    ref_in = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ref_in, is_causal=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = causal_attention(q, k, v)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ref.to(torch.bfloat16))
    bf16_kernel = F.scaled_dot_product_attention(*(x.detach() for x in (q, k, v)), is_causal=True)
    assert not torch.equal(out, bf16_kernel)  # the bf16 kernel's own rounding differs
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(grad.bfloat16())
    ref.backward(grad.bfloat16().float())
    for ours, exact in zip((q, k, v), ref_in):
        assert torch.equal(ours.grad, exact.grad.bfloat16())


def test_bf16_attention_is_causal():
    q, k, v = (x.detach() for x in _qkv(64, torch.bfloat16))
    out = causal_attention(q, k, v)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 40:] = torch.randn_like(k2[:, :, 40:])
    v2[:, :, 40:] = torch.randn_like(v2[:, :, 40:])
    moved = causal_attention(q, k2, v2)
    assert torch.equal(out[:, :, :40], moved[:, :, :40])
    assert not torch.equal(out[:, :, 40:], moved[:, :, 40:])


@pytest.mark.parametrize("t, dtype, dh", [(CPU_BF16_SDPA_MIN_T, torch.bfloat16,
                                           CPU_BF16_SDPA_MIN_HEAD_DIM),
                                          (32, torch.float32, 16)])
def test_other_cases_are_exactly_sdpa(t, dtype, dh):
    q, k, v = (x.detach() for x in _qkv(t, dtype, dh=dh))
    assert torch.equal(causal_attention(q, k, v),
                       F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_dense_model_stays_causal_under_bf16_autocast():
    torch.manual_seed(0)
    model = memlm.build("gpt", vocab_size=97, n_layer=2, n_head=2, d_model=32, context_len=24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert_causal(model, 97, 24, atol=0.0)


def test_rope_real_pair_form_used_under_compile_equals_the_complex_one(monkeypatch):
    rope = RotaryEmbedding(16, 32)
    x = torch.randn(2, 3, 32, 16)
    complex_form = rope(x, slice(0, 32))
    monkeypatch.setattr(attention.torch.compiler, "is_compiling", lambda: True)
    real_form = rope(x, slice(0, 32))
    assert torch.allclose(real_form, complex_form, atol=1e-6, rtol=0)
    assert torch.allclose(rope(x.bfloat16(), slice(0, 32)).float(), complex_form, atol=0.05)


@pytest.mark.parametrize("slow_dtype, expected", [(torch.bfloat16, False), (torch.float32, True)])
def test_auto_precision_follows_the_measured_linear_speed(monkeypatch, slow_dtype, expected):
    """`precision: auto` picks bf16 exactly when nn.Linear's bf16 kernel times faster."""
    import time

    from memlm.nn import precision

    # a stand-in kernel whose speed the test sets: the real one's speed depends on the CPU
    # (an AVX2-only CPU emulates bf16 slower than any added delay), and this checks the
    # decision, not the machine
    def linear(x, w, *args):
        if x.dtype == slow_dtype:
            time.sleep(0.002)
        return x

    monkeypatch.setattr(precision, "_FAST_BF16", {})
    monkeypatch.setattr(F, "linear", linear)
    assert precision.bf16_is_faster("cpu") is expected
    assert precision.resolve_precision("cpu", "auto") == ("bf16" if expected else "fp32")


@pytest.mark.slow
def test_train_compile_matches_eager_on_cpu():
    """`train.compile: true` works on CPU (RoPE included) and trains the same model."""
    from memlm.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from memlm.train.trainer import Trainer

    def losses(compile: bool) -> list[float]:
        cfg = RunConfig(
            model=ModelConfig(arch="gpt", n_layer=1, n_head=2, d_model=32, context_len=16),
            train=TrainConfig(max_steps=3, batch_size=4, precision="fp32", compile=compile,
                              warmup_steps=1, device="cpu", seed=3),
            data=DataConfig(source="builtin:stories", tokenizer="byte"),
        )
        trainer = Trainer(cfg, progress=False)
        return [float(trainer.train_step()["loss"]) for _ in range(3)]

    assert losses(True) == pytest.approx(losses(False), abs=1e-4)
