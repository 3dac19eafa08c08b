"""Write golden parity fixtures from a checkout of an original implementation.

    python tools/parity_fixtures.py gmt-v7 /tmp/GMT-GraphMemoryTransformer
    python tools/parity_fixtures.py armt /tmp/associative-recurrent-memory-transformer
    python tools/parity_fixtures.py rmt /tmp/recurrent-memory-transformer
    python tools/parity_fixtures.py dnc-gpt2 /tmp/memoryllm --commit COMMIT
    PYTHONPATH=/tmp/tmt_deps python tools/parity_fixtures.py tmt /tmp/TemporalMesh-Transformer

Each run builds a tiny model *with the original's own code* (imported from the
checkout's files, never copied into memlm), trains it for a few steps so that no
tensor sits at its initial value, and writes two files into tests/fixtures/:

* `<name>.safetensors`: the weights under the original's own key names, exactly as
  its training script would save them, with metadata naming the repository, its
  commit id and the original's config;
* `<name>.expected.safetensors`: input ids and what the original computed on them
  (logits, loss, and per fixture whatever else it claims: memory after a forward,
  auxiliary losses, gradient norm).

tests/test_parity.py loads each fixture through memlm's importer and compares.
Read the original's code before running this script: it imports that code. The
originals touch no network in the paths used here. Only torch, transformers and
safetensors are needed; fixtures are a few tens of KB each.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"


#: set by --commit for a checkout that is not a git repository
COMMIT_OVERRIDE: str | None = None


def _commit(repo: Path) -> str:
    if COMMIT_OVERRIDE:
        return COMMIT_OVERRIDE
    out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                         text=True, check=True)
    return out.stdout.strip()


def _load_module(name: str, path: Path) -> types.ModuleType:
    """Import one file of the checkout as a module, without running its package __init__."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _save(name: str, weights: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
          meta: dict[str, str]) -> None:
    FIXTURES.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared storage (tied embeddings): store independent copies
    weights = {k: v.detach().clone().contiguous() for k, v in weights.items()}
    expected = {k: v.detach().clone().contiguous() for k, v in expected.items()}
    save_file(weights, str(FIXTURES / f"{name}.safetensors"), metadata=meta)
    save_file(expected, str(FIXTURES / f"{name}.expected.safetensors"), metadata=meta)
    size = sum((FIXTURES / f"{name}{s}.safetensors").stat().st_size for s in ("", ".expected"))
    print(f"wrote tests/fixtures/{name}[.expected].safetensors ({size / 1024:.0f} KB), "
          f"commit {meta['commit']}")


# ----- GMT v7 ---------------------------------------------------------------------------------
GMT_CONFIG = dict(vocab_size=256, seq_len=32, hidden_dim=32, n_heads=4, n_layers=2,
                  memory_slots=8, nav_dim=8, attention_dropout=0.0, embedding_dropout=0.0)
#: the weights of the training script's loss (scripts/train_gmt_v7.py defaults)
GMT_LAMBDAS = dict(track=1.0, ortho=0.05, cluster=0.3, edge=0.1, contrast=0.5)


