"""Every consumer of long text reads it through the one segment loop, and agrees.

The same text goes through model.stream, eval.stream, perplexity, recall, zero-shot
scoring, the transformers wrapper and DNC's memory modes; each must give the same
per-token NLL (or argmax) as the others, for every architecture. The segment cuts are
the model's own (`segment_alignment`), so a read in pieces equals one forward call.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import memlm
from memlm.eval import recall
from memlm.eval.memory_modes import memory_modes
from memlm.eval.perplexity import evaluate
from memlm.eval.stream import stream
from memlm.eval.zeroshot import MemlmLM
from memlm.models.streaming import read, read_segments, segment_bounds

V, L = 64, 8
ARCHS = memlm.architectures()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def build(arch: str, **extra):
    cfg = dict(vocab_size=V, n_layer=2, d_model=32, n_head=4, context_len=L)
    if arch in ("rmt", "armt"):
        cfg["num_mem_tokens"] = 2
    if arch == "armt":
        cfg["d_mem"] = 8
    torch.manual_seed(0)
    model = memlm.build(arch, **cfg, **extra)
    torch.manual_seed(1)
    with torch.no_grad():  # a live memory: random write paths make the carried state matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def stream_token_nll(model, ids: torch.Tensor) -> torch.Tensor:
    steps = list(model.stream(ids))
    return torch.cat([s.token_nll[0] for s in steps])


@pytest.mark.parametrize("arch", ARCHS)
def test_every_consumer_gets_the_same_per_token_nll(arch):
    model = build(arch)
    ids = torch.randint(0, V, (5 * L + 3,), generator=torch.Generator().manual_seed(2))
    ref = stream_token_nll(model, ids)  # [n - 1]: the NLL of tokens 1..n-1
    assert ref.shape == (ids.numel() - 1,)

    # eval.stream (the file streamer) on the same ids
    steps = list(stream(model, ids.numpy(), L))
    assert torch.allclose(torch.cat([s.token_nll[0] for s in steps]), ref, atol=1e-5)

    # perplexity: the mean of the same NLLs
    res = evaluate(model, ids, seq_len=L, batch_size=1, precision="fp32")
    assert math.isclose(res["nll"], float(ref.double().mean()), rel_tol=1e-5)

    if not model.is_stateful:
        return  # a stateless model's consumers differ on purpose (windows vs segments alone)
    # recall's greedy predictions are the argmax of the same logits
    logits = torch.cat([s.output.logits[0] for s in model.stream(ids)])
    preds = recall.greedy_predictions(model, ids.numpy(), seq_len=L, precision="fp32")
    assert np.array_equal(preds, logits.argmax(-1).numpy())
    # zero-shot scoring of the last 13 tokens, streamed with the memory carried
    pytest.importorskip("lm_eval")
    tok = type("Tok", (), {"vocab_size": V, "eot_id": 0})()
    lm = MemlmLM(model, tokenizer=tok, precision="fp32")
    total, _ = lm._score_streamed(ids.tolist(), 13)
    assert math.isclose(-total, float(ref[-13:].double().sum()), rel_tol=1e-5)

    # the transformers wrapper, one call over the whole text
    pytest.importorskip("transformers")
    from memlm.hf import MemlmForCausalLM

    hf = MemlmForCausalLM.from_memlm(model).eval()
    with torch.no_grad():
        out = hf(ids[None, :-1])
    nll = F.cross_entropy(out.logits[0].float(), ids[1:], reduction="none")
    assert torch.allclose(nll, ref, atol=1e-5)

    # memory modes: "carry" is the stream over the same full segments
    n_full = 4 * L
    modes = memory_modes(model, ids[: n_full + 1], seq_len=L) if arch == "dnc" else None
    if modes is not None:
        assert math.isclose(math.log(modes["ppl_carry"]), float(ref[:n_full].double().mean()),
                            rel_tol=1e-5)


@pytest.mark.parametrize("align", ["left", "right", "center"])
def test_the_cuts_are_the_models_own(align):
    """A read in pieces cuts where one forward call cuts (the model's segment_alignment),
    so every consumer's logits equal `model(ids)`: before, recall cut from the end
    whatever the model did, and its logits differed from the model's own reading."""
    model = build("armt", segment_alignment=align)
    ids = torch.randint(0, V, (1, 4 * L + 3), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = model(ids, state=model.init_state(1)).logits
        starts = [s.start for s in read_segments(model, ids)]
        assert starts == [a for a, _ in segment_bounds(ids.shape[1], L, align)]
        assert torch.allclose(read(model, ids).logits, whole, atol=1e-5)
        assert torch.allclose(recall._read_fresh(model, ids, L), whole, atol=1e-5)
    # a token stream of known length is cut the same way
    tokens = torch.cat([ids[0], torch.zeros(1, dtype=torch.long)])
    steps = list(model.stream(tokens))
    assert [s.start for s in steps] == starts
    assert torch.allclose(torch.cat([s.output.logits for s in steps], 1), whole, atol=1e-5)


def test_an_open_ended_stream_needs_left_cuts():
    model = build("rmt", segment_alignment="right")
    chunks = iter([np.arange(20) % V, np.arange(7) % V])
    with pytest.raises(memlm.errors.DataError, match="right-aligned"):
        next(model.stream(chunks))


def test_stateless_window_reads_the_segment_with_earlier_context():
    model = build("gpt")
    ids = torch.randint(0, V, (1, 3 * L), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        steps = list(read_segments(model, ids, segment_len=L // 2, window=L))
        for s in steps:
            end = s.start + s.output.logits.shape[1]
            want = model(ids[:, max(0, end - L) : end]).logits[:, -(end - s.start):]
            assert torch.allclose(s.output.logits, want, atol=1e-6)


def test_reset_memory_starts_every_segment_fresh():
    model = build("armt")
    ids = torch.randint(0, V, (2, 3 * L), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reset = [s.output.logits for s in read_segments(model, ids, reset_memory=True)]
        alone = [model(ids[:, a : a + L], state=model.init_state(2)).logits
                 for a in range(0, 3 * L, L)]
        carried = [s.output.logits for s in read_segments(model, ids)]
    assert all(torch.allclose(r, a, atol=1e-6) for r, a in zip(reset, alone))
    assert not torch.allclose(carried[2], alone[2], atol=1e-4)
