"""Conformance checks every architecture must pass: the probes and the audit that runs them.

`memlm.testing.check_causality(...)` and friends live in `probes.py`; `memlm audit` (the
same probes run on any memlm or transformers model, with a readable report) in `audit.py`.
"""

from memlm.testing.probes import (
    assert_causal,
    check_batch_independence,
    check_cache_equivalence,
    check_causality,
    check_generation_causality,
    check_prefix_consistency,
    check_save_load,
    loss_curve,
    params_without_grad,
    random_token_floor,
)

__all__ = [
    "assert_causal",
    "check_batch_independence",
    "check_cache_equivalence",
    "check_causality",
    "check_generation_causality",
    "check_prefix_consistency",
    "check_save_load",
    "loss_curve",
    "params_without_grad",
    "random_token_floor",
]