def gmt_v7(repo: Path) -> None:
    model_py = repo / "src" / "gmt" / "model.py"
    orig = _load_module("_gmt_original_model", model_py)
    torch.manual_seed(0)
    model = orig.GMTV7(orig.GMTV7Config(**GMT_CONFIG))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.1, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(1)
    lam = GMT_LAMBDAS

    def step_loss(ids: torch.Tensor):
        logits, tr, orth, cl, ed, co, _ = model(ids[:, :-1], return_mem_loss=True)
        task = F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
        aux = (lam["track"] * tr + lam["ortho"] * orth + lam["cluster"] * cl
               + lam["edge"] * ed + lam["contrast"] * co)
        return task, aux, torch.stack([tr, orth, cl, ed, co])

    # a few training steps as the original's Trainer takes them (write-back inside forward)
    model.train()
    for step in range(4):
        model.temp.fill_(model.routing_temperature(step, 8))
        ids = torch.randint(0, GMT_CONFIG["vocab_size"], (4, 17), generator=gen)
        task, aux, _ = step_loss(ids)
        (task + aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    model.temp.fill_(model.routing_temperature(4, 8))
    # what `Trainer._save_checkpoint` writes as ckpt["model"]
    # (cloned: later forwards update usage and age in place)
    weights = {k: v.clone() for k, v in model.state_dict().items()}

    ids = torch.randint(0, GMT_CONFIG["vocab_size"], (2, 17), generator=gen)
    expected: dict[str, torch.Tensor] = {"input_ids": ids}
    model.eval()
    with torch.no_grad():
        logits, _ = model(ids[:, :-1], update_memory=False)
        expected["logits"] = logits
        expected["loss"] = F.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                           ids[:, 1:].reshape(-1))
        # faithful evaluation: every forward writes back into the centroids
        first, _ = model(ids[:, :-1])
        second, _ = model(ids[:, :-1])
        expected["logits_update_1"] = first
        expected["logits_update_2"] = second
        for i, block in enumerate(model.blocks):
            expected[f"C_after.{i}"] = block.cell.C.detach().clone()
            expected[f"usage_after.{i}"] = block.cell.usage.clone()
    # one training forward/backward from the saved weights (dropout is 0, so deterministic)
    model.load_state_dict(weights)
    model.train()
    task, aux, parts = step_loss(ids)
    (task + aux).backward()
    expected["train_task_loss"] = task.detach()
    expected["train_aux_losses"] = parts.detach()
    expected["train_total_loss"] = (task + aux).detach()
    grads = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
    expected["train_grad_norm"] = torch.stack(grads).norm()
    meta = {"repo": "Nemesis533/GMT-GraphMemoryTransformer", "commit": _commit(repo),
            "file": "src/gmt/model.py", "config": json.dumps(GMT_CONFIG),
            "lambdas": json.dumps(GMT_LAMBDAS)}
    _save("gmt_v7", weights, expected, meta)


# ----- ARMT and RMT (wrapped Hugging Face GPT-2) --------------------------------------------------
#: a tiny GPT-2 (dropout off so that train-mode forwards are deterministic)
GPT2_TINY = dict(vocab_size=256, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
SEGMENT = 8
N_SEGMENTS = 3
#: scale of W_K in the armt_correction fixture (see armt())
KEY_SCALE = 0.1


def _need_era_transformers() -> str:
    """The originals call GPT-2 blocks with keywords and read tuple outputs (transformers 4.x).

    transformers 5 calls blocks positionally and returns tensors, which the
    original wrappers cannot handle; run this with transformers 4.40 first on
    sys.path, e.g. `pip install --target /tmp/tf440 transformers==4.40.2` and
    `PYTHONPATH=/tmp/tf440 python tools/parity_fixtures.py armt REPO`.
    """
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        raise SystemExit(_need_era_transformers.__doc__)
    return transformers.__version__


def _train_wrapper(model: torch.nn.Module, steps: int, seed: int) -> None:
    """A few AdamW steps of the original wrapper on random ids (moves W_V off zero)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, GPT2_TINY["vocab_size"], (4, SEGMENT * N_SEGMENTS), generator=gen)
        out = model(input_ids=ids, labels=ids, attention_mask=torch.ones_like(ids))
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()


def _expect_wrapper(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Logits and loss over N_SEGMENTS segments, and the gradient norm of that loss."""
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, GPT2_TINY["vocab_size"], (2, SEGMENT * N_SEGMENTS), generator=gen)
    model.zero_grad()
    out = model(input_ids=ids, labels=ids, attention_mask=torch.ones_like(ids))
    out["loss"].backward()
    grads = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
    return {"input_ids": ids, "logits": out["logits"].detach(), "loss": out["loss"].detach(),
            "grad_norm": torch.stack(grads).norm()}


