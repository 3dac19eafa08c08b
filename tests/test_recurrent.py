"""RMT and ARMT: segment recurrence around memlm's GPT and Hugging Face causal LMs.

The properties proven here (the design: docs/recurrent.md):
causality across segments, exact identity of a freshly wrapped ARMT, the delta rule,
truncated BPTT that really truncates, the wrapper contract, frozen backbones that stay
frozen, save/load, and generation that equals recomputation.
"""

import copy
import json

import pytest
import torch

import memlm
from memlm import testing
from memlm.errors import ConfigError
from memlm.memory.associative import (
    AssociativeLayer,
    AssociativeMemory,
    MemoryCall,
    MemoryContextError,
    feature_map,
    find_layers,
    memory_call,
    read_stacked,
)
from memlm.models.armt import ARMT
from memlm.models.base import MemLM
from memlm.models.recurrent import segment_bounds
from memlm.models.rmt import RMT
from memlm.types import IGNORE_INDEX

V, L, M = 97, 8, 4
SMALL = dict(vocab_size=V, n_layer=2, d_model=64, n_head=4, context_len=L, num_mem_tokens=M)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest (and steadiest on a busy machine) on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def build(kind: str, **kw) -> MemLM:
    extra = {"d_mem": 16} if kind == "armt" else {}
    return memlm.build(kind, **{**SMALL, **extra, **kw})


def randomize_memory(model: ARMT, std: float = 0.2) -> None:
    """Give W_V (zero at init) values, so the memory actually stores something."""
    with torch.no_grad():
        for layer in model.backbone.layers():
            layer.memory.w_v.weight.normal_(0, std)


def hf_gpt2(n_positions: int = 64):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=V, n_positions=n_positions,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def hf_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, vocab_size=V,
                      max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
    return LlamaForCausalLM(cfg).eval()


HF = {"gpt2": hf_gpt2, "llama": hf_llama}


def plain_gpt_like(model: ARMT):
    """The memlm GPT inside an ARMT, rebuilt without the layer wrappers (same weights)."""
    c = model.config
    ref = memlm.build("gpt", vocab_size=V, n_layer=c.n_layer, d_model=c.d_model,
                      n_head=c.n_head, context_len=c.segment_len + c.num_mem_tokens)
    weights = {k.replace(".layer.", "."): v
               for k, v in model.backbone.model.state_dict().items() if ".memory." not in k}
    ref.load_state_dict(weights)
    return ref.eval()


# ----- shared checks ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["rmt", "armt"])
def test_causal_across_segments_in_training_and_inference(kind):
    model = build(kind)
    if kind == "armt":
        randomize_memory(model)
    testing.assert_causal(model, V, 3 * L)  # cuts inside segment 0, 1 and 2
    assert testing.check_generation_causality(model, V, prompt_len=5, new=14) < 1e-5


@pytest.mark.parametrize("kind", ["rmt", "armt"])
def test_save_load_round_trip_and_determinism(kind, tmp_path):
    model = build(kind)
    if kind == "armt":
        randomize_memory(model)
    ids = torch.randint(0, V, (2, 3 * L))
    assert testing.check_save_load(model, ids) == 0.0
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["memory_config"]
    assert saved["kind"] == kind and saved["segment_len"] == L
    assert saved["num_mem_tokens"] == M and saved["layers_attr"] == "decoder.blocks"
    if kind == "armt":
        assert {"key_norm", "correction", "use_denom", "d_mem"} <= set(saved)
    curve = [testing.loss_curve(lambda: build(kind), V, 2 * L) for _ in range(2)]
    assert curve[0] == curve[1]


