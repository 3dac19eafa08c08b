"""RMT/ARMT `sliding_window`: each segment also attends to the previous segment's text
keys/values (the ARMT code's `sliding_window=True`; docs/finetune.md).

Small random transformers models (GPT-2 with learned positions, Llama-3.2-shaped with GQA
and RoPE) and memlm's own `gpt` backbone. Checked: identity at init on the first segment,
causality in training and inference, reading in pieces / streaming / generating equal the
full forward, the previous segment's text reaches the next segment's first token with the
memory reset, rows reset one by one, the window survives a trainer checkpoint, and the
preset that uses it.
"""
from __future__ import annotations

import pytest
import torch

import memlm
from memlm.errors import ConfigError
from memlm.models.generation import Decoding
from memlm.models.streaming import read, read_segments, stream
from memlm.train.checkpoint import pack_state, unpack_state

transformers = pytest.importorskip("transformers")

V, L, M = 96, 8, 2


def hf_backbone(family: str):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    torch.manual_seed(0)
    if family == "gpt2":  # no dropout, so train-mode forwards are comparable
        cfg = GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                         bos_token_id=0, eos_token_id=0)
    else:
        cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                          max_position_embeddings=128, bos_token_id=0, eos_token_id=0,
                          rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 32})
    return AutoModelForCausalLM.from_config(cfg)


def build(kind: str, backbone: str, sliding: bool = True, **extra):
    """A wrapped model whose memory is not inert (ARMT's W_V starts at zero)."""
    mem = {"d_mem": 8} if kind == "armt" else {}
    if backbone == "gpt":
        torch.manual_seed(0)
        model = memlm.build(kind, vocab_size=V, n_layer=2, n_head=2, d_model=32, context_len=L,
                            num_mem_tokens=M, dropout=0.0, sliding_window=sliding, **mem, **extra)
    else:
        model = memlm.wrap(kind, hf_backbone(backbone), segment_len=L, num_mem_tokens=M,
                           sliding_window=sliding, **mem, **extra)
    return model


