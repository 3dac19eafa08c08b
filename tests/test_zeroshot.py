"""Zero-shot evaluation: the lm-eval adapter scores what it should, and lm-eval's
multiple-choice scoring over the local ARC-Easy / PIQA / WinoGrande / HellaSwag
files rewards a model exactly when it prefers the right answer."""

import json
import math
from typing import Any

import pytest
import torch

import memlm
from memlm.config import ModelConfig
from memlm.data.tokenizers import make_tokenizer
from memlm.errors import DataError, MissingDependencyError, UnknownNameError
from memlm.eval import zeroshot
from memlm.models.base import ForwardContext, MemLM, ModelOutput
from memlm.models.decoder import Decoder
from tests.conftest import shared_path

needs_lm_eval = pytest.mark.skipif(
    not zeroshot.HAVE_LM_EVAL, reason='lm-eval is not installed: pip install -e ".[eval]"')
TASKS = ["arc_easy", "piqa", "winogrande", "hellaswag"]
TINY = dict(vocab_size=256, n_layer=1, d_model=32, n_head=2, context_len=64)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run faster on one thread, above all on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tok():
    return make_tokenizer("byte")


class CarryLM(MemLM):
    """A tiny honest stateful model: the mean hidden state of the previous segment is
    carried in `state` and added to the next segment, so streaming differs from cutting."""

    is_stateful = True

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.decoder = Decoder(config)
        self.init_weights()

    def init_state(self, batch_size: int, device: Any = None) -> torch.Tensor:
        return torch.zeros(batch_size, self.config.d_model, device=device)

    def forward(self, input_ids, targets=None, state=None, trace=False, cache=None) -> ModelOutput:
        if state is None:
            state = self.init_state(input_ids.shape[0], input_ids.device)
        ctx = ForwardContext(trace)
        h = self.decoder.hidden(input_ids, ctx) + 5.0 * state[:, None]
        return self.assemble_output(self.decoder.head(h), targets, ctx, h.mean(1))


