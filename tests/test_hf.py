"""transformers integration: one folder format, identical logits, identical generation.

Every registered architecture is covered (the list is read at collection time,
so a new architecture is tested as soon as its module lands). A toy stateful
architecture, registered only inside its tests, proves that the memory state is
threaded through `generate()` and through `memory_state=`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memlm
from memlm.config import ModelConfig
from memlm.errors import CheckpointError, ConfigError, MemlmError
from memlm.generation import generate as memlm_generate
from memlm.models.base import ForwardContext, MemLM
from memlm.models.decoder import Decoder
from memlm.registry import ARCHITECTURES, ArchSpec

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402
from transformers.modeling_outputs import CausalLMOutputWithPast  # noqa: E402

from memlm.hf import MemlmCache, MemlmConfig, MemlmForCausalLM  # noqa: E402

V, CTX = 97, 32
TINY = dict(vocab_size=V, n_layer=2, d_model=32, n_head=4, context_len=CTX)
ARCHS = memlm.architectures()


def tiny(arch: str) -> MemLM:
    """A tiny eval-mode model of `arch`, or a skip saying why it cannot be that small."""
    try:
        model = memlm.build(arch, **TINY)
    except MemlmError as e:
        pytest.skip(f"{arch} cannot be built with {TINY}: {e}")
    torch.manual_seed(1)  # randomise biases/norms so a wrong weight mapping cannot hide
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits from a fresh memory state, for either API."""
    if isinstance(model, MemlmForCausalLM):
        return model(ids).logits
    return model(ids, state=model.init_state(ids.shape[0], ids.device)).logits


# ----- one format, both APIs -----------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_round_trips_between_memlm_and_transformers_keep_logits(arch, tmp_path):
    model = tiny(arch)
    ids = torch.randint(0, V, (2, 20))
    with torch.no_grad():  # both sides in the same grad mode: SDPA may pick another kernel
        expected = logits(model, ids)
        model.save_pretrained(tmp_path / "memlm")
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "memlm")  # memlm -> HF
        assert isinstance(hf, MemlmForCausalLM) and not hf.training
        assert torch.equal(logits(hf, ids), expected)

        hf.save_pretrained(tmp_path / "hf")
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")  # HF -> HF
        assert torch.equal(logits(again, ids), expected)

        native = MemLM.from_pretrained(tmp_path / "hf")  # HF -> memlm
        assert type(native) is type(model)
        assert torch.equal(logits(native.eval(), ids), expected)
    # one format: both writers produce the same files and the same weight names
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert files == {"config.json", "model.safetensors", "README.md", "configuration_memlm.py",
                     "modeling_memlm.py"}
    from safetensors import safe_open

    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        assert set(f.keys()) <= set(model.state_dict())


# ----- forward: output type and label convention ----------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_labels_are_the_input_ids_and_are_shifted_inside(arch):
    model = tiny(arch)
    hf = MemlmForCausalLM.from_memlm(model).eval()
    ids = torch.randint(0, V, (2, 16))
    labels = ids.clone()
    labels[0, 5:9] = -100  # unscored positions
    with torch.no_grad():
        out = hf(ids, labels=labels)
        assert isinstance(out, CausalLMOutputWithPast)
        manual = F.cross_entropy(out.logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1),
                                 ignore_index=-100)
        assert torch.allclose(out.lm_loss, manual, atol=1e-6)
        # the total is memlm's: LM loss plus the architecture's weighted aux losses
        targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
        native = model(ids, targets=targets, state=model.init_state(2))
        assert torch.allclose(out.loss, native.loss, atol=1e-6)


# ----- generation --------------------------------------------------------------------------
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generate_gives_memlm_generators_tokens(arch, use_cache):
    hf = MemlmForCausalLM.from_memlm(tiny(arch)).eval()
    # a short prompt, and one that makes generation run past the context window
    for prompt_len, new in ((5, 8), (CTX - 4, 8), (CTX + 6, 4)):
        prompt = torch.randint(0, V, (2, prompt_len))
        want = hf.memlm.generate(prompt, new, use_cache=use_cache)  # the model's own rules
        got = hf.generate(prompt, max_new_tokens=new, do_sample=False, use_cache=use_cache)
        assert torch.equal(got, want), (arch, use_cache, prompt_len)


@pytest.mark.parametrize("arch", ["gpt", "armt"])
def test_cached_generate_feeds_one_new_token_per_step(arch):
    """generate() must hand the cache back each step (transformers' `cache=` name), so only
    the prompt and then single new tokens reach forward, never the whole sequence again."""
    hf = MemlmForCausalLM.from_memlm(tiny(arch)).eval()
    seen = []
    hook = hf.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw["input_ids"].shape[1]),
                                        with_kwargs=True)
    try:
        hf.generate(torch.randint(0, V, (1, 6)), max_new_tokens=5, do_sample=False)
    finally:
        hook.remove()
    assert seen == [6, 1, 1, 1, 1]