@pytest.mark.parametrize("kind", ["rmt", "armt"])
def test_registered_stateful_archs_take_any_length(kind):
    assert kind in memlm.architectures()
    model = build(kind)
    assert model.is_stateful and model.config.segment_len == L
    out = model(torch.randint(0, V, (2, 5 * L + 3)))  # far beyond context_len
    assert out.logits.shape == (2, 5 * L + 3, V)
    if kind == "armt":
        randomize_memory(model)  # with W_V = 0 nothing is stored, so W_Q/W_K/w_beta get no grad
    assert testing.params_without_grad(model, torch.randint(0, V, (2, 3 * L + 1))) == []


def test_segment_bounds_place_the_short_segment_by_alignment():
    assert segment_bounds(10, 4, "left") == [(0, 4), (4, 8), (8, 10)]
    assert segment_bounds(10, 4, "right") == [(0, 2), (2, 6), (6, 10)]
    assert segment_bounds(10, 4, "center") == [(0, 4), (4, 8), (8, 10)]
    assert segment_bounds(9, 4, "center") == [(0, 3), (3, 6), (6, 9)]


# ----- ARMT: identity at init, the delta rule ---------------------------------------------


@pytest.mark.parametrize("n_segments", [1, 2, 5])
def test_armt_is_exactly_its_backbone_at_init(n_segments):
    model = build("armt").eval()
    ref = plain_gpt_like(model)
    ids = torch.randint(0, V, (2, n_segments * L))
    with torch.no_grad():
        out = model(ids)
        per_segment = torch.cat([ref(ids[:, a : a + L]).logits for a in range(0, ids.shape[1], L)],
                                dim=1)
    assert (out.logits - per_segment).abs().max() < 1e-5
    assert all(torch.count_nonzero(layer.A) == 0 for layer in out.state.layers)
    assert out.metrics["armt_read_share"] == 0.0


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_wrapped_hf_model_is_exactly_the_model_at_init(name):
    hf = HF[name]()
    ref = copy.deepcopy(hf)
    model = memlm.wrap("armt", hf, segment_len=L, num_mem_tokens=M, d_mem=16).eval()
    assert model.config.layers_attr == {"gpt2": "transformer.h", "llama": "model.layers"}[name]
    for n_segments in (1, 2, 5):
        ids = torch.randint(0, V, (2, n_segments * L))
        with torch.no_grad():
            out = model(ids)
            expect = torch.cat([ref(ids[:, a : a + L]).logits for a in range(0, ids.shape[1], L)], 1)
        assert (out.logits - expect).abs().max() < 1e-5
        assert all(torch.count_nonzero(layer.A) == 0 for layer in out.state.layers)


def test_first_segment_needs_no_special_case():
    """Reading an empty memory adds exactly zero, so segment 0 ignores every memory weight."""
    model = build("armt").eval()
    ids = torch.randint(0, V, (2, L))
    with torch.no_grad():
        before = model(ids).logits
        randomize_memory(model)
        for layer in model.backbone.layers():
            layer.memory.w_q.weight.normal_(0, 1.0)
        after = model(ids).logits
        hidden = torch.randn(2, L, 64)
        memory = model.backbone.layers()[0].memory
        read = memory.read(hidden, memory.init_state(2))
    assert torch.equal(before, after)
    assert torch.equal(read, torch.zeros_like(read))


def test_delta_rule_rewriting_a_stored_pair_changes_nothing():
    torch.manual_seed(0)
    mem = AssociativeMemory(d_model=32, d_mem=8, order=3)
    with torch.no_grad():
        mem.w_v.weight.normal_(0, 0.5)
        mem.w_beta.bias.fill_(30.0)  # beta = sigmoid(~30) = 1 in float32
        mem.w_q.weight.copy_(mem.w_k.weight)  # query with the same features as the key
    x = torch.randn(1, 1, 32)
    first, stats1 = mem.write(x, mem.init_state(1))
    second, stats2 = mem.write(x, first)
    # gamma = 1 - (s + eps) / (|k|^2 + eps): just below 1 for a new key (paper code's form)
    assert stats1["gamma_mean"] > 0.999 and stats2["gamma_mean"] < 1e-4
    assert (second.z - first.z).abs().max() < 1e-4 * first.z.abs().max()
    assert (second.A - first.A).norm() < 1e-4 * first.A.norm()
    # and the memory returns the stored value for its key
    stored = torch.nn.functional.linear(x, mem.w_v.weight)
    recalled = mem.read(x, first)
    assert torch.nn.functional.cosine_similarity(recalled, stored, dim=-1).item() > 0.999
    phi = feature_map(torch.randn(5, 8), 3, "l2")
    assert torch.allclose(phi.norm(dim=-1), torch.ones(5)) and phi.shape == (5, 48)
    assert (phi >= 0).all()