def armt(repo: Path) -> None:
    tf_version = _need_era_transformers()
    from transformers import GPT2Config, GPT2LMHeadModel

    try:  # the original imports wandb at module level but never calls it on this path
        import wandb  # noqa: F401
    except ImportError:
        sys.modules["wandb"] = types.ModuleType("wandb")
    orig = _load_module("_armt_original", repo / "modeling_amt" / "language_modeling.py")
    for correction, name in ((False, "armt"), (True, "armt_correction")):
        torch.manual_seed(0)
        backbone = GPT2LMHeadModel(GPT2Config(**GPT2_TINY))
        # wrap_pos=False: what every training script of the repository passes
        cell = orig.AssociativeMemoryCell(backbone, num_mem_tokens=4, d_mem=8,
                                          layers_attr="transformer.h", wrap_pos=False,
                                          correction=correction)
        model = orig.AssociativeRecurrentWrapper(cell, segment_size=SEGMENT,
                                                 max_n_segments=N_SEGMENTS, k2=-1,
                                                 segment_alignment="left")
        _train_wrapper(model, steps=6, seed=2)
        if correction:
            # small keys (|k|^2 near the 1e-5 epsilon) make the fixture sensitive to
            # where the original puts that epsilon in gamma
            with torch.no_grad():
                for layer in cell.layers:
                    layer.W_mk.weight.mul_(KEY_SCALE)
        model.eval()
        # what accelerator.save_model writes (model.safetensors, tied copies included here)
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        expected = _expect_wrapper(model, seed=2)
        config = {"gpt2": GPT2_TINY, "num_mem_tokens": 4, "d_mem": 8, "segment_size": SEGMENT,
                  "correction": correction, "wrap_pos": False, "nu": 3, "key_norm": "none",
                  "key_scale": KEY_SCALE if correction else 1.0}
        meta = {"repo": "RodkinIvan/associative-recurrent-memory-transformer",
                "commit": _commit(repo), "file": "modeling_amt/language_modeling.py",
                "config": json.dumps(config), "transformers": tf_version}
        _save(name, weights, expected, meta)


def rmt(repo: Path) -> None:
    tf_version = _need_era_transformers()
    from transformers import GPT2Config, GPT2LMHeadModel

    orig = _load_module("_rmt_original", repo / "modeling_rmt" / "language_modeling.py")
    torch.manual_seed(0)
    backbone = GPT2LMHeadModel(GPT2Config(**GPT2_TINY))
    cell = orig.MemoryCell(backbone, num_mem_tokens=4)
    model = orig.RecurrentWrapper(cell, segment_size=SEGMENT, max_n_segments=N_SEGMENTS, k2=-1,
                                  segment_alignment="left")
    _train_wrapper(model, steps=6, seed=3)
    model.eval()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    expected = _expect_wrapper(model, seed=3)
    config = {"gpt2": GPT2_TINY, "num_mem_tokens": 4, "segment_size": SEGMENT, "k2": -1}
    meta = {"repo": "booydar/recurrent-memory-transformer", "commit": _commit(repo),
            "file": "modeling_rmt/language_modeling.py", "config": json.dumps(config),
            "transformers": tf_version}
    _save("rmt", weights, expected, meta)


# ----- DNC (memoryllm) ----------------------------------------------------------------------------
DNC_SIZES = dict(hidden_size=32, num_layers=2, num_heads=4, seq_len=16, mem_slots=8,
                 mem_width=8, num_reads=2)


