"""lm-eval scores a memlm model the same through its own HFLM class and through memlm's adapter.

Two roads to a zero-shot number:
  (a) memlm's adapter: `run_zeroshot(model, memlm_tokenizer, ...)` (memlm/eval/zeroshot.py);
  (b) lm-eval's stock HF model: `HFLM(pretrained=<saved folder>, tokenizer=<transformers
      tokenizer>)`, which loads the folder through AutoModelForCausalLM (memlm/hf/).
Both run the very same lm-eval task object built from ../shared/data/zeroshot, so any
difference comes from tokenisation, truncation, batching or the model wrapper. The tests
compare accuracies and every request's log-likelihood.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import shared_path

import memlm
from memlm.data.tokenizers import make_tokenizer
from memlm.errors import SequenceTooLongError

pytest.importorskip("transformers")
pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[eval]')")
pytest.importorskip("accelerate", reason="lm-eval's HFLM needs accelerate (pip install -e '.[eval]')")
huggingface = pytest.importorskip("lm_eval.models.huggingface",
                                  reason="lm-eval's HF backend does not import")

from memlm.eval.zeroshot import MemlmLM, build_task, evaluate_tasks, run_zeroshot  # noqa: E402
from memlm.hf import MemlmForCausalLM, transformers_tokenizer  # noqa: E402

LIMIT = 10
SIZE = dict(n_layer=1, d_model=32, n_head=2)


@pytest.fixture(scope="module")
def zeroshot_dir():
    return shared_path("zeroshot")


@pytest.fixture(scope="module")
def gpt2_pair():
    """memlm's gpt2 tokenizer and its transformers twin (the same 50,257 ids)."""
    tok = make_tokenizer(f"gpt2:{shared_path('gpt2-bpe')}")
    return tok, transformers_tokenizer(tok)


@pytest.fixture(scope="module")
def byte_pair():
    tok = make_tokenizer("byte")
    return tok, transformers_tokenizer(tok)


def tiny(arch: str, vocab_size: int, context_len: int, **extra) -> memlm.MemLM:
    torch.manual_seed(0)
    model = memlm.build(arch, vocab_size=vocab_size, context_len=context_len, **SIZE, **extra)
    if arch == "armt":
        # ARMT starts with W_V = 0, i.e. an empty memory that changes nothing; random
        # values make what the memory carries show up in every score
        with torch.no_grad():
            for layer in model.backbone.layers():
                torch.nn.init.normal_(layer.memory.w_v.weight, std=0.5)
    return model.eval()


def hflm(pretrained, hf_tok, **kwargs):
    # device="cpu": HFLM's default device is "cuda", which a CPU-only torch cannot take
    return huggingface.HFLM(pretrained=pretrained, tokenizer=hf_tok, batch_size=4,
                            backend="causal", device="cpu", **kwargs)


def requests(task: str, zeroshot_dir) -> list:
    """The loglikelihood requests lm-eval builds for the first LIMIT items of `task`."""
    t = build_task(task, zeroshot_dir, limit=LIMIT)
    t.build_all_requests(limit=None, rank=0, world_size=1)
    return t.instances


def lengths(reqs, tok) -> list[int]:
    return [len(tok.encode(r.args[0] + r.args[1])) for r in reqs]


def assert_same_scores(ours, theirs):
    """Same log-likelihoods up to float32 summation order (long items sum ~400 terms)."""
    assert len(ours) == len(theirs)
    for (a, greedy_a), (b, greedy_b) in zip(ours, theirs):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-4)
        assert greedy_a == greedy_b


# ----- the tokenizer bridge ------------------------------------------------------------------
def test_converted_tokenizers_give_memlm_ids(zeroshot_dir, gpt2_pair, byte_pair):
    texts = []
    for name in ("arc_easy", "piqa", "hellaswag", "winogrande"):
        with (zeroshot_dir / f"{name}.jsonl").open(encoding="utf-8") as f:
            texts += [json.dumps(json.loads(next(f)), ensure_ascii=False) for _ in range(20)]
    # memlm reads "<|endoftext|>" in text as text; spaces, newlines, non-ASCII, emoji
    texts += ["<|endoftext|> text", "  two spaces\n\nnewlines ", "héllo wörld 🙂", "Ā"]
    char = make_tokenizer("char", text="".join(texts))
    bpe = make_tokenizer("bpe:300", text="".join(texts))
    for tok, hf_tok in (gpt2_pair, byte_pair, (char, transformers_tokenizer(char)),
                        (bpe, transformers_tokenizer(bpe))):
        assert hf_tok.eos_token_id == tok.eot_id, tok.name
        for text in texts:
            assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text), (tok.name,
                                                                                      text)
        assert hf_tok.decode(tok.encode(texts[0])) == texts[0]