def test_memory_capacity_bounds_the_state_without_changing_reads():
    """mem_capacity: over many writes z's mass stays within capacity x one write's key
    mass, and the joint rescale of (A, z) leaves what the memory returns unchanged."""
    torch.manual_seed(0)
    bounded = AssociativeMemory(d_model=32, d_mem=8, order=3, key_norm="none", capacity=4.0)
    free = AssociativeMemory(d_model=32, d_mem=8, order=3, key_norm="none", capacity=None)
    free.load_state_dict(bounded.state_dict())
    with torch.no_grad():
        for mem in (bounded, free):
            mem.w_v.weight.copy_(torch.eye(32))
    sb, sf = bounded.init_state(2), free.init_state(2)
    x = torch.randn(2, 3, 32)
    for _ in range(60):
        x = torch.randn(2, 3, 32)
        sb, _ = bounded.write(x, sb)
        sf, _ = free.write(x, sf)
    mass = bounded._features(x, bounded.w_k).sum(dim=(1, 3))
    assert (sb.z.sum(-1) <= 4.0 * mass * (1 + 1e-5)).all()
    assert sf.z.sum() > 1.5 * sb.z.sum()  # unbounded keeps growing
    # a joint rescale does not change reads
    q = torch.randn(2, 5, 32)
    half = type(sb)(sb.A * 0.5, sb.z * 0.5)
    assert torch.allclose(bounded.read(q, sb), bounded.read(q, half), rtol=1e-3, atol=1e-5)
    assert torch.isfinite(sb.A).all() and torch.isfinite(sf.A).all()


def test_read_cap_bounds_every_read_relative_to_its_hidden_state():
    """read_cap: no position's read exceeds cap x its hidden norm; reads already below
    the cap are unchanged, in the per-layer and the stacked (all layers at once) read."""
    torch.manual_seed(0)
    free = AssociativeMemory(d_model=32, d_mem=8, order=3)
    capped = AssociativeMemory(d_model=32, d_mem=8, order=3, read_cap=0.5)
    capped.load_state_dict(free.state_dict())
    with torch.no_grad():
        for mem in (free, capped):
            mem.w_v.weight.copy_(4 * torch.eye(32))
    state = free.init_state(2)
    state, _ = free.write(torch.randn(2, 3, 32), state)
    h = torch.randn(2, 6, 32)
    h[:, :3] *= 50  # large hidden states: their reads stay under the cap
    raw, cut = free.read(h, state), capped.read(h, state)
    share = cut.norm(dim=-1) / h.norm(dim=-1)
    assert (share <= 0.5 + 1e-5).all()
    big = raw.norm(dim=-1) / h.norm(dim=-1) > 0.5
    assert big.any() and (~big).any()  # the test covers both cases
    assert torch.allclose(cut[~big], raw[~big])
    assert torch.allclose(cut[big] / cut[big].norm(dim=-1, keepdim=True),
                          raw[big] / raw[big].norm(dim=-1, keepdim=True), atol=1e-5)
    stacked = read_stacked(capped, capped.w_q.weight[None], h[None], state.A[None],
                           state.z[None])[0]
    assert torch.allclose(stacked, cut, atol=1e-5)
    with pytest.raises(ConfigError, match="read_cap"):
        AssociativeMemory(d_model=32, d_mem=8, read_cap=0.0)