def dnc_gpt2(repo: Path) -> None:
    """The memory of AsishKumarDalal/memoryllm (DNCLLM: GPT-2 + DNCMemory), trained 3 steps.

    Expected values are the backbone's hidden states (the controller input), the
    logits and the final memory and usage, all from a fresh zero memory as the
    original's validation runs it. The repository may be a plain folder: its
    commit then comes from --commit.
    """
    orig = _load_module("_dnc_original", repo / "memoryllm.py")
    cfg = orig.Config()
    for key, value in DNC_SIZES.items():
        setattr(cfg, key, value)
    vocab = 256
    torch.manual_seed(0)
    model = orig.DNCLLM(cfg, vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    gen = torch.Generator().manual_seed(4)
    model.train()
    for _ in range(3):  # the original's train_model step, loss weights from its Config
        ids = torch.randint(0, vocab, (4, cfg.seq_len), generator=gen)
        memory, usage = model.init_memory(4, "cpu")
        logits, _, _, gates, w_writes = model(ids, memory, usage)
        with torch.no_grad():
            no_mem = model.forward_no_memory(ids)
        loss = (orig.lm_loss(logits, ids) + cfg.lambda_routing * orig.routing_loss(
            logits, no_mem, gates) + cfg.lambda_entropy * orig.entropy_loss(w_writes))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
    model.eval()
    weights = {k: v.clone() for k, v in model.state_dict().items()}  # ckpt["model_state"]
    ids = torch.randint(0, vocab, (2, cfg.seq_len), generator=gen)
    with torch.no_grad():
        hidden = model.transformer(ids).last_hidden_state
        memory, usage = model.init_memory(2, "cpu")
        logits, memory, usage, gates, _ = model(ids, memory, usage)
    expected = {"input_ids": ids, "hidden": hidden, "logits": logits, "memory": memory,
                "usage": usage, "write_gates": gates, "loss": orig.lm_loss(logits, ids)}
    meta = {"repo": "AsishKumarDalal/memoryllm", "commit": _commit(repo),
            "file": "memoryllm.py", "config": json.dumps({**DNC_SIZES, "vocab_size": vocab})}
    _save("dnc_gpt2", weights, expected, meta)


# ----- TMT (TemporalMesh-Transformer) -----------------------------------------------------------
#: a tiny original TMTConfig; exit_threshold 0.5 (the original's default is 0.85) so that
#: some tokens really exit at every layer and the fixture covers the freeze path
TMT_CONFIG = dict(vocab_size=256, max_seq_len=32, d_model=32, n_heads=4, n_layers=2, graph_k=4,
                  decay_rate=0.1, exit_threshold=0.5, dual_stream=True, ffn_stream_dim=16,
                  memory_anchors=4, dropout=0.0, layer_norm_eps=1e-5)


def tmt(repo: Path) -> None:
    """The whole original TMTModel (vignesh2027/TemporalMesh-Transformer), trained 4 steps.

    The package uses relative imports and einops, so the checkout goes on sys.path
    as the package `tmt` (einops must be importable, e.g. `pip install --target
    /tmp/tmt_deps einops` and PYTHONPATH=/tmp/tmt_deps). Steps follow its
    Trainer: next-token targets, `compute_loss` (CE + 0.1 x gate loss), AdamW,
    clipping at 1.0; each training forward also moves the anchors by EMA.
    """
    sys.path.insert(0, str(repo))
    from tmt.model.config import TMTConfig
    from tmt.model.model import TMTModel
    from tmt.training.loss import compute_loss

    torch.manual_seed(0)
    model = TMTModel(TMTConfig(**TMT_CONFIG))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    gen = torch.Generator().manual_seed(5)
    seq = 20
    model.train()
    for _ in range(4):
        ids = torch.randint(0, TMT_CONFIG["vocab_size"], (4, seq + 1), generator=gen)
        out = model(ids[:, :-1])
        total, _, _ = compute_loss(out.logits, ids[:, 1:], out.confidences)
        opt.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    weights = {k: v.clone() for k, v in model.state_dict().items()}  # ckpt["model_state"]
    ids = torch.randint(0, TMT_CONFIG["vocab_size"], (2, seq + 1), generator=gen)
    with torch.no_grad():
        out = model(ids[:, :-1])
        total, ce, gate = compute_loss(out.logits, ids[:, 1:], out.confidences)
    expected = {"input_ids": ids, "logits": out.logits, "loss": ce, "gate_loss": gate,
                "total_loss": total, "exit_masks": torch.stack(out.exit_masks),
                "confidences": torch.stack(out.confidences)}
    # one training forward/backward from the saved weights (dropout 0: deterministic)
    model.train()
    model.zero_grad(set_to_none=True)  # the last training step's gradients are still there
    out = model(ids[:, :-1])
    total, ce, gate = compute_loss(out.logits, ids[:, 1:], out.confidences)
    total.backward()
    grads = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
    expected["train_total_loss"] = total.detach()
    expected["train_grad_norm"] = torch.stack(grads).norm()
    for i, layer in enumerate(model.layers):  # the in-forward EMA write into the anchors
        expected[f"memory_after_train.{i}"] = layer.memory_cross.memory.detach().clone()
    meta = {"repo": "vignesh2027/TemporalMesh-Transformer", "commit": _commit(repo),
            "file": "tmt/model/model.py", "config": json.dumps(TMT_CONFIG)}
    _save("tmt", weights, expected, meta)


BUILDERS = {"gmt-v7": gmt_v7, "armt": armt, "rmt": rmt, "dnc-gpt2": dnc_gpt2, "tmt": tmt}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("which", choices=sorted(BUILDERS))
    p.add_argument("repo", type=Path, help="checkout of the original repository")
    p.add_argument("--commit", help="the checkout's commit id, when it is not a git repository")
    args = p.parse_args()
    global COMMIT_OVERRIDE
    COMMIT_OVERRIDE = args.commit
    torch.use_deterministic_algorithms(True)
    BUILDERS[args.which](args.repo.resolve())


if __name__ == "__main__":
    main()