# ----- same task, same numbers ----------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt", "armt"])
def test_hflm_on_a_saved_folder_matches_memlms_adapter(arch, tmp_path, zeroshot_dir, gpt2_pair,
                                                        byte_pair):
    """gpt with GPT-2 BPE, armt with bytes (several memory segments inside one call)."""
    if arch == "gpt":
        (tok, hf_tok), model = gpt2_pair, tiny("gpt", 50257, 128)
    else:
        (tok, hf_tok), model = byte_pair, tiny("armt", 256, 512, segment_len=64,
                                               num_mem_tokens=2, d_mem=8)
    reqs = requests("piqa", zeroshot_dir)
    assert max(lengths(reqs, tok)) < model.config.context_len  # nothing is cut on either road
    model.save_pretrained(tmp_path)
    lm = hflm(str(tmp_path), hf_tok)  # AutoConfig + AutoModelForCausalLM inside lm-eval
    assert isinstance(lm.model, MemlmForCausalLM)

    ours = run_zeroshot(model, tok, ["piqa"], limit=LIMIT, zeroshot_dir=zeroshot_dir)["piqa"]
    theirs = evaluate_tasks(lm, ["piqa"], limit=LIMIT, zeroshot_dir=zeroshot_dir)["piqa"]
    assert ours["n"] == theirs["n"] == LIMIT
    assert (ours["acc"], ours["acc_norm"]) == (theirs["acc"], theirs["acc_norm"])
    # accuracies of a random model could agree by luck: the scores themselves must agree
    assert_same_scores(MemlmLM(model, tok, batch_size=4).loglikelihood(reqs),
                       lm.loglikelihood(reqs))


def test_long_items_are_cut_alike_for_a_stateless_model(zeroshot_dir, gpt2_pair):
    """Both roads keep the last context_len tokens of an item longer than the window."""
    tok, hf_tok = gpt2_pair
    model = tiny("gpt", 50257, 24)
    reqs = requests("arc_easy", zeroshot_dir)
    assert sum(n > 25 for n in lengths(reqs, tok)) >= 5
    lm = hflm(MemlmForCausalLM.from_memlm(model), hf_tok)
    assert lm.max_length == 24
    assert_same_scores(MemlmLM(model, tok, batch_size=4).loglikelihood(reqs),
                       lm.loglikelihood(reqs))


@pytest.mark.parametrize("arch,extra", [("armt", dict(segment_len=32, num_mem_tokens=2, d_mem=8)),
                                        ("dnc", {})])
def test_memory_models_read_long_items_through_memory_with_max_length(arch, extra, zeroshot_dir,
                                                                      byte_pair):
    """memlm's adapter streams an item longer than context_len with the state carried.

    HFLM cuts to `max_length`, which defaults to context_len: then a memory model
    loses the start of the item and the scores differ. With a larger max_length
    HFLM passes the whole item and the wrapper streams it the same way
    (armt segments it itself; dnc refuses the length and is fed context_len pieces).
    """
    tok, hf_tok = byte_pair
    model = tiny(arch, 256, 64, **extra)
    reqs = requests("arc_easy", zeroshot_dir)  # long questions, short answers
    assert sum(n > 65 for n in lengths(reqs, tok)) >= 10
    ours = MemlmLM(model, tok, batch_size=4).loglikelihood(reqs)
    wrapped = MemlmForCausalLM.from_memlm(model)
    assert_same_scores(ours, hflm(wrapped, hf_tok, max_length=4096).loglikelihood(reqs))
    cut = hflm(wrapped, hf_tok).loglikelihood(reqs)
    assert max(abs(a - b) for (a, _), (b, _) in zip(ours, cut)) > 1e-3


# ----- the wrapper's long-input rule ----------------------------------------------------------
def test_wrapper_streams_a_stateful_model_that_refuses_the_length():
    model = tiny("dnc", 256, 16)
    hf = MemlmForCausalLM.from_memlm(model)
    ids = torch.randint(0, 256, (2, 40))
    with pytest.raises(SequenceTooLongError):
        model(ids)
    with torch.no_grad():
        out = hf(ids, labels=ids)
        state, parts = model.init_state(2), []
        for start in range(0, 40, 16):
            piece = model(ids[:, start : start + 16], state=state)
            state, parts = piece.state, parts + [piece.logits]
    assert torch.allclose(out.logits, torch.cat(parts, dim=1), atol=1e-5)
    manual = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 256),
                                               ids[:, 1:].reshape(-1))
    assert torch.allclose(out.lm_loss, manual, atol=1e-5)
    # a stateless model has no memory to carry: it still refuses
    with pytest.raises(SequenceTooLongError):
        MemlmForCausalLM.from_memlm(tiny("gpt", 256, 16))(ids)