def test_generate_carries_a_memlm_cache_when_the_model_has_one():
    hf = MemlmForCausalLM.from_memlm(tiny("gpt"))
    out = hf.generate(torch.randint(0, V, (1, 6)), max_new_tokens=4, do_sample=False,
                      return_dict_in_generate=True)
    cache = out.cache
    assert isinstance(cache, MemlmCache)
    assert cache.position == 9 and cache.get_seq_length() == 9  # 6 prompt + 3 fed back


def test_beam_search_needs_use_cache_false():
    hf = MemlmForCausalLM.from_memlm(tiny("gpt"))
    prompt = torch.randint(0, V, (1, 5))
    with pytest.raises(ConfigError, match="use_cache=False"):
        hf.generate(prompt, max_new_tokens=3, num_beams=2, do_sample=False)
    assert hf.generate(prompt, max_new_tokens=3, num_beams=2, use_cache=False).shape == (1, 8)


# ----- stateful memory -----------------------------------------------------------------------
@dataclass
class ToyMemoryConfig(ModelConfig):
    arch: str = "toy-memory"


class ToyMemory(MemLM):
    """GPT whose head also reads a running sum of every embedding seen so far.

    The sum is the memory state: it is carried from call to call, so a cached
    one-token step is only right if it gets the state the previous step returned.
    """

    is_stateful = True

    def __init__(self, config: ToyMemoryConfig):
        super().__init__(config)
        self.decoder = Decoder(config)
        self.read = nn.Linear(config.d_model, config.d_model, bias=False)
        self.init_weights()
        nn.init.normal_(self.read.weight, std=0.5)  # make the memory matter for the argmax

    def init_state(self, batch_size, device=None):
        return torch.zeros(batch_size, self.config.d_model, device=device)

    def forward(self, input_ids, targets=None, state=None, trace=False, cache=None):
        self.check_length(input_ids, cache)
        ctx = ForwardContext(trace)
        if state is None:
            state = self.init_state(input_ids.shape[0], input_ids.device)
        memory = state[:, None] + self.decoder.wte(input_ids).cumsum(1)
        h = self.decoder.hidden(input_ids, ctx, cache) + self.read(memory)
        return self.assemble_output(self.decoder.head(h), targets, ctx, memory[:, -1])

    def make_cache(self, batch_size, max_len, device=None, dtype=None):
        return self.decoder.make_cache(batch_size, max_len, device, dtype)


@pytest.fixture
def toy_memory(monkeypatch):
    ARCHITECTURES.names()  # load the real registry first
    spec = ArchSpec("toy-memory", ToyMemoryConfig, ToyMemory, "test-only stateful model")
    monkeypatch.setitem(ARCHITECTURES._items, "toy-memory", spec)
    torch.manual_seed(0)
    return memlm.build("toy-memory", **TINY).eval()


def test_memory_state_is_threaded_through_generate(toy_memory):
    hf = MemlmForCausalLM.from_memlm(toy_memory)
    prompt = torch.randint(0, V, (2, 6))
    for use_cache in (True, False):
        want = memlm_generate(toy_memory, prompt, 16, use_cache=use_cache)
        got = hf.generate(prompt, max_new_tokens=16, do_sample=False, use_cache=use_cache)
        assert torch.equal(got, want)
    # a starting memory passed to generate() is used, exactly as memlm's `state=`
    start = torch.randn(2, TINY["d_model"])
    want = memlm_generate(toy_memory, prompt, 16, state=start)
    got = hf.generate(prompt, max_new_tokens=16, do_sample=False, memory_state=start)
    assert torch.equal(got, want)
    assert not torch.equal(got, hf.generate(prompt, max_new_tokens=16, do_sample=False))


def test_a_model_without_kv_cache_rereads_the_window_from_its_starting_state(toy_memory):
    toy_memory.make_cache = lambda *args, **kwargs: None  # as an architecture with no cache
    hf = MemlmForCausalLM.from_memlm(toy_memory)
    prompt = torch.randint(0, V, (2, CTX - 4))
    start = torch.randn(2, TINY["d_model"])
    want = memlm_generate(toy_memory, prompt, 8, state=start)
    out = hf.generate(prompt, max_new_tokens=8, do_sample=False, memory_state=start,
                      return_dict_in_generate=True)
    assert torch.equal(out.sequences, want) and out.cache is None