def logprobs(model, ids: list[int], state=None) -> torch.Tensor:
    """log P(ids[t+1] | ids[:t+1]) for every t, from one plain forward."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]), state=state).logits[0].float()
    return logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_without_lm_eval_the_error_names_the_extra(monkeypatch, tok):
    monkeypatch.setattr(zeroshot, "HAVE_LM_EVAL", False)
    with pytest.raises(MissingDependencyError, match=r'pip install -e "\.\[eval\]"'):
        zeroshot.run_zeroshot(memlm.build("gpt", **TINY), tok, ["piqa"])


@needs_lm_eval
def test_loglikelihood_is_the_sum_of_the_continuation_token_logprobs(tok):
    model = memlm.build("gpt", **TINY)
    lm = zeroshot.MemlmLM(model, tok)
    (ll, greedy), = lm.loglikelihood([("The cat", " sat")])
    ids = tok.encode("The cat sat")
    expected = logprobs(model, ids)[-4:].sum().item()  # " sat" is the last 4 bytes
    assert ll == pytest.approx(expected, abs=1e-4)
    assert greedy is False  # an untrained model does not spell " sat" greedily
    (empty, _), = lm.loglikelihood([("", "ab")])  # empty context: conditioned on eot
    assert empty == pytest.approx(logprobs(model, [tok.eot_id, 97, 98]).sum().item(), abs=1e-4)


@needs_lm_eval
def test_long_context_is_cut_from_the_left_for_stateless_models(tok):
    model = memlm.build("gpt", **{**TINY, "context_len": 16})
    lm = zeroshot.MemlmLM(model, tok, batch_size=2)
    context, cont = "abcdefghijklmnopqrstuvwxyz0123456789", " xyz"
    (ll, _), = lm.loglikelihood([(context, cont)])
    ids = tok.encode(context + cont)
    expected = logprobs(model, ids[-17:])[-4:].sum().item()  # the last 16 inputs predict
    assert ll == pytest.approx(expected, abs=1e-4)


@needs_lm_eval
def test_long_text_is_streamed_with_state_for_stateful_models(tok):
    model = CarryLM(ModelConfig(**{**TINY, "context_len": 16}))
    lm = zeroshot.MemlmLM(model, tok)
    text = "the memory carries what the window forgot"
    (ll, _), = lm.loglikelihood([(text[:-5], text[-5:])])
    ids = tok.encode(text)
    inputs, state, parts = ids[:-1], model.init_state(1), []
    for s in range(0, len(inputs), 16):  # segments of 16 with the state carried
        with torch.no_grad():
            out = model(torch.tensor([inputs[s : s + 16]]), state=state)
        state = out.state
        parts.append(out.logits[0].float().log_softmax(-1))
    lp = torch.cat(parts).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert ll == pytest.approx(lp[-5:].sum().item(), abs=1e-4)
    cut = logprobs(model, ids[-17:], state=model.init_state(1))[-5:].sum().item()
    assert abs(ll - cut) > 1e-3  # the carried state mattered: not a left-truncated window


@needs_lm_eval
def test_rolling_loglikelihood_scores_every_token_once_with_maximal_context(tok):
    model = memlm.build("gpt", **{**TINY, "context_len": 16})
    lm = zeroshot.MemlmLM(model, tok)
    text = "x" * 3 + "rolling windows over forty bytes!!"  # 37 tokens + the eot prefix
    full = [tok.eot_id] + tok.encode(text)
    # targets 1..16 from inputs 0..15, targets 17..32 from inputs 16..31, 33..37 from 21..36
    expected = (logprobs(model, full[0:17]).sum() + logprobs(model, full[16:33]).sum()
                + logprobs(model, full[21:38])[-5:].sum()).item()
    assert lm.loglikelihood_rolling([(text,)])[0] == pytest.approx(expected, abs=1e-4)


@needs_lm_eval
def test_generate_until_stops_at_the_stop_string(tok):
    lm = zeroshot.MemlmLM(memlm.build("gpt", **TINY), tok)
    first = lm.generate_until([("Hello", {"until": [], "max_gen_toks": 6})])[0]
    assert 0 < len(first.encode("utf-8", "replace")) <= 6 * 3
    stop = first[1:2] or "\x00"
    cut = lm.generate_until([("Hello", {"until": [stop], "max_gen_toks": 6})])[0]
    assert stop not in cut and first.startswith(cut)


@needs_lm_eval
def test_tiny_model_on_the_four_real_tasks_gives_accuracies_in_0_1(tok):
    data = shared_path("zeroshot")
    model = memlm.build("gpt", **TINY)
    results = zeroshot.run_zeroshot(model, tok, TASKS, limit=6, zeroshot_dir=data)
    assert list(results) == TASKS
    for task, row in results.items():
        assert row["n"] == 6, task
        for key in ("acc", "acc_norm"):
            assert math.isfinite(row[key]) and 0.0 <= row[key] <= 1.0, (task, row)
    table = zeroshot.format_zeroshot(results)
    assert table.splitlines()[0].split() == ["task", "n", "acc", "acc_norm"]


class GoldBonusLM(zeroshot.MemlmLM):
    """Scores with the real model, then adds `bonus` to the gold choice's log-likelihood.

    lm-eval gives each request the document (`doc`) and the choice index (`idx`);
    a positive bonus must give accuracy 1, a negative one accuracy 0.
    """

    bonus = 1e6

    def loglikelihood(self, requests):
        scores = super().loglikelihood(requests)
        return [(ll + (self.bonus if r.idx == r.doc["gold"] else 0.0), g)
                for (ll, g), r in zip(scores, requests)]


@needs_lm_eval
@pytest.mark.parametrize("bonus, expected", [(1e6, 1.0), (-1e6, 0.0)])
def test_lm_eval_scoring_rewards_exactly_the_preferred_answer(tok, bonus, expected):
    data = shared_path("zeroshot")
    lm = GoldBonusLM(memlm.build("gpt", **TINY), tok, batch_size=16)
    lm.bonus = bonus
    results = zeroshot.evaluate_tasks(lm, TASKS, limit=5, zeroshot_dir=data)
    for task in TASKS:
        assert results[task]["acc"] == expected, task
        assert results[task]["acc_norm"] == expected, task


def _write_task(folder, name: str, items: list[dict]) -> None:
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))


@needs_lm_eval
def test_prompts_match_lm_eval_formats_and_the_env_var_finds_the_folder(tmp_path, monkeypatch,
                                                                          tok):
    folder = tmp_path / "zs"
    _write_task(folder, "arc_easy", [{"query": "Question: 2+2?", "choices": ["3", "4"], "gold": 1}])
    _write_task(folder, "piqa", [{"query": "Question: open a jar\n", "choices": ["twist", "bite"],
                                  "gold": 0}])
    _write_task(folder, "winogrande", [{"context_options": ["Ann helped Bo because Ann",
                                                            "Ann helped Bo because Bo"],
                                        "continuation": "was kind.", "gold": 0}])
    monkeypatch.setenv(zeroshot.ENV_DIR, str(folder))
    seen = []

    class Recorder(zeroshot.MemlmLM):
        def loglikelihood(self, requests):
            seen.extend(r.args for r in requests)
            return super().loglikelihood(requests)

    zeroshot.evaluate_tasks(Recorder(memlm.build("gpt", **TINY), tok), ["arc_easy", "piqa",
                                                                        "winogrande"])
    assert seen == [
        ("Question: 2+2?\nAnswer:", " 3"), ("Question: 2+2?\nAnswer:", " 4"),
        ("Question: open a jar\nAnswer:", " twist"), ("Question: open a jar\nAnswer:", " bite"),
        ("Ann helped Bo because Ann", " was kind."), ("Ann helped Bo because Bo", " was kind."),
    ]


def test_missing_data_gets_a_clear_data_error(tmp_path, tok):
    with pytest.raises(DataError, match="does not exist"):
        zeroshot.load_items("piqa", zeroshot_dir=tmp_path / "nowhere")
    with pytest.raises(DataError, match="piqa.jsonl is missing"):
        zeroshot.load_items("piqa", zeroshot_dir=tmp_path)
    _write_task(tmp_path, "arc_easy", [{"query": "Question: x", "gold": 0}])
    with pytest.raises(DataError, match=r"lacks field\(s\) \['choices'\]"):
        zeroshot.load_items("arc_easy", zeroshot_dir=tmp_path)
    with pytest.raises(UnknownNameError, match="Did you mean 'arc_easy'"):
        zeroshot.load_items("arc-easy", zeroshot_dir=tmp_path)
