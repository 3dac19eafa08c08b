"""Stock tools on a memlm folder, in a fresh process that never imports memlm.

A new user with memlm installed points transformers or lm-eval at a folder
and expects it to load: `AutoConfig` / `AutoModelForCausalLM` with
`trust_remote_code=True` (config.json's `auto_map` names two tiny modules
saved in the folder that import the installed memlm), `AutoTokenizer`
(tokenizer.json + tokenizer_config.json saved beside the weights),
`pipeline("text-generation")` and the `lm_eval` command line on a local task.
Every architecture is covered, and what the tools compute is checked against
memlm's own numbers: logits, greedy tokens, per-request log-likelihoods.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import REPO, shared_path

import memlm
from memlm.data.tokenizer_export import merges_from_ranks, write_tokenizer_files
from memlm.data.tokenizers import (
    _gpt2_byte_alphabet,
    load_gpt2_ranks,
    load_tokenizer,
    make_tokenizer,
)
from memlm.hf_files import AUTO_MAP

transformers = pytest.importorskip("transformers")

ARCHS = memlm.architectures()
CTX = 512  # byte tokens: the short piqa items below fit, so no tool cuts them
SIZE = dict(vocab_size=256, n_layer=1, d_model=32, n_head=2, context_len=CTX)
EXTRA = {"rmt": dict(segment_len=64), "armt": dict(segment_len=64)}
PROMPT = "Question: which tool reads this folder?\nAnswer:"
N_ITEMS = 4
LM_EVAL = Path(sys.executable).with_name("lm_eval")

# What the fresh process runs: no `import memlm` anywhere; it must stay unimported
# until transformers loads the folder's remote code.
CHILD = textwrap.dedent("""
    import json, sys
    folder, out = sys.argv[1], sys.argv[2]
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, pipeline
    report = {"memlm_imported_before": "memlm" in sys.modules}
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    report["config"] = [type(config).__name__, config.arch, config.max_position_embeddings]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    report["ids"] = ids[0].tolist()
    report["logits"] = model(ids).logits[0].tolist()
    gen = pipeline("text-generation", model=folder, trust_remote_code=True)
    res = gen(PROMPT, max_new_tokens=6, do_sample=False, return_tensors=True)
    report["generated"] = res[0]["generated_token_ids"]
    report["model_class"] = type(gen.model).__name__
    with open(out, "w") as f:
        json.dump(report, f)
""").replace("PROMPT", repr(PROMPT))

TASK_YAML = """\
task: local_piqa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query.rstrip('\\n') + '\\nAnswer:'}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
metadata:
  version: 1.0
