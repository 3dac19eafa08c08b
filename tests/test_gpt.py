"""The dense baseline passes every shared check the memory models must pass."""

import pytest
import torch

import memlm
from memlm import testing
from memlm.errors import ConfigError, SequenceTooLongError, UnknownNameError

SMALL = dict(vocab_size=97, n_layer=2, d_model=64, n_head=4, context_len=32)


@pytest.mark.parametrize("pos_emb", ["rope", "learned"])
def test_gpt_is_causal_in_training_and_inference(pos_emb):
    model = memlm.build("gpt", **SMALL, pos_emb=pos_emb)
    testing.assert_causal(model, 97, 24)
    assert testing.check_generation_causality(model, 97) < 1e-5


def test_cached_greedy_equals_uncached_greedy():
    model = memlm.build("gpt", **SMALL)
    prompt = torch.randint(0, 97, (2, 5))
    cached = model.generate(prompt, 20, use_cache=True)
    uncached = model.generate(prompt, 20, use_cache=False)
    assert torch.equal(cached, uncached)


def test_generation_past_the_context_keeps_going():
    model = memlm.build("gpt", **SMALL)
    out = model.generate(torch.randint(0, 97, (1, 30)), 10)
    assert out.shape == (1, 40)


def test_sampling_options_and_stop_tokens():
    model = memlm.build("gpt", **SMALL)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 97, (3, 4))
    out = model.generate(prompt, 12, temperature=0.8, top_k=5, top_p=0.9, generator=g)
    assert out.shape == (3, 16) and out.max() < 97
    first = model.generate(prompt, 1)[:, -1]
    stopped = model.generate(prompt, 12, stop_tokens=first.tolist())
    assert stopped.shape[1] == 5  # every row stopped at once


def test_save_load_round_trip_and_determinism():
    model = memlm.build("gpt", **SMALL)
    assert testing.check_save_load(model, torch.randint(0, 97, (2, 16))) == 0.0
    curve1 = testing.loss_curve(lambda: memlm.build("gpt", **SMALL), 97, 16)
    curve2 = testing.loss_curve(lambda: memlm.build("gpt", **SMALL), 97, 16)
    assert curve1 == curve2


def test_gradient_reaches_every_parameter():
    model = memlm.build("gpt", **SMALL)
    assert testing.params_without_grad(model, torch.randint(0, 97, (2, 17))) == []


def test_parameter_counts_with_and_without_embeddings():
    model = memlm.build("gpt", **SMALL)
    emb = 97 * 64
    assert model.num_params() - model.num_params(non_embedding=True) == emb
    learned = memlm.build("gpt", **SMALL, pos_emb="learned")
    assert learned.num_params() - learned.num_params(non_embedding=True) == emb + 32 * 64


def test_residual_projections_use_scaled_init():
    model = memlm.build("gpt", **{**SMALL, "n_layer": 8, "d_model": 256})
    proj = model.decoder.blocks[0].attn.proj.weight.std().item()
    qkv = model.decoder.blocks[0].attn.qkv.weight.std().item()
    assert abs(qkv - 0.02) < 0.002
    assert abs(proj - 0.02 / 4) < 0.001


def test_bad_names_and_keys_get_clear_errors():
    with pytest.raises(UnknownNameError, match="gpt"):
        memlm.build("gtp")
    with pytest.raises(UnknownNameError, match="Did you mean 'n_layer'"):
        memlm.build("gpt", n_layers=2)
    with pytest.raises(ConfigError, match="divisible"):
        memlm.build("gpt", d_model=64, n_head=5)


def test_sequence_longer_than_context_is_refused():
    model = memlm.build("gpt", **SMALL)
    with pytest.raises(SequenceTooLongError, match="context_len=32"):
        model(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_rope_rotates_channel_pairs_by_position(dtype):
    """RoPE (done as a complex product) equals the textbook rotation of pairs (2i, 2i+1)."""
    from memlm.nn import RotaryEmbedding

    rope = RotaryEmbedding(head_dim=8, max_len=16)
    x = torch.randn(2, 3, 10, 8, dtype=dtype)
    out = rope(x, slice(4, 14))
    angle = torch.arange(4, 14).double()[:, None] / 10000.0 ** (torch.arange(0, 8, 2) / 8)
    x1, x2 = x[..., 0::2].double(), x[..., 1::2].double()
    want = torch.stack((x1 * angle.cos() - x2 * angle.sin(),
                        x1 * angle.sin() + x2 * angle.cos()), -1).flatten(-2)
    assert out.dtype == dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
    # per-row positions (a tensor) and a strided, non-contiguous input give the same rotation
    pos = torch.arange(4, 14).expand(2, 1, 10)
    strided = torch.randn(2, 10, 3, 8, dtype=dtype).transpose(1, 2)
    torch.testing.assert_close(rope(strided, pos), rope(strided.contiguous(), slice(4, 14)))


@pytest.mark.parametrize("pos_emb", ["rope", "learned"])
def test_run_blocks_in_slices_equals_the_whole_stack(pos_emb):
    """`Decoder.run_blocks` is the one block loop: slices, a shared KV cache and the
    after_block observer all give exactly the logits of the plain forward."""
    from memlm.models.backbones import MemlmBackbone
    from memlm.models.base import ForwardContext

    torch.manual_seed(0)
    model = memlm.build("gpt", **{**SMALL, "n_layer": 3}, pos_emb=pos_emb).eval()
    dec = model.decoder
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        want = model(ids).logits
        x = dec.embed(ids)
        seen = []
        whole = dec.run_blocks(x, ForwardContext(), after_block=lambda i, h: seen.append((i, h)))
        split = dec.run_blocks(dec.run_blocks(x, ForwardContext(), layers=slice(0, 1)),
                               ForwardContext(), layers=slice(1, None))
        assert torch.equal(dec.head(whole), want) and torch.equal(dec.head(split), want)
        assert [i for i, _ in seen] == [0, 1, 2] and torch.equal(seen[-1][1], whole)
        # a cache shared by the slices continues the sequence like one cached stack
        cache = model.make_cache(2, 32)
        first = dec.run_blocks(dec.embed(ids[:, :8]), ForwardContext(), cache, slice(0, 2))
        first = dec.run_blocks(first, ForwardContext(), cache, slice(2, None))
        rest = dec.run_blocks(dec.embed(ids[:, 8:], 8), ForwardContext(), cache)
        torch.testing.assert_close(dec.head(torch.cat([first, rest], 1)), want)
        # the recurrent backbone adapter runs the same loop on embeddings
        _, post = MemlmBackbone(model).run(dec.wte(ids))
        assert torch.equal(dec.lm_head(post), want)
