"""`memlm audit`: is this model really causal?

A language model that peeks at the token it must predict posts a wonderful
perplexity and is useless for generation. Memory mechanisms make such leaks
easy to write by accident (a graph built over the whole sequence, a memory
written before it is read, a normalisation over all positions), so the audit
probes a model from the outside, through its public interface only:

* future perturbation: change every token after a cut point; no logit at or
  before the cut may move (several cuts; eval mode, and train mode with
  dropout disabled for memlm models);
* prefix consistency: a prefix run alone gives the same logits as the same
  positions inside a longer run;
* batch independence: a row's logits do not depend on the other rows;
* cache equivalence: one-token-at-a-time decoding with the KV cache equals one
  full forward (skipped, with a note, when the model has no cache);
* random-token floor: a copy of the model trained on uniform random tokens must
  not score fresh uniform tokens below log(vocab size) nats per token, which no
  causal predictor can beat; a leaking model learns to copy the future and does.

The first four are exact equalities up to float rounding; the last is the
end-to-end symptom.

Reading the future and changing the model are different faults. Some models
(faithful GMT, like the original GMT v7) write into their own memory during
every forward, evaluation included: two identical forwards then differ, which
the exact probes would misread as a leak. So the audit first runs one
evaluation forward and compares every parameter and buffer: if anything
changed, it reports "evaluation mutates memory" as its own finding (NOTE), and
the probes run with the weights and buffers restored before every forward, so
they measure only what a forward reads. When a leak is found, each probe that
passed is marked as blind to it, with the reason, so a passing probe is never
taken as evidence against the leak. The same audit runs on any memlm model (stateful ones get a
fresh `init_state` per run) and on any Hugging Face `transformers` causal LM,
which is wrapped in a small adapter speaking the memlm interface so that every
probe is the very function from `memlm.testing` the test suite uses.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from memlm.errors import ConfigError, MemlmError
from memlm.models.base import ModelOutput
from memlm.testing import probes
from memlm.types import IGNORE_INDEX, evaluating


@dataclass
class ProbeResult:
    """One probe's verdict. `deviation` and `tolerance` share the unit named in `detail`."""

    name: str
    passed: bool
    deviation: float | None
    tolerance: float | None
    detail: str
    skipped: bool = False
    #: a fact about the model that is not a causality verdict (e.g. it mutates memory)
    finding: bool = False
    #: passed, but a failed probe shows a leak this probe cannot see
    blind: bool = False

    @property
    def status(self) -> str:
        if self.finding:
            return "NOTE"
        return "SKIP" if self.skipped else ("PASS" if self.passed else "FAIL")


# ----- Hugging Face adapter -------------------------------------------------------------------
class _HFCache:
    """Holds a transformers cache object between incremental calls."""

    def __init__(self) -> None:
        self.past: Any = None
        self.length = 0


class HFCausalLMAdapter(nn.Module):
    """Presents a transformers causal LM through the memlm model interface.

    Only what the audit needs: `forward(input_ids, targets, state, cache)` returning
    a `ModelOutput`, `init_state` (always None: HF models carry no memory),
    `make_cache` (an object threading the transformers cache), and a `config` with
    `vocab_size` and `context_len`.
    """

    is_stateful = False

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model
        cfg = hf_model.config
        context = next((getattr(cfg, k) for k in ("n_positions", "max_position_embeddings",
                                                   "n_ctx", "max_seq_len")
                        if isinstance(getattr(cfg, k, None), int)), 1024)
        vocab = getattr(cfg, "vocab_size", None) or hf_model.get_output_embeddings().weight.shape[0]
        self.config = SimpleNamespace(vocab_size=int(vocab), context_len=int(context),
                                      dropout=0.0)
        self.supports_cache = bool(getattr(cfg, "use_cache", True))

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                state: Any = None, trace: bool = False, cache: _HFCache | None = None
                ) -> ModelOutput:
        if cache is None:
            logits = self.hf(input_ids=input_ids, use_cache=False).logits
        else:
            out = self.hf(input_ids=input_ids, cache=cache.past, use_cache=True)
            cache.past = out.cache
            cache.length += input_ids.shape[1]
            logits = out.logits
        result = ModelOutput(logits=logits)
        if targets is not None:
            result.lm_loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                             targets.reshape(-1), ignore_index=IGNORE_INDEX)
            result.loss = result.lm_loss
        return result

    def init_state(self, batch_size: int, device: Any = None) -> None:
        return None

    def detach_state(self, state: Any) -> Any:
        return state

    def make_cache(self, batch_size: int, max_len: int, device: Any = None,
                   dtype: Any = None) -> _HFCache | None:
        return _HFCache() if self.supports_cache else None

    def on_train_step_end(self, step: int, max_steps: int) -> None:
        return None