def test_write_gate_bias_sets_the_initial_write_strength():
    """write_gate_bias: beta starts at sigmoid(bias) in every layer; null keeps the
    default init (so models built before the field existed are unchanged)."""
    torch.manual_seed(0)
    default = build("armt")
    torch.manual_seed(0)
    open_gate = build("armt", write_gate_bias=2.0)
    for layer in open_gate.backbone.layers():
        assert torch.equal(layer.memory.w_beta.bias, torch.full_like(layer.memory.w_beta.bias, 2.0))
    # everything but the gate's bias is the same draw
    sd, so = default.state_dict(), open_gate.state_dict()
    assert all(torch.equal(sd[k], so[k]) for k in sd if not k.endswith("w_beta.bias"))
    ids = torch.randint(0, V, (2, 2 * L))
    with torch.no_grad():
        out = open_gate(ids)
    beta = torch.sigmoid(torch.tensor(2.0)).item()
    assert abs(out.metrics["armt_beta_mean"].item() - beta) < 0.1


def test_armt_extra_parameters_follow_the_spec_formula():
    d, d_mem, n_layer = 64, 16, 2
    plain = memlm.build("gpt", vocab_size=V, n_layer=n_layer, d_model=d, n_head=4)
    wrapped = build("armt")
    extra = n_layer * (2 * d * d_mem + d * d + d + 1) + M * d
    assert wrapped.num_params() - plain.num_params() == extra


def test_padding_only_rows_keep_their_memory_bit_identical():
    model = build("armt").eval()
    randomize_memory(model)
    ids = torch.randint(0, V, (2, 2 * L))
    mask = torch.ones(2, 2 * L, dtype=torch.long)
    mask[1, L:] = 0  # row 1 has no real token in segment 1
    with torch.no_grad():
        after_first = model(ids[:, :L]).state
        out = model(ids[:, L:], state=after_first, attention_mask=mask[:, L:])
    for old, new in zip(after_first.layers, out.state.layers):
        assert torch.equal(old.A[1], new.A[1]) and torch.equal(old.z[1], new.z[1])
        assert not torch.equal(old.A[0], new.A[0])


