"""transformers' generate and pipeline continue exactly like memlm's generate, on trained
models, with prompts several segments long, for every architecture.

Random weights make greedy decoding nearly context-free, so the models are trained
first (150 steps each on a generated corpus, built once per session:
`memlm.testing.tiny`). Segments are 16 tokens; prompts are 2 to 5 segments long and
the continuations cross segment boundaries, so a memory that is cut or reset shows.
"""

import pytest
import torch

import memlm
from memlm.models.generation import Decoding
from memlm.models.streaming import read
from memlm.testing.tiny import ALPHABET, tiny_corpus, train_tiny

transformers = pytest.importorskip("transformers")
from memlm.hf import MemlmForCausalLM  # noqa: E402

ARCHS = ["gpt", "gmt", "dnc", "rmt", "armt", "tmt", "tmt-xmem"]
NEW = 24


@pytest.fixture(scope="session")
def trained():
    """arch -> a tiny model trained for 150 steps (about 30 s on one CPU core for all)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tokens = tiny_corpus(20_000, seed=0)
        return {arch: train_tiny(arch, tokens, steps=150) for arch in ARCHS}
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def prompts():
    held = tiny_corpus(5_000, seed=1)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(2 * 16 + 1, 5 * 16, (6,), generator=g).tolist()
    starts = torch.randint(0, held.numel() - 80, (6,), generator=g).tolist()
    return [held[s : s + n][None] for s, n in zip(starts, lengths)]


def test_the_models_are_trained(trained):
    """The fixture's models predict the corpus far better than chance (log 28 = 3.33)."""
    text = tiny_corpus(2_000, seed=2)[None]
    for arch, model in trained.items():
        with torch.no_grad():
            out = model(text[:, :16], targets=text[:, 1:17], state=model.init_state(1))
        assert out.lm_loss.item() < 2.0, arch


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_greedy_equals_memlm_greedy_token_for_token(trained, prompts, arch):
    model = trained[arch]
    hf = MemlmForCausalLM.from_memlm(model).eval()
    for p in prompts:
        want = model.generate(p, NEW)
        assert torch.equal(hf.generate(p, max_new_tokens=NEW, do_sample=False), want), arch
        # without the cache both re-read the sequence: the same tokens again
        assert torch.equal(model.generate(p, NEW, use_cache=False), want), arch
        assert torch.equal(hf.generate(p, max_new_tokens=NEW, do_sample=False,
                                       use_cache=False), want), arch


@pytest.mark.parametrize("arch", ["rmt", "armt", "dnc", "tmt-xmem"])
def test_generation_carries_the_memory_across_segments(trained, prompts, arch):
    """Generating is reading: the memory after generating equals the memory a read of the
    whole output leaves (nothing reset, nothing cut), and the memory of the earlier
    segments changes what is generated."""
    model = trained[arch]
    changed = 0
    for p in prompts:
        out = model.generate(p, NEW)
        # the next-token logits after the output, from the generator's own reader ...
        with torch.no_grad():
            reader = Decoding(model, 1, "cpu")
            inc = reader.feed(out)[:, -1]
            full = read(model, out).logits[:, -1]
        assert torch.allclose(inc, full, atol=1e-4), arch
        # ... and the context beyond the last segment matters
        last = p[:, -16:]
        cut = model.generate(last, NEW)[:, last.shape[1]:]
        changed += int(not torch.equal(cut, out[:, p.shape[1]:]))
    assert changed > 0, arch


def test_pipeline_text_generation_continues_like_memlm(trained, prompts):
    """transformers' pipeline("text-generation") on a memory model gives memlm's tokens."""
    from transformers import pipeline

    from memlm.data.tokenizers import CharTokenizer
    from memlm.hf import transformers_tokenizer

    tok = transformers_tokenizer(CharTokenizer(ALPHABET))
    model = trained["armt"]
    hf = MemlmForCausalLM.from_memlm(model).eval()
    gen = pipeline("text-generation", model=hf, tokenizer=tok, device="cpu")
    p = prompts[0]
    text = "".join(ALPHABET[i] for i in p[0].tolist())
    got = gen(text, max_new_tokens=NEW, do_sample=False, return_full_text=False)[0]
    want = model.generate(p, NEW)[0, p.shape[1]:].tolist()
    assert got["generated_text"] == "".join(ALPHABET[i] for i in want)


def test_registry_covers_the_tested_architectures():
    assert set(ARCHS) <= set(memlm.architectures())