def test_memory_state_continues_a_stream_across_forward_calls(toy_memory):
    hf = MemlmForCausalLM.from_memlm(toy_memory)
    ids = torch.randint(0, V, (2, 24))
    with torch.no_grad():
        first = hf(ids[:, :10])
        assert torch.equal(first.memory_state, toy_memory(ids[:, :10]).state)
        second = hf(ids[:, 10:], memory_state=first.memory_state)
        native = toy_memory(ids[:, 10:], state=first.memory_state)
        assert torch.equal(second.logits, native.logits)
        assert torch.equal(second.memory_state, native.state)
        assert not torch.allclose(hf(ids[:, 10:]).logits, native.logits)  # the memory matters


# ----- inputs the models cannot take -------------------------------------------------------
def test_right_padding_is_harmless_and_left_padding_is_refused():
    hf = MemlmForCausalLM.from_memlm(tiny("gpt"))
    ids = torch.randint(0, V, (2, 10))
    right = torch.ones_like(ids)
    right[1, 7:] = 0
    with torch.no_grad():
        assert torch.equal(hf(ids, attention_mask=right).logits, hf(ids).logits)
    with pytest.raises(ConfigError, match="left padding"):
        hf(ids, attention_mask=right.flip(1))
    with pytest.raises(ConfigError, match="attention mask"):
        hf.generate(ids, attention_mask=right.flip(1), max_new_tokens=2)