def test_right_padding_changes_no_real_logits_with_hf_masks():
    model = memlm.wrap("armt", hf_gpt2(), segment_len=L, num_mem_tokens=M, d_mem=16).eval()
    randomize_memory(model)
    ids = torch.randint(0, V, (1, 2 * L))
    padded = torch.cat([ids[:, : 2 * L - 3], torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.ones(1, 2 * L, dtype=torch.long)
    mask[:, -3:] = 0
    with torch.no_grad():
        full = model(ids[:, : 2 * L - 3]).logits
        pad = model(padded, attention_mask=mask).logits[:, : 2 * L - 3]
    assert (full - pad).abs().max() < 1e-5


def test_state_is_float32_under_bf16_autocast_and_close_to_fp32():
    model = build("armt").eval()
    randomize_memory(model, std=0.05)
    ids = torch.randint(0, V, (1, 40 * L))
    with torch.no_grad():
        exact = model(ids).state
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(ids).state
    for a, b in zip(exact.layers, low.layers):
        assert b.A.dtype == torch.float32 and b.z.dtype == torch.float32
        assert (a.A - b.A).norm() / a.A.norm() < 1e-2
        assert (a.z - b.z).norm() / a.z.norm() < 1e-2


# ----- truncated BPTT ------------------------------------------------------------------------


def segment_embedding_grads(model, ids, targets, **forward_kw):
    """Gradient of the loss w.r.t. each segment's input embeddings (None when unreachable)."""
    captured = []

    def keep(module, args, output):
        output.retain_grad()
        captured.append(output)

    handle = model.backbone.input_embeddings().register_forward_hook(keep)
    try:
        model(ids, targets=targets, **forward_kw).loss.backward()
    finally:
        handle.remove()
    return [e.grad for e in captured]


@pytest.mark.parametrize("kind", ["rmt", "armt"])
def test_bptt_depth_really_truncates(kind):
    ids = torch.randint(0, V, (2, 3 * L))
    targets = torch.full_like(ids, IGNORE_INDEX)
    targets[:, 2 * L :] = torch.randint(0, V, (2, L))  # only segment 2 is scored

    def grads(depth):
        torch.manual_seed(0)
        model = build(kind, bptt_depth=depth)
        if kind == "armt":
            randomize_memory(model)
        return segment_embedding_grads(model, ids, targets)

    g = grads(1)
    assert g[1].abs().sum() > 0 and torch.count_nonzero(g[0]) == 0
    g = grads(-1)
    assert g[1].abs().sum() > 0 and g[0].abs().sum() > 0
    g = grads(0)
    assert torch.count_nonzero(g[0]) == 0 and torch.count_nonzero(g[1]) == 0
    assert g[2].abs().sum() > 0


def test_stream_mode_detach_stops_gradient_at_the_segment_boundary():
    """What the trainer does with bptt_window=1: detach between calls, one segment each."""
    model = build("armt")
    randomize_memory(model)
    ids = torch.randint(0, V, (2, 2 * L + 1))
    captured = []

    def keep(module, args, output):
        output.retain_grad()
        captured.append(output)

    handle = model.backbone.input_embeddings().register_forward_hook(keep)
    try:
        first = model(ids[:, :L])
        state = model.detach_state(first.state)
        model(ids[:, L:-1], targets=ids[:, L + 1 :], state=state).loss.backward()
    finally:
        handle.remove()
    assert captured[0].grad is None and captured[1].grad.abs().sum() > 0


def leaves(state) -> list[torch.Tensor]:
    if state is None:  # an unused optional field (the sliding window when off)
        return []
    return [state] if torch.is_tensor(state) else [t for part in state for t in leaves(part)]


def test_reset_state_rows_restarts_only_the_flagged_rows():
    for kind in ("rmt", "armt"):
        model = build(kind)
        if kind == "armt":
            randomize_memory(model)
        with torch.no_grad():
            state = model(torch.randint(0, V, (3, 2 * L))).state
            reset = model.reset_state_rows(state, torch.tensor([False, True, False]))
            fresh = model.init_state(3)
        for old, new, init in zip(leaves(state), leaves(reset), leaves(fresh)):
            assert torch.equal(new[1], init[1]) and torch.equal(new[0], old[0])


# ----- RMT layout ----------------------------------------------------------------------------


def test_rmt_memory_comes_from_the_write_positions_after_or_before_the_final_norm():
    ids = torch.randint(0, V, (2, L))
    post = build("rmt").eval()
    with torch.no_grad():
        mem = post(ids).state.memory  # LayerNorm output at init: zero mean, unit variance
    assert mem.shape == (2, M, 64)
    assert mem.mean(-1).abs().max() < 1e-4 and (mem.var(-1, unbiased=False) - 1).abs().max() < 0.05
    pre = build("rmt", memory_from="pre_norm").eval()
    pre.load_state_dict(post.state_dict())
    with torch.no_grad():
        out = pre(ids)
        raw = out.state.memory
        final_norm = pre.backbone.decoder.ln_f
        assert torch.allclose(final_norm(raw), mem, atol=1e-5)  # same positions, before the norm
        assert out.logits.shape == (2, L, V)  # read and write positions are not scored


# ----- generation ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["rmt", "armt"])
def test_cached_generation_rolls_over_and_equals_recomputation(kind):
    model = build(kind).eval()
    if kind == "armt":
        randomize_memory(model)
    prompt = torch.randint(0, V, (2, L + 3))  # the prompt already spans two segments
    cached = model.generate(prompt, 3 * L, use_cache=True)
    assert torch.equal(cached, model.generate(prompt, 3 * L, use_cache=False))
    with torch.no_grad():  # teacher forcing over the whole text predicts the same tokens
        logits = model(cached[:, :-1]).logits
    assert torch.equal(logits[:, prompt.shape[1] - 1 :].argmax(-1), cached[:, prompt.shape[1] :])


# ----- Hugging Face backbones, the wrapper contract -----------------------------------------


@pytest.mark.parametrize("name,kind", [("gpt2", "rmt"), ("llama", "armt"), ("llama", "rmt")])
def test_hf_wrappers_generate_and_round_trip(name, kind, tmp_path):
    extra = {"d_mem": 16} if kind == "armt" else {}
    model = memlm.wrap(kind, HF[name](), segment_len=L, num_mem_tokens=M, **extra).eval()
    if kind == "armt":
        randomize_memory(model)
    prompt = torch.randint(0, V, (1, 5))
    assert torch.equal(model.generate(prompt, 2 * L), model.generate(prompt, 2 * L, use_cache=False))
    ids = torch.randint(0, V, (2, 3 * L))
    assert testing.check_save_load(model, ids) == 0.0
    model.save_pretrained(tmp_path)
    loaded = MemLM.from_pretrained(tmp_path)
    assert type(loaded) is type(model) and loaded.config.backbone == "hf"
    assert type(loaded.backbone.model) is type(model.backbone.model)


class RecordingLayer(torch.nn.Module):
    def __init__(self, as_tuple: bool):
        super().__init__()
        self.as_tuple, self.seen = as_tuple, None

    def forward(self, hidden, *args, **kwargs):
        self.seen = (args, kwargs)
        return (hidden * 2, "extra") if self.as_tuple else hidden * 2


@pytest.mark.parametrize("as_tuple", [True, False])
def test_layer_wrapper_passes_arguments_and_returns_the_result_unchanged(as_tuple):
    inner = RecordingLayer(as_tuple)
    memory = AssociativeMemory(16, 4)
    wrapper = AssociativeLayer(inner, memory, index=0, group=-7)
    hidden = torch.randn(2, 5, 16)
    call = MemoryCall(-7, (memory.init_state(2),), write=True, mem_start=3)
    with memory_call(call):
        result = wrapper(hidden, "mask", position_ids=torch.arange(5), flag=True)
    args, kwargs = inner.seen
    assert args == ("mask",) and set(kwargs) == {"position_ids", "flag"}
    assert (result[1] == "extra") if as_tuple else torch.is_tensor(result)
    assert call.state_out[0] is not None
    with pytest.raises(MemoryContextError, match="outside"):
        wrapper(hidden)


def test_wrapping_errors_name_the_fix():
    with pytest.raises(ConfigError, match="transformer.h.*layers_attr"):
        find_layers(torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match=r"L=14.*m=4.*n_positions=16"):
        memlm.wrap("armt", hf_gpt2(n_positions=16), segment_len=14, num_mem_tokens=4)
    with pytest.raises(ConfigError, match="n_positions=16"):
        memlm.wrap("rmt", hf_gpt2(n_positions=16), segment_len=10, num_mem_tokens=4)
    with pytest.raises(ConfigError, match="memlm.build"):
        memlm.wrap("armt", memlm.build("gpt", vocab_size=V, n_layer=1, d_model=32))
    model = memlm.wrap("armt", hf_gpt2(), segment_len=L, num_mem_tokens=M, d_mem=16)
    with pytest.raises(MemoryContextError):
        model.backbone.model(torch.randint(0, V, (1, 4)))  # the bare backbone: no memory call
    hf = model.backbone.model
    getattr(hf, "activation_checkpointing_enable", hf.gradient_checkpointing_enable)()
    with pytest.raises(ConfigError, match="gradient checkpointing"):
        model(torch.randint(0, V, (1, 4)))


@pytest.mark.parametrize("kind,backbone", [("armt", "memlm"), ("rmt", "gpt2")])
def test_training_only_memory_leaves_the_backbone_bit_identical(kind, backbone):
    if backbone == "memlm":
        model = build(kind, trainable="memory")
    else:
        model = memlm.wrap(kind, hf_gpt2(), segment_len=L, num_mem_tokens=M, trainable="memory")
    memory = {id(p) for p in model.memory_parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == memory and len(memory) > 0
    base = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in memory}
    mem_before = [p.detach().clone() for p in model.memory_parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, V, (2, 3 * L + 1))
    model(ids[:, :-1], targets=ids[:, 1:]).loss.backward()
    opt.step()
    for name, p in model.named_parameters():
        if name in base:
            assert torch.equal(p, base[name]), f"{name} changed although it is frozen"
    assert any(not torch.equal(a, b) for a, b in zip(mem_before, model.memory_parameters()))
    assert isinstance(model, (ARMT, RMT))


def test_trained_armt_reads_2000_segments_of_real_text_with_bounded_memory():
    """Memory stability (issue 14, item 2): a tiny ARMT trained briefly on WikiText-2
    streams 2,000 further segments with finite, bounded (A, z) and no degenerate output."""
    from tests.conftest import shared_path

    text = (shared_path("wikitext-2") / "test.txt").read_bytes()
    data = torch.tensor(list(text[:400_000]), dtype=torch.long)
    torch.manual_seed(0)
    seg = 16
    model = memlm.build("armt", vocab_size=256, n_layer=2, n_head=2, d_model=32,
                        context_len=seg, segment_len=seg, num_mem_tokens=4, d_mem=8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):  # 4-segment windows, so the memory path is trained too
        starts = torch.randint(0, 200_000, (8,))
        x = torch.stack([data[s: s + 4 * seg] for s in starts.tolist()])
        y = torch.stack([data[s + 1: s + 4 * seg + 1] for s in starts.tolist()])
        loss = model(x, targets=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model.memory_parameters()[1].abs().sum() > 0  # W_V left zero: memory in use
    model.eval()
    state, a_norms, z_sums, losses = model.init_state(1), [], [], []
    preds: dict[str, list[int]] = {"early": [], "late": []}
    stream = data[200_000:]
    with torch.no_grad():
        for s in range(2000):
            x = stream[s * seg:(s + 1) * seg][None]
            y = stream[s * seg + 1:(s + 1) * seg + 1][None]
            out = model(x, targets=y, state=state)
            state = out.state
            a_norms.append(max(float(m.A.norm()) for m in state.layers))
            z_sums.append(max(float(m.z.sum()) for m in state.layers))
            losses.append(float(out.loss))
            if s < 100 or s >= 1900:
                preds["early" if s < 100 else "late"] += out.logits.argmax(-1)[0].tolist()
    assert float(out.metrics["armt_read_share"]) > 0  # the memory is read at segment 2,000
    a, z = torch.tensor(a_norms), torch.tensor(z_sums)
    assert torch.isfinite(a).all() and torch.isfinite(z).all()
    assert a[1000:].max() < 4 * a[100:1000].max()  # flat, not growing with length
    assert z[1000:].max() < 4 * z[100:1000].max()
    # not "ooooo": the late predictions are no more dominated by one token than the early
    # ones (a briefly trained byte model mostly predicts spaces anyway, so the reference is
    # its own behaviour at the start). The count of distinct predicted tokens is no test:
    # it is 1-8 out of 1,600 here and flips with float rounding (seeds 0-3, issue 18)
    top = {k: max(v.count(p) for p in set(v)) / len(v) for k, v in preds.items()}
    assert top["late"] < top["early"] + 0.1
    late, early = sum(losses[1800:]) / 200, sum(losses[100:300]) / 200
    assert late < 1.25 * early
