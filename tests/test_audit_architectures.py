"""`memlm audit` passes every default architecture and fails TMT's leaking faithful mode."""

from __future__ import annotations

import warnings

import pytest

import memlm
from memlm.eval.audit import all_passed, audit, format_audit

TINY = dict(vocab_size=64, n_layer=2, n_head=2, d_model=32, context_len=32)


@pytest.mark.slow
@pytest.mark.parametrize("arch", memlm.architectures())
def test_every_default_architecture_passes_the_audit(arch):
    model = memlm.build(arch, **TINY)
    results = audit(model, seq_len=24, floor_steps=40)
    assert all_passed(results), format_audit(results)


def test_tmt_faithful_mode_fails_the_audit():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        leaky = memlm.build("tmt", **TINY, attn_mode="tmt_faithful_leaky")
    results = audit(leaky, seq_len=24, floor=False)
    assert not all_passed(results)
    failed = {r.name for r in results if not r.passed and not r.skipped}
    assert any(name.startswith("future perturbation") for name in failed), format_audit(results)