"""


def _env(tmp: Path) -> dict[str, str]:
    """Offline, with transformers' remote-code cache and datasets' cache in `tmp`."""
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp / "hf_modules"),
               HF_DATASETS_CACHE=str(tmp / "datasets"), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def _build(arch: str) -> memlm.MemLM:
    torch.manual_seed(0)
    model = memlm.build(arch, **SIZE, **EXTRA.get(arch, {}))
    with torch.no_grad():  # random biases/norms too, so a wrong weight cannot hide
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stock")
    out = {}
    for arch in ARCHS:
        model = _build(arch)
        model.save_pretrained(root / arch)
        write_tokenizer_files(make_tokenizer("byte"), root / arch, CTX)
        out[arch] = root / arch
    return out


@pytest.fixture(scope="module")
def fresh_runs(folders, tmp_path_factory) -> dict[str, dict]:
    """Run CHILD once per architecture (two at a time) and collect its reports."""
    tmp = tmp_path_factory.mktemp("fresh")
    script = tmp / "child.py"
    script.write_text(CHILD)

    def run(arch: str) -> dict:
        out = tmp / f"{arch}.json"
        proc = subprocess.run([sys.executable, str(script), str(folders[arch]), str(out)],
                              capture_output=True, text=True, env=_env(tmp), cwd=tmp,
                              timeout=300)
        if proc.returncode != 0:
            return {"error": proc.stderr[-3000:]}
        return json.loads(out.read_text())

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(ARCHS, pool.map(run, ARCHS)))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_auto_classes_tokenizer_and_pipeline_in_a_fresh_process(arch, folders, fresh_runs):
    report = fresh_runs[arch]
    assert "error" not in report, report.get("error")
    assert report["memlm_imported_before"] is False
    assert report["config"] == ["MemlmConfig", arch, CTX]
    model, tok = _build(arch), make_tokenizer("byte")
    ids = tok.encode(PROMPT)
    assert report["ids"] == ids  # AutoTokenizer gives memlm's ids
    with torch.no_grad():
        want = model(torch.tensor([ids]), state=model.init_state(1)).logits[0]
    assert torch.allclose(torch.tensor(report["logits"]), want, atol=1e-5)
    assert report["model_class"] == "MemlmForCausalLM"
    greedy = model.generate(torch.tensor([ids]), 6)[0].tolist()
    assert report["generated"] == greedy


def test_the_folder_names_its_remote_code_and_tokenizer(folders):
    folder = folders["gpt"]
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP
    for fname in ("configuration_memlm.py", "modeling_memlm.py", "tokenizer.json",
                  "tokenizer_config.json", "memlm_tokenizer.json"):
        assert (folder / fname).is_file(), fname
    # memlm itself still reads the folder (auto_map is bookkeeping to memlm)
    assert isinstance(memlm.load(folder), memlm.models.GPT)


def test_a_missing_memlm_gives_a_clear_message(folders, tmp_path):
    """Without memlm installed, trust_remote_code loading says what to install."""
    script = textwrap.dedent("""
        import importlib.abc, sys
        class Hide(importlib.abc.MetaPathFinder):  # as if memlm were not installed
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "memlm":
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        sys.meta_path.insert(0, Hide())
        from transformers import AutoConfig
        try:
            AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True)
        except ImportError as e:
            print("IMPORT-ERROR:", e)
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(folders["gpt"])],
                          capture_output=True, text=True, env=_env(tmp_path), timeout=300)
    assert "IMPORT-ERROR: This folder holds a memlm model" in proc.stdout, proc.stderr[-2000:]
    assert "pip install memlm" in proc.stdout


# ----- lm-eval's command line ------------------------------------------------------------
@pytest.fixture(scope="module")
def lm_eval_runs(folders, tmp_path_factory) -> dict[str, dict]:
    """`lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True` per arch."""
    if not LM_EVAL.exists():
        pytest.skip("the lm_eval command is not installed (pip install -e '.[eval]')")
    tmp = tmp_path_factory.mktemp("lm_eval")
    lines = shared_path("zeroshot", "piqa.jsonl").read_text(encoding="utf-8").splitlines()
    data = tmp / "piqa_small.jsonl"
    data.write_text("\n".join(lines[:N_ITEMS]) + "\n", encoding="utf-8")
    (tmp / "tasks").mkdir()
    (tmp / "tasks" / "local_piqa.yaml").write_text(TASK_YAML.format(data=data))

    def run(arch: str) -> dict:
        out = tmp / "out" / arch
        cmd = [str(LM_EVAL), "--model", "hf", "--model_args",
               f"pretrained={folders[arch]},trust_remote_code=True", "--device", "cpu",
               "--batch_size", "4", "--tasks", "local_piqa", "--include_path",
               str(tmp / "tasks"), "--log_samples", "--output_path", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp), cwd=tmp,
                              timeout=600)
        samples = sorted(out.rglob("samples_local_piqa_*.jsonl"))
        if proc.returncode != 0 or not samples:
            return {"error": (proc.stdout + proc.stderr)[-3000:]}
        return {"samples": [json.loads(x) for x in samples[-1].read_text().splitlines()]}

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(ARCHS, pool.map(run, ARCHS)))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_lm_eval_cli_scores_the_folder_as_memlm_does(arch, lm_eval_runs):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from memlm.eval.zeroshot import MemlmLM

    report = lm_eval_runs[arch]
    assert "error" not in report, report.get("error")
    samples = sorted(report["samples"], key=lambda s: s["doc_id"])
    assert len(samples) == N_ITEMS
    requests, theirs = [], []
    for s in samples:
        for i, key in enumerate(sorted(s["arguments"])):
            args = s["arguments"][key]
            requests.append(Instance("loglikelihood", s["doc"], (args["arg_0"], args["arg_1"]), i))
            ll, greedy = s["resps"][i][0]
            theirs.append((float(ll), greedy == "True"))
    ours = MemlmLM(_build(arch), make_tokenizer("byte"), batch_size=4).loglikelihood(requests)
    for (a, ga), (b, gb) in zip(ours, theirs):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-4)
        assert ga == gb