def wake_memory(model) -> None:
    """Give ARMT's value projections weights, as training would (they start at zero)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("memory.w_v.weight"):
                p.normal_(0, 0.2)


def ids(b: int = 2, t: int = 3 * L + 5, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, V, (b, t), generator=torch.Generator().manual_seed(seed))


CASES = [(k, b) for k in ("armt", "rmt") for b in ("gpt2", "llama", "gpt")]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_armt_is_the_backbone_on_the_first_segment(family):
    ref = hf_backbone(family).eval()
    model = build("armt", family).eval()
    x = ids()
    with torch.no_grad():
        got = model(x[:, :L]).logits
        want = ref(x[:, :L]).logits
        assert torch.allclose(got, want, atol=1e-5)
        # the second segment is not the backbone on that segment alone: it sees the first
        second = model(x[:, : 2 * L]).logits[:, L:]
        assert not torch.allclose(second, ref(x[:, L : 2 * L]).logits, atol=1e-3)


@pytest.mark.parametrize("kind, backbone", CASES)
def test_earlier_logits_ignore_later_tokens_in_training_and_inference(kind, backbone):
    model = build(kind, backbone)
    wake_memory(model)
    x = ids()
    cut = L + 3  # inside the second segment
    y = x.clone()
    y[:, cut:] = torch.randint(1, V, y[:, cut:].shape, generator=torch.Generator().manual_seed(9))
    model.train()
    a, b = model(x).logits, model(y).logits
    assert torch.allclose(a[:, :cut], b[:, :cut], atol=1e-6)
    assert not torch.allclose(a[:, cut:], b[:, cut:], atol=1e-3)
    model.eval()
    with torch.no_grad():
        for run in (lambda t: model(t).logits, lambda t: read(model, t).logits):
            a, b = run(x), run(y)
            assert torch.allclose(a[:, :cut], b[:, :cut], atol=1e-6)


@pytest.mark.parametrize("kind, backbone", CASES)
def test_reading_in_pieces_streaming_and_generating_equal_the_full_forward(kind, backbone):
    model = build(kind, backbone).eval()
    wake_memory(model)
    x = ids()
    with torch.no_grad():
        full = model(x, targets=x.roll(-1, 1))
        # the one segment loop, with the window carried in the state
        assert torch.allclose(read(model, x).logits, full.logits, atol=1e-5)
        # segment by segment through forward_segment
        state, parts = model.init_state(2), []
        for a in range(0, x.shape[1], L):
            out, state = model.forward_segment(x[:, a : a + L], state)
            parts.append(out.logits)
        assert torch.allclose(torch.cat(parts, 1), full.logits, atol=1e-5)
        # a token stream: the summed NLL of stream() is the full forward's
        row = x[0]
        steps = list(stream(model, row))
        nll = sum(s.nll_sum for s in steps)
        want = model(row[None, :-1], targets=row[None, 1:])
        assert nll == pytest.approx(float(want.lm_loss) * (row.numel() - 1), rel=1e-5)
        # generation's incremental reader (open segment + KV cache) gives the same logits
        reader = Decoding(model, 2, "cpu")
        first = reader.feed(x[:, : L + 3])
        inc = torch.cat([first] + [reader.feed(x[:, t : t + 1]) for t in range(L + 3, x.shape[1])], 1)
        assert torch.allclose(inc, full.logits[:, -inc.shape[1]:], atol=1e-5)
        # and greedy generation with and without the cache agrees
        assert torch.equal(model.generate(x, 12), model.generate(x, 12, use_cache=False))


@pytest.mark.parametrize("kind, backbone", CASES)
def test_a_segments_first_token_sees_the_previous_segment_with_the_memory_reset(kind, backbone):
    """reset_memory restarts the memory every segment (the control run); only the window
    can carry the first segment's text to the second segment's first token."""
    x = ids(1)
    y = x.clone()
    y[:, : L - 1] = (y[:, : L - 1] + 7) % (V - 1) + 1  # change the first segment's text
    for sliding in (True, False):
        model = build(kind, backbone, sliding=sliding).eval()
        wake_memory(model)
        with torch.no_grad():
            first = [[s.output.logits for s in read_segments(model, t, reset_memory=True)][1]
                     for t in (x, y)]
        attends = not torch.allclose(first[0][:, 0], first[1][:, 0], atol=1e-4)
        assert attends == sliding, (kind, backbone, sliding)


@pytest.mark.parametrize("kind", ["armt", "rmt"])
def test_rows_reset_alone_restart_exactly(kind):
    model = build(kind, "llama").eval()
    wake_memory(model)
    x = ids(3)
    with torch.no_grad():
        state = model(x[:, : 2 * L]).state
        reset = model.reset_state_rows(state, torch.tensor([False, True, False]))
        got = model(x[:, 2 * L : 3 * L], state=reset).logits
        fresh = model(x[1:2, 2 * L : 3 * L]).logits
        assert torch.allclose(got[1:2], fresh, atol=1e-5)
        full = model(x[:, : 3 * L]).logits[:, 2 * L :]
        assert torch.allclose(got[[0, 2]], full[[0, 2]], atol=1e-5)
        assert not torch.allclose(got[1:2], full[1:2], atol=1e-3)
        # generating from the partly reset state: the incremental reader agrees
        reader = Decoding(model, 3, "cpu", state=reset)
        inc = torch.cat([reader.feed(x[:, 2 * L : 2 * L + 2])]
                        + [reader.feed(x[:, t : t + 1]) for t in range(2 * L + 2, 3 * L)], 1)
        assert torch.allclose(inc, got, atol=1e-5)


def test_memlm_backbone_refuses_a_partial_reset_and_resets_all_rows():
    model = build("armt", "gpt").eval()
    with torch.no_grad():
        state = model(ids()[:, : 2 * L]).state
    with pytest.raises(ConfigError, match="memlm backbone"):
        model.reset_state_rows(state, torch.tensor([True, False]))
    fresh = model.reset_state_rows(state, torch.tensor([True, True]))
    assert fresh.window is None


def test_the_window_survives_a_trainer_checkpoint_and_detach():
    model = build("armt", "gpt2")
    state = model(ids()).state
    assert state.window is not None and state.window.length == 5  # the last segment: 29 - 3 L
    assert not any(k.requires_grad for k in state.window.keys)
    back = unpack_state(pack_state(model.detach_state(state)))
    assert type(back) is type(state) and type(back.window) is type(state.window)
    assert all(torch.equal(a, b) for a, b in zip(back.window.keys, state.window.keys))
    assert torch.equal(back.window.mask, state.window.mask)


def test_checkpointed_segments_give_the_same_loss_and_gradients():
    x = ids()
    grads = []
    for ckpt in (False, True):
        model = build("armt", "gpt2", checkpoint_segments=ckpt).train()
        wake_memory(model)
        loss = model(x, targets=x.roll(-1, 1)).loss
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()
                                      if p.grad is not None]))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads[0][1], grads[1][1]))


def test_learned_positions_must_fit_the_window():
    from transformers import AutoModelForCausalLM, GPT2Config

    small = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=V, n_positions=16, n_embd=32,
                                                        n_layer=1, n_head=4))
    memlm.wrap("armt", small, segment_len=L, num_mem_tokens=M, d_mem=8)  # 8 + 2 positions fit in 16; 8 + 2 + 8 do not
    small = AutoModelForCausalLM.from_config(small.config)
    with pytest.raises(ConfigError, match="sliding window"):
        memlm.wrap("armt", small, segment_len=L, num_mem_tokens=M, d_mem=8, sliding_window=True)


def test_the_llama_pg19_preset_uses_the_sliding_window():
    from memlm.config import load_run_config

    assert load_run_config("armt-llama-pg19-sliding").model.sliding_window is True


@pytest.mark.parametrize("kind, backbone", [(k, b) for k in ("armt", "rmt")
                                            for b in ("gpt2", "llama")])
def test_padding_in_the_previous_segment_is_not_attended_to(kind, backbone):
    """Left padding (a whole padded first segment in row 0, part of it in row 1): whatever
    the padded ids are, the real tokens' logits do not change, in later segments too."""
    model = build(kind, backbone).eval()
    wake_memory(model)
    x = ids()
    mask = torch.ones_like(x)
    mask[0, :L] = 0
    mask[1, :3] = 0
    y = torch.where(mask.bool(), x, (x + 5) % (V - 1) + 1)
    with torch.no_grad():
        a = model(x, attention_mask=mask).logits
        b = model(y, attention_mask=mask).logits
    real = mask.bool()
    assert torch.allclose(a[real], b[real], atol=1e-5)


def test_a_memlm_backbone_reads_padding_as_text_in_the_window_too():
    model = build("armt", "gpt").eval()
    x = ids()
    mask = torch.ones_like(x)
    mask[0, :L] = 0  # row 0's whole first segment is padding: still no error
    with torch.no_grad():
        out = model(x, attention_mask=mask)
    assert bool(out.state.window.mask.all())