def _is_hf_model(model: Any) -> bool:
    # A PreTrainedModel can only exist once transformers is imported; importing it
    # here just to answer "no" would cost seconds.
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def as_audit_subject(model: Any) -> tuple[nn.Module, str]:
    """(model speaking the memlm interface, kind) where kind is 'memlm' or 'hf'."""
    if _is_hf_model(model) and not hasattr(model, "init_state"):
        return HFCausalLMAdapter(model), "hf"
    if isinstance(model, nn.Module) and hasattr(model, "init_state") and hasattr(model, "config"):
        return model, "memlm"
    raise ConfigError(
        f"audit needs a memlm model (memlm.build / memlm.load) or a transformers causal LM "
        f"(AutoModelForCausalLM.from_pretrained), got {type(model).__name__}."
    )


def without_dropout(model: nn.Module) -> nn.Module:
    """A copy of `model` whose dropout is off, so train mode is deterministic.

    memlm models are rebuilt from their config with dropout=0 and the weights
    loaded (dropout probabilities also live in attention's SDPA call, not only
    in nn.Dropout modules); anything else gets its nn.Dropout modules zeroed.
    """
    config = getattr(model, "config", None)
    if hasattr(config, "replace") and getattr(config, "dropout", 0.0):
        try:
            clone = type(model)(config.replace(dropout=0.0))
            clone.load_state_dict(model.state_dict())
            return clone.to(next(model.parameters()).device)
        except (TypeError, RuntimeError, ConfigError):
            pass
    clone = copy.deepcopy(model)
    for module in clone.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return clone


# ----- the audit ------------------------------------------------------------------------------
def audit(
    model: Any,
    vocab_size: int | None = None,
    seq_len: int | None = None,
    tol: float = 1e-4,
    floor_tol: float = 0.05,
    floor_steps: int = 100,
    floor_lr: float = 1e-2,
    floor_batch: int = 8,
    cuts: tuple[float, ...] = (0.0, 0.25, 0.5, 0.9),
    seed: int = 0,
    floor: bool = True,
    report: Callable[[ProbeResult], None] | None = None,
) -> list[ProbeResult]:
    """Run every causality probe on `model` and return one `ProbeResult` each.

    model: a memlm model or a transformers causal LM (PreTrainedModel).
    vocab_size: tokens are drawn from range(vocab_size) (default: the model's
        vocabulary; a smaller value makes the random-token floor cheaper, and the
        floor is then log(vocab_size)).
    seq_len: probe sequence length (default min(context_len, 64)).
    tol: max |logit difference| allowed by the exact probes (float rounding).
    floor_tol: how far (nats/token) the trained copy may go below log(vocab_size)
        before the floor probe fails; sampling noise on the default sizes is ~0.01.
    floor_steps / floor_lr / floor_batch: training of the copy for the floor probe.
    cuts: cut points of the future-perturbation probe as fractions of seq_len.
    floor: False skips the (slowest) random-token floor probe.
    report: called with each result as soon as it is measured (the CLI prints).
    """
    subject, kind = as_audit_subject(model)
    cfg = subject.config
    vocab = int(vocab_size or cfg.vocab_size)
    if not 2 <= vocab <= cfg.vocab_size:
        raise ConfigError(f"vocab_size={vocab} must be in [2, {cfg.vocab_size}] (the model's "
                          "vocabulary).")
    seq_len = int(seq_len or min(cfg.context_len, 64))
    if not 4 <= seq_len <= cfg.context_len:
        raise ConfigError(f"seq_len={seq_len} must be in [4, context_len={cfg.context_len}].")
    state_fn = _state_fn(subject)
    results: list[ProbeResult] = []

    def add(result: ProbeResult) -> None:
        results.append(result)
        if report is not None:
            report(result)

    snapshot = _snapshot(subject)
    mutation = _mutation_probe(subject, snapshot, vocab, seq_len, seed)
    if mutation.finding:
        add(mutation)
    try:
        _run_probes(subject, kind, mutation.finding, vocab, seq_len, tol, cuts, seed, state_fn,
                    add)
        if floor:
            add(_floor_probe(subject, vocab, seq_len, floor_tol, floor_steps, floor_lr,
                             floor_batch, seed))
    finally:
        _restore(subject, snapshot)  # the audited model leaves exactly as it came
    _mark_blind(results, floor_steps)
    return results