def test_loading_is_strict_safe_and_takes_config_overrides(tmp_path):
    model = tiny("gpt")
    model.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dropout=0.25)
    assert hf.memlm.config.dropout == 0.25 and hf.config.dropout == 0.25
    with pytest.raises(ConfigError, match="Did you mean 'n_layer'"):
        AutoModelForCausalLM.from_pretrained(tmp_path, n_layers=3)
    # what lm-eval passes when it loads a path itself
    hf = AutoModelForCausalLM.from_pretrained(
        tmp_path, revision="main", dtype=torch.bfloat16, trust_remote_code=False, gguf_file=None,
        quantization_config=None, subfolder="", device_map={"": "cpu"}, max_memory=None)
    assert hf.dtype == torch.bfloat16 and hf.device == torch.device("cpu")
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "d_model": 64}))
    with pytest.raises(CheckpointError, match="shape"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_config_speaks_both_vocabularies():
    config = MemlmConfig(arch="gpt", hidden_size=48, num_attention_heads=4, n_layer=3)
    assert (config.d_model, config.n_head, config.num_hidden_layers) == (48, 4, 3)
    assert config.max_position_embeddings == config.context_len
    assert isinstance(AutoConfig.for_model("memlm", arch="gpt"), MemlmConfig)
    assert config.to_memlm() == memlm.build("gpt", d_model=48, n_head=4, n_layer=3).config
    with pytest.raises(ConfigError, match="divisible"):
        MemlmConfig(arch="gpt", d_model=48, n_head=5)


# ----- model card --------------------------------------------------------------------------
def test_model_card_has_config_parameter_counts_and_eval_results(tmp_path):
    model = tiny("gpt")
    MemlmForCausalLM.from_memlm(model).save_pretrained(tmp_path, eval_results={"ppl": 12.5})
    card = (tmp_path / "README.md").read_text()
    assert f"| parameters | {model.num_params():,} |" in card
    assert f"| parameters without embeddings | {model.num_params(non_embedding=True):,} |" in card
    assert "| ppl | 12.5 |" in card
    config_block = card.split("```json\n")[1].split("```")[0]
    assert json.loads(config_block) == model.config.to_dict()


def test_checkpoint_cards_read_the_runs_latest_validation(tmp_path):
    records = [{"kind": "train", "step": 5, "loss": 4.0},
               {"kind": "val", "step": 5, "val_loss": 3.5, "val_ppl": 33.1},
               {"kind": "val", "step": 10, "val_loss": 3.25, "val_ppl": 25.8}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    from memlm.train.run import eval_results_from_run

    tiny("gpt").save_pretrained(tmp_path / "checkpoints" / "step-0000010",
                                eval_results=eval_results_from_run(tmp_path))
    card = (tmp_path / "checkpoints" / "step-0000010" / "README.md").read_text()
    assert "## Evaluation (step 10)" in card and "| val_ppl | 25.8 |" in card
    assert "33.1" not in card


# ----- `import memlm` registers with transformers -------------------------------------------
def _python(code: str) -> str:
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


def test_import_memlm_registers_the_auto_classes(tmp_path):
    """memlm first, transformers later (the hook) and the other way round."""
    tiny("gpt").save_pretrained(tmp_path)
    out = _python(f"""
        import memlm, sys
        assert "transformers" not in sys.modules  # import memlm stays light
        from transformers import AutoModelForCausalLM
        print(type(AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})).__name__)
    """)
    assert out.strip() == "MemlmForCausalLM"
    out = _python("""
        from transformers import AutoConfig
        import memlm
        print(type(AutoConfig.for_model("memlm")).__name__)
    """)
    assert out.strip() == "MemlmConfig"


def test_import_memlm_works_without_transformers():
    out = _python("""
        import sys
        sys.modules["transformers"] = None  # as if it were not installed
        import memlm
        print(memlm.build("gpt", d_model=32, n_head=4, n_layer=1).num_params() > 0)
    """)
    assert out.strip() == "True"


# ----- lm-eval ---------------------------------------------------------------------------------
def test_lm_eval_hflm_scores_a_wrapped_model_like_memlm_does():
    """lm-eval's HFLM takes the wrapper as is (config, device, tie_weights, max_length)."""
    huggingface = pytest.importorskip("lm_eval.models.huggingface")
    from lm_eval.api.instance import Instance
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = {chr(c): i for i, c in enumerate(range(32, 127))}  # 95 ids, < V
    char_level = Tokenizer(models.WordLevel({**chars, "<eos>": 95}, unk_token="<eos>"))
    char_level.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    char_level.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=char_level, eos_token="<eos>",
                                  pad_token="<eos>")
    model = tiny("gpt")
    lm = huggingface.HFLM(pretrained=MemlmForCausalLM.from_memlm(model), tokenizer=tok,
                          batch_size=1, backend="causal")
    assert lm.max_length == CTX
    request = Instance("loglikelihood", doc={}, arguments=("hello wo", "rld"), idx=0)
    (score, _), = lm.loglikelihood([request])
    ids = torch.tensor([tok("hello world").input_ids])
    with torch.no_grad():
        logp = model(ids).logits.log_softmax(-1)[0]
    assert score == pytest.approx(sum(logp[t - 1, ids[0, t]].item() for t in (8, 9, 10)),
                                  abs=1e-4)


def test_word_tokenizer_folder_loads_with_autotokenizer_and_gives_memlm_ids(tmp_path):
    """The word tokenizer (BABILong) hashes unknown words into buckets, which no `tokenizers`
    model does: its folder names memlm's MemlmWordTokenizer as remote code, and AutoTokenizer
    then gives memlm's ids and text; saving again copies no memlm source into the folder."""
    import warnings

    from transformers import AutoTokenizer

    from memlm.data.tokenizer_export import write_tokenizer_files
    from memlm.data.tokenizers import load_tokenizer
    from memlm.data.wordlevel import WordTokenizer
    from memlm.hf import MemlmWordTokenizer, transformers_tokenizer

    tok = WordTokenizer(["Mary", "went", "to", "the", "kitchen", ".", "?", "Where", "is"],
                        n_hash=8)
    texts = ["Mary went to the garden.", "  Where is Mary? ", "<|endoftext|> is text",
             "héllo (x) 42", ""]
    folder, again = tmp_path / "run", tmp_path / "saved"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_tokenizer_files(tok, folder, 64)
    assert not (folder / "tokenizer.json").exists()  # nothing a fast tokenizer could misread
    assert (folder / "tokenization_memlm.py").exists()
    hf_tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    assert isinstance(hf_tok, MemlmWordTokenizer)
    assert hf_tok.eos_token_id == tok.eot_id == 0 and hf_tok.model_max_length == 64
    assert len(hf_tok) == tok.vocab_size
    for text in texts:
        ids = tok.encode(text)
        assert hf_tok(text).input_ids == ids, text  # nothing added around the text
        assert hf_tok.decode(ids) == tok.decode(ids), text
    bucket = tok.encode("garden")
    assert hf_tok.convert_tokens_to_ids(hf_tok.convert_ids_to_tokens(bucket)) == bucket
    assert transformers_tokenizer(tok)(texts[0]).input_ids == tok.encode(texts[0])

    hf_tok.save_pretrained(again)
    assert not (again / "tokenization.py").exists()  # memlm's own source is not copied
    config = json.loads((again / "tokenizer_config.json").read_text())
    assert config["auto_map"]["AutoTokenizer"][0] == "tokenization_memlm.MemlmWordTokenizer"
    reread = AutoTokenizer.from_pretrained(again, trust_remote_code=True)
    assert reread(texts[0]).input_ids == tok.encode(texts[0])
    assert load_tokenizer(again).encode(texts[1]) == tok.encode(texts[1])