# ----- tokenizers --------------------------------------------------------------------------
TEXTS = ["plain text", "  two spaces\n\nnewlines ", "héllo wörld 🙂", "Ā", "a ## b ####",
         "<|endoftext|> is text", "x#$y"]


@pytest.mark.parametrize("spec", ["byte", "char", "bpe:300", "gpt2"])
def test_saved_transformers_tokenizer_gives_memlm_ids(spec, tmp_path):
    from transformers import AutoTokenizer

    corpus = "".join(TEXTS) * 3
    if spec == "gpt2":
        spec = f"gpt2:{shared_path('gpt2-bpe')}"
    tok = make_tokenizer(spec, text=corpus)
    write_tokenizer_files(tok, tmp_path, model_max_length=64)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path)
    assert hf_tok.eos_token_id == tok.eot_id and hf_tok.model_max_length == 64
    for text in TEXTS:
        assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text), (spec, text)
        assert hf_tok(text).input_ids == tok.encode(text)  # nothing added around the text
    assert hf_tok.decode(tok.encode(TEXTS[2])) == TEXTS[2]


def test_gpt2_merges_are_rebuilt_exactly_from_tiktoken_ranks():
    """A gpt2 tokenizer from tiktoken's download has only ranks; the merges come from them."""
    folder = shared_path("gpt2-bpe")
    lines = (folder / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    spell = {b: c for c, b in _gpt2_byte_alphabet().items()}
    rebuilt = [("".join(spell[x] for x in a), "".join(spell[x] for x in b))
               for a, b in merges_from_ranks(load_gpt2_ranks(folder))]
    assert rebuilt == [tuple(line.split()) for line in lines[1:] if line]


def test_tiktoken_reads_a_local_gpt2_folder_with_memlms_ranks():
    """docs/data.md: tiktoken (0.14) reads the plain folder too, and agrees with memlm."""
    tiktoken_load = pytest.importorskip("tiktoken.load")
    folder = shared_path("gpt2-bpe")
    ranks = tiktoken_load.data_gym_to_mergeable_bpe_ranks(str(folder / "vocab.bpe"),
                                                          str(folder / "encoder.json"))
    assert ranks == load_gpt2_ranks(folder)


# ----- checkpoints from the trainer --------------------------------------------------------
def test_training_checkpoints_are_readable_by_others_and_by_autotokenizer(tmp_path):
    from transformers import AutoTokenizer

    from memlm.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from memlm.train.trainer import train

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    cfg = RunConfig(
        model=ModelConfig(arch="gpt", n_layer=1, n_head=2, d_model=32, context_len=16),
        train=TrainConfig(max_steps=2, batch_size=2, eval_every=2, eval_batches=1,
                          save_every=2, log_every=1, precision="fp32", warmup_steps=0),
        data=DataConfig(source=str(corpus), tokenizer="char"),
    )
    old = os.umask(0o022)
    try:
        train(cfg, tmp_path / "run", progress=False)
    finally:
        os.umask(old)
    ckpt = tmp_path / "run" / "checkpoints" / "step-0000002"
    files = sorted(p for p in ckpt.iterdir())
    assert {p.name for p in files} >= {"config.json", "model.safetensors", "trainer_state.pt",
                                       "tokenizer.json", "tokenizer_config.json",
                                       "modeling_memlm.py", "README.md"}
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, (p.name, oct(p.stat().st_mode))
    hf_tok = AutoTokenizer.from_pretrained(ckpt)
    tok = load_tokenizer(ckpt / "memlm_tokenizer.json")
    assert hf_tok.encode("the lazy fox", add_special_tokens=False) == tok.encode("the lazy fox")
    assert hf_tok.model_max_length == 16