def _run_probes(subject: nn.Module, kind: str, mutates: bool, vocab: int, seq_len: int,
                tol: float, cuts: tuple[float, ...], seed: int,
                state_fn: Callable[[int], Any], add: Callable[[ProbeResult], None]) -> None:
    """The exact probes; on a self-mutating model every forward starts from the snapshot."""
    def pristine(m: nn.Module) -> nn.Module:
        return _RestoringProxy(m) if mutates else m

    cut_points = sorted({min(max(int(f * seq_len), 0), seq_len - 2) for f in cuts})
    modes = [("eval", pristine(subject))]
    if kind == "memlm":
        modes.append(("train, dropout off", pristine(without_dropout(subject))))
    subject = modes[0][1]
    for mode, m in modes:
        devs = [probes.check_causality(m, vocab, seq_len, cut=c, seed=seed,
                                        train_mode=mode != "eval", state_fn=state_fn)
                for c in cut_points]
        worst = max(range(len(devs)), key=lambda i: devs[i])
        add(ProbeResult(
            f"future perturbation ({mode})", devs[worst] <= tol, devs[worst], tol,
            f"max |logit change| at positions <= cut when tokens after it change; cuts "
            f"{cut_points}, worst at cut {cut_points[worst]}"))

    prefix_len = max(1, seq_len // 2)
    dev = probes.check_prefix_consistency(subject, vocab, seq_len, prefix_len, seed=seed)
    add(ProbeResult("prefix consistency", dev <= tol, dev, tol,
                    f"max |logit difference| of the first {prefix_len} positions run alone vs "
                    f"inside {seq_len} tokens"))

    dev = probes.check_batch_independence(subject, vocab, seq_len, seed=seed)
    add(ProbeResult("batch independence", dev <= tol, dev, tol,
                    "max |logit change| of row 0 when rows 1-2 change"))

    add(_cache_probe(subject, vocab, seq_len, tol, seed))


# ----- memory mutation ----------------------------------------------------------------------------
def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


@torch.no_grad()
def _restore(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    for key, value in model.state_dict(keep_vars=True).items():
        if key in snapshot and value.shape == snapshot[key].shape:
            value.data.copy_(snapshot[key])


class _RestoringProxy(nn.Module):
    """`model` with its parameters and buffers reset to a snapshot before every forward.

    What the exact probes need on a model that writes into itself during a
    forward: each forward then reads the same memory, so a difference between
    two forwards can only come from their inputs.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model
        self._pristine = _snapshot(model)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        _restore(self.inner, self._pristine)
        return self.inner(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # config, init_state, make_cache, ...
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


@torch.no_grad()
def _mutation_probe(model: nn.Module, snapshot: dict[str, torch.Tensor], vocab: int,
                    seq_len: int, seed: int) -> ProbeResult:
    """One eval-mode forward; which parameters and buffers did it change?"""
    name = "evaluation mutates memory"
    g = torch.Generator().manual_seed(seed + 7)
    device = next(model.parameters()).device
    ids = torch.randint(0, vocab, (2, seq_len), generator=g).to(device)
    with evaluating(model):
        model(ids, state=model.init_state(2, device))
    changed, worst = [], 0.0
    for key, value in model.state_dict().items():
        before = snapshot.get(key)
        if before is None or before.shape != value.shape or torch.equal(before, value):
            continue
        changed.append(key)
        if value.is_floating_point():
            worst = max(worst, (value.float() - before.float()).abs().max().item())
    _restore(model, snapshot)
    if not changed:
        return ProbeResult(name, True, 0.0, None, "one eval forward changed nothing")
    shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
    return ProbeResult(
        name, True, worst, None,
        f"one eval forward changed {len(changed)} tensor(s) ({shown}): the model writes into "
        "its memory while evaluating, so repeated evaluations differ. Not a leak; the probes "
        "below restore the memory before every forward", finding=True)


#: why a probe that passed can miss a leak another probe found
_BLIND_BECAUSE = {
    "batch independence": "it only sees leaks across rows of a batch",
    "prefix consistency": "it only sees leaks that change earlier positions' logits",
    "cache equivalence": "it compares two ways of running the same tokens",
    "random-token floor": "the copy did not learn to exploit the leak in {steps} training "
                          "steps (weak leaks need more; raise floor_steps)",
}


def _mark_blind(results: list[ProbeResult], floor_steps: int) -> None:
    leak = any(r.name.startswith("future perturbation") and not r.passed for r in results)
    if not leak:
        return
    for r in results:
        if r.passed and not r.skipped and not r.finding and r.name in _BLIND_BECAUSE:
            r.blind = True
            r.detail += "; BLIND to this model's leak: " + _BLIND_BECAUSE[r.name].format(
                steps=floor_steps)


def _state_fn(model: nn.Module) -> Callable[[int], Any]:
    device = next(model.parameters()).device
    return lambda batch: model.init_state(batch, device)


def _cache_probe(model: nn.Module, vocab: int, seq_len: int, tol: float, seed: int
                 ) -> ProbeResult:
    name = "cache equivalence"
    device = next(model.parameters()).device
    try:
        cache = model.make_cache(1, model.config.context_len, device)
    except MemlmError as e:  # a model that refuses to decode left to right says why
        return ProbeResult(name, True, None, tol, f"no KV cache: {e}", skipped=True)
    if cache is None:
        return ProbeResult(name, True, None, tol,
                           f"{type(model).__name__} has no KV cache (make_cache returns None): "
                           "generation re-runs the window, nothing to compare", skipped=True)
    new = min(8, seq_len // 2)
    prompt = seq_len - new
    dev = probes.check_cache_equivalence(model, vocab, prompt_len=prompt, new=new, seed=seed)
    return ProbeResult(name, dev <= tol, dev, tol,
                       f"max |logit difference|, {prompt}-token prompt then {new} cached "
                       "single-token steps vs one full forward")


def _floor_probe(model: nn.Module, vocab: int, seq_len: int, floor_tol: float, steps: int,
                 lr: float, batch: int, seed: int) -> ProbeResult:
    name = "random-token floor"
    r = probes.random_token_floor(model, vocab, seq_len, steps=steps, lr=lr, batch=batch,
                                   seed=seed)
    if not (math.isfinite(r["nll"]) and math.isfinite(r["train_loss"])):
        return ProbeResult(name, True, None, floor_tol,
                           f"inconclusive: the copy's training diverged (train loss "
                           f"{r['train_loss']}, eval nll {r['nll']}); rerun with a lower "
                           f"floor_lr than {lr}", skipped=True)
    return ProbeResult(
        name, r["gap"] <= floor_tol, r["gap"], floor_tol,
        f"nats/token below log({vocab}); copy trained {steps} steps on uniform tokens "
        f"(last train loss {r['train_loss']:.3f}), then ppl {r['ppl']:.2f} on fresh uniform "
        f"tokens vs floor {vocab} (a causal model cannot go below)")


def all_passed(results: list[ProbeResult]) -> bool:
    """True when no probe failed (skipped probes do not fail the audit)."""
    return all(r.passed for r in results)


def format_result(r: ProbeResult) -> str:
    dev = "-" if r.deviation is None else f"{r.deviation:.3g}"
    tol = "-" if r.tolerance is None else f"{r.tolerance:.3g}"
    return f"{r.status}  {r.name:<40} deviation {dev:>9}  tolerance {tol:>7}  {r.detail}"


def format_audit(results: list[ProbeResult]) -> str:
    """One line per probe (PASS/FAIL/SKIP, deviation, tolerance, what was measured) + verdict."""
    lines = [format_result(r) for r in results]
    failed = [r.name for r in results if not r.passed]
    skipped = sum(r.skipped for r in results)
    notes = [r.name for r in results if r.finding]
    passed = len(results) - len(failed) - skipped - len(notes)
    verdict = ("CAUSAL: every probe passed" if not failed
               else f"NOT CAUSAL: {len(failed)} probe(s) failed ({', '.join(failed)})")
    blind = [r.name for r in results if r.blind]
    tail = f"; blind to the leak: {', '.join(blind)}" if blind else ""
    also = f"; also: {', '.join(notes)}" if notes else ""
    lines.append(f"{verdict}; {passed} passed, {len(failed)} failed, {skipped} skipped"
                 f"{also}{tail}")
    return "\n".join(lines)


__all__ = ["HFCausalLMAdapter", "ProbeResult", "all_passed", "audit", "format_audit",
           "format_result", "without_dropout"]
