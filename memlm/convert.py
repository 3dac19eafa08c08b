"""Import checkpoints of the original implementations into memlm model folders.

`memlm convert --from SOURCE PATH --out DIR` reads a checkpoint in the format the
original's own training script saves, renames its tensors to memlm's names, builds
the memlm config that reproduces the original (faithful mode where memlm's
default differs), loads the weights strictly and writes a folder that
`memlm eval`, `memlm inspect`, `MemLM.from_pretrained` and transformers'
`AutoModelForCausalLM` all read.

Loading never runs code from disk: `.safetensors` files are read with
safetensors, `.pt`/`.pth`/`.bin` files with `torch.load(weights_only=True)`,
which only rebuilds tensors and plain containers; anything else is refused.
The parity of each importer with the original code is proven by the fixtures in
tests/fixtures/ (written by tools/parity_fixtures.py) and tests/test_parity.py.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memlm.config import _split
from memlm.errors import CheckpointError, ConfigError

if TYPE_CHECKING:  # torch is imported on use: `memlm --help` stays fast
    import torch

    from memlm.models.base import MemLM

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
#: keys under which training scripts nest the model's state dict
NESTED_KEYS = ("model", "model_state", "state_dict", "model_state_dict", "module")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, without executing anything stored in it.

    A `.pt` file that holds a training checkpoint (a dict whose "model",
    "model_state", "state_dict" or "model_state_dict" entry is the state dict, as
    the GMT, memoryllm and TMT trainers save it) yields that inner state dict;
    optimizer and scheduler entries are ignored.
    """
    import torch

    path = Path(path)
    if path.is_dir():
        found = [p for p in sorted(path.iterdir()) if p.suffix in WEIGHT_SUFFIXES]
        if len(found) != 1:
            raise CheckpointError(
                f"{path} is a folder with {len(found)} checkpoint files "
                f"({', '.join(p.name for p in found[:4]) or 'none'}); pass the file itself.")
        path = found[0]
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {path} as safetensors: {e}") from e
    if path.suffix not in WEIGHT_SUFFIXES:
        raise CheckpointError(
            f"{path} is not a checkpoint memlm can read safely; expected one of "
            f"{', '.join(WEIGHT_SUFFIXES)} (read with safetensors or torch.load(weights_only=True)).")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError,
            AttributeError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain tensor checkpoint that "
            f"torch.load(weights_only=True) accepts ({first[:200]}). memlm never unpickles "
            "code; re-save the state dict with torch.save(model.state_dict()) or safetensors."
        ) from e
    return _unwrap(obj, path)


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    import torch

    for _ in range(3):
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return {str(k): v for k, v in obj.items()}
        inner = next((obj[k] for k in NESTED_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    raise CheckpointError(
        f"{path} holds no state dict: expected a mapping of names to tensors, or a training "
        f"checkpoint with one under {'/'.join(NESTED_KEYS)}.")


# ----- sources ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """How to turn one original's state dict into a memlm model."""

    help: str
    #: state dict, config overrides -> model holding the original's weights
    build: Callable[[dict[str, torch.Tensor], dict[str, Any]], MemLM]
    default_tokenizer: str = "gpt2"


def _shape(sd: Mapping[str, torch.Tensor], key: str, what: str) -> tuple[int, ...]:
    if key not in sd:
        raise CheckpointError(f"the checkpoint has no {key!r}; it is not a {what} state dict.")
    return tuple(sd[key].shape)


def _strip(sd: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        for p in prefixes:
            k = k.removeprefix(p)
        out[k] = v
    return out


def build_gmt_v7(sd: dict[str, torch.Tensor], overrides: dict[str, Any]) -> MemLM:
    """GMT v7 (`ckpt["model"]` of Nemesis533/GMT-GraphMemoryTransformer), faithful mode.

    Sizes come from the tensor shapes; the head count is not stored in the
    checkpoint and defaults to the original's 12 (override with n_head=...).
    """
    from memlm.models.gmt import GMT, GMTConfig

    sd = _strip(sd, ("_orig_mod.", "module."))
    what = "GMT v7"
    vocab, d = _shape(sd, "embed.weight", what)
    pos = _shape(sd, "pos_embed.weight", what) if "pos_embed.weight" in sd else \
        _shape(sd, "pos_embed", what)
    slots, _ = _shape(sd, "blocks.0.cell.C", what)
    nav, _ = _shape(sd, "blocks.0.cell.Q_proj.weight", what)
    n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    fields: dict[str, Any] = dict(
        arch="gmt", vocab_size=vocab, d_model=d, context_len=pos[-2], n_layer=n_layer,
        n_head=12, memory_slots=slots, nav_dim=nav, dropout=0.1, attn_dropout=0.1,
        pos_emb="learned", attn_bias=False, bias=True, tie_embeddings=True, faithful=True,
        # the original's absolute targets (memlm scales the entropy target with ln K)
        edge_entropy_target=4.0, cluster_target=slots // 4)
    fields.update(overrides)
    try:
        config = GMTConfig.from_dict(fields)
    except TypeError as e:
        raise ConfigError(f"bad override for gmt-v7: {e}") from e
    return GMT.from_reference_state_dict(sd, config)


# ----- ARMT / RMT: wrapped Hugging Face GPT-2 -----------------------------------------------------
#: GPT-2 config keys an override may set (the head count is not in a state dict)
GPT2_KEYS = ("n_head", "layer_norm_epsilon", "activation_function", "resid_pdrop", "embd_pdrop",
             "attn_pdrop")
#: GPT-2 buffers that older transformers versions saved; memlm's backbone rebuilds them
GPT2_BUFFERS = (".attn.bias", ".attn.masked_bias")


def _gpt2_from_wrapped(sd: dict[str, torch.Tensor], overrides: dict[str, Any], what: str):
    """A fresh GPT-2 of the sizes in `sd` (keys under "model.", original layout)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    vocab, d = _shape(sd, "model.transformer.wte.weight", what)
    n_pos, _ = _shape(sd, "model.transformer.wpe.weight", what)
    layers = {int(k.split(".")[3]) for k in sd if k.startswith("model.transformer.h.")}
    if not layers:
        raise CheckpointError(f"the checkpoint has no model.transformer.h.* layers; it is not a "
                              f"{what} state dict of a GPT-2 backbone.")
    inner = next((v.shape[-1] for k, v in sd.items() if k.endswith("mlp.c_fc.weight")), 4 * d)
    hf = {"vocab_size": vocab, "n_positions": n_pos, "n_embd": d, "n_layer": max(layers) + 1,
          "n_head": 12, "n_inner": None if inner == 4 * d else inner,
          # GPT-2's end-of-text id exists only in its own 50,257-token vocabulary
          "bos_token_id": 50256 if vocab > 50256 else None,
          "eos_token_id": 50256 if vocab > 50256 else None}
    hf.update({k: overrides.pop(k) for k in GPT2_KEYS if k in overrides})
    try:
        config = GPT2Config(**hf)
        model = GPT2LMHeadModel(config)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"cannot build the GPT-2 backbone of this {what} checkpoint: {e}") from e
    return model


def _wrapped_state_dict(sd: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """Strip the wrapper prefixes; drop the alias copies torch's state_dict() repeats.

    The original ARMT cell also registers the layer list as `memory_cell.layers`,
    so a `torch.save(model.state_dict())` holds every layer twice; those copies
    must equal the ones under `memory_cell.model.` and are dropped.
    """
    import torch

    sd = _strip(sd, ("module.", "_orig_mod."))
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if not key.startswith("memory_cell."):
            raise CheckpointError(f"unexpected key {key!r}: a {what} checkpoint of the original "
                                  "wrapper has every key under memory_cell.")
        key = key.removeprefix("memory_cell.")
        if key.startswith("layers."):
            aliases[key] = value
        elif key.endswith(GPT2_BUFFERS):
            continue
        else:
            out[key] = value
    for key, value in aliases.items():
        twin = out.get("model.transformer.h." + key.removeprefix("layers."))
        if twin is None or not torch.equal(twin, value):
            raise CheckpointError(f"memory_cell.{key} has no equal copy under "
                                  "memory_cell.model.transformer.h; the checkpoint is inconsistent.")
    head, wte = out.get("model.lm_head.weight"), out.get("model.transformer.wte.weight")
    if head is not None and wte is not None and not torch.equal(head, wte):
        raise CheckpointError("model.lm_head.weight differs from the tied token embedding; "
                              "memlm's GPT-2 backbone ties them.")
    out.pop("model.lm_head.weight", None)
    return out


def _load_renamed(model: MemLM, renamed: dict[str, torch.Tensor], what: str,
                  tied: frozenset[str] = frozenset()) -> None:
    """Load renamed original weights into `model` after checking every key and shape.

    `tied` names parameters the model ties to another one, so the original need not
    carry them; anything else missing or left over is a one-line CheckpointError.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in renamed and k not in tied]
    unexpected = [k for k in renamed if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"the {what} checkpoint does not match: missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]} (after renaming).")
    for key, value in renamed.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(f"{key!r} has shape {tuple(value.shape)}, the model expects "
                                  f"{tuple(expected[key].shape)}; set the sizes with --set.")
    model.load_state_dict(renamed, strict=not tied)


def _load_wrapped(model: MemLM, renamed: dict[str, torch.Tensor], what: str) -> MemLM:
    _load_renamed(model, renamed, what, tied=frozenset({"backbone.model.lm_head.weight"}))
    return model


_ARMT_NAMES = {"W_mq": "memory.w_q", "W_mk": "memory.w_k", "W_mv": "memory.w_v",
               "W_mb": "memory.w_beta"}


def build_armt(sd: dict[str, torch.Tensor], overrides: dict[str, Any]) -> MemLM:
    """ARMT (RodkinIvan/associative-recurrent-memory-transformer, modeling_amt) on GPT-2.

    The paper code's settings: DPFP order 3, one head, denominator on, no key
    normalisation, memory tokens appended, positions restarting every segment
    (wrap_pos=False, as every script of the repository passes). `correction`
    is a constructor flag not stored in checkpoints: True (the GPT-2 BABILong
    scripts) unless overridden; segment_len defaults to 512.
    """
    import memlm
    from memlm.models.armt import ARMTConfig

    what = "ARMT"
    sd = _wrapped_state_dict(sd, what)
    m, _ = _shape(sd, "memory", what)
    d_mem, _ = _shape(sd, "model.transformer.h.0.W_mq.weight", what)
    backbone = _gpt2_from_wrapped(sd, overrides, what)
    fields: dict[str, Any] = dict(num_mem_tokens=m, d_mem=d_mem, dpfp_order=3, mem_heads=1,
                                  use_denom=True, correction=True, key_norm="none",
                                  first_write_whole=True,
                                  segment_len=512, layers_attr="transformer.h")
    if "mem_capacity" in ARMTConfig.__dataclass_fields__:
        fields["mem_capacity"] = None  # the original's memory is unbounded
    fields.update(overrides)
    model = memlm.wrap("armt", backbone, **fields)
    renamed: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key == "memory":
            renamed["mem_tokens"] = value
            continue
        parts = key.split(".")
        if key.startswith("model.transformer.h.") and parts[4] in _ARMT_NAMES:
            parts[4] = _ARMT_NAMES[parts[4]]
        renamed["backbone." + ".".join(parts)] = value
    return _load_wrapped(model, renamed, what)


def build_rmt(sd: dict[str, torch.Tensor], overrides: dict[str, Any]) -> MemLM:
    """RMT (booydar/recurrent-memory-transformer, modeling_rmt) on GPT-2.

    [read | segment | write] with the same memory in both blocks, memory taken
    after the final norm, positions restarting every segment. segment_len is not
    stored in checkpoints and defaults to 512.
    """
    import memlm

    what = "RMT"
    sd = _wrapped_state_dict(sd, what)
    m, _ = _shape(sd, "memory", what)
    backbone = _gpt2_from_wrapped(sd, overrides, what)
    fields: dict[str, Any] = dict(num_mem_tokens=m, segment_len=512, memory_from="final_norm",
                                  layers_attr="transformer.h")
    fields.update(overrides)
    model = memlm.wrap("rmt", backbone, **fields)
    renamed = {("mem_init" if k == "memory" else "backbone." + k): v for k, v in sd.items()}
    return _load_wrapped(model, renamed, what)


# ----- DNC (memoryllm): the memory only -----------------------------------------------------------
#: the original's separate interface layers, in the order of memlm's fused faithful interface
DNC_INTERFACE = ("write_key_proj", "write_vec_proj", "erase_vec_proj", "write_gate_proj",
                 "read_key_proj")


def convert_dnc_memory(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """memoryllm's `DNCLLM` memory (`ckpt["model_state"]`) -> memlm `DNCMemory(faithful=True)`.

    The five interface layers are stacked into memlm's one interface matrix, `temp`
    becomes the scalar `beta`, `read_proj` keeps its name: the
    memory's part of a whole-model import (`build_dnc_gpt2`), also usable alone.
    """
    import torch

    sd = _strip(sd, ("module.", "_orig_mod."))
    what = "memoryllm DNC"
    for name in DNC_INTERFACE:
        _shape(sd, f"memory.{name}.weight", what)
    out = {
        "interface.weight": torch.cat([sd[f"memory.{n}.weight"] for n in DNC_INTERFACE]),
        "interface.bias": torch.cat([sd[f"memory.{n}.bias"] for n in DNC_INTERFACE]),
        "beta": sd["memory.temp"].reshape(()) if "memory.temp" in sd else None,
        "read_proj.weight": sd.get("read_proj.weight"),
        "read_proj.bias": sd.get("read_proj.bias"),
    }
    missing = [k for k, v in out.items() if v is None]
    if missing:
        raise CheckpointError(f"the {what} checkpoint lacks {missing} (memory.temp, read_proj.*).")
    return out


def build_dnc_gpt2(sd: dict[str, torch.Tensor], overrides: dict[str, Any]) -> MemLM:
    """memoryllm's whole `DNCLLM` (`ckpt["model_state"]`): GPT-2 + DNC memory, faithful.

    The GPT-2 backbone (`transformer.*`, Hugging Face Conv1D layout: weights stored
    input-major) becomes memlm's GPT decoder with learned positions and GPT-2's
    tanh GELU (`activation="gelu_tanh"`); the memory goes through
    `convert_dnc_memory`; the original's own `lm_head` is untied. Sizes come from
    the shapes; the head count and the slot count are not stored and default to
    the original Config's 8 heads and 64 slots (override with n_head=..., mem_slots=...).
    """
    import memlm

    sd = _strip(sd, ("module.", "_orig_mod."))
    what = "memoryllm DNCLLM"
    vocab, d = _shape(sd, "transformer.wte.weight", what)
    n_pos, _ = _shape(sd, "transformer.wpe.weight", what)
    _shape(sd, "lm_head.weight", what)
    layers = {int(k.split(".")[2]) for k in sd if k.startswith("transformer.h.")}
    if not layers:
        raise CheckpointError(f"the checkpoint has no transformer.h.* layers; it is not a {what} "
                              "state dict.")
    slots_width = _shape(sd, "memory.write_vec_proj.weight", what)[0]
    reads = _shape(sd, "memory.read_key_proj.weight", what)[0] // slots_width
    inner = _shape(sd, "transformer.h.0.mlp.c_fc.weight", what)[1]
    fields: dict[str, Any] = dict(
        vocab_size=vocab, d_model=d, context_len=n_pos, n_layer=max(layers) + 1, n_head=8,
        dropout=0.1, pos_emb="learned", activation="gelu_tanh", bias=True, tie_embeddings=False,
        ffn_mult=max(inner // d, 1), faithful=True, mem_slots=64, mem_width=slots_width,
        num_reads=reads, lambda_entropy=0.05, lambda_routing=0.1)
    fields.update(overrides)
    if inner != fields["ffn_mult"] * d:
        raise CheckpointError(f"the MLP is {inner} wide, not a multiple of d_model={d}; memlm's "
                              "GPT cannot hold it.")
    try:
        model = memlm.build("dnc", **fields)
    except TypeError as e:
        raise ConfigError(f"bad override for dnc-gpt2: {e}") from e
    renamed: dict[str, torch.Tensor] = {
        "decoder.wte.weight": sd["transformer.wte.weight"],
        "decoder.wpe.weight": sd["transformer.wpe.weight"],
        "decoder.ln_f.weight": sd["transformer.ln_f.weight"],
        "decoder.ln_f.bias": sd["transformer.ln_f.bias"],
        "decoder.lm_head.weight": sd["lm_head.weight"],
    }
    gpt2_names = {"ln_1": "ln1", "ln_2": "ln2", "attn.c_attn": "attn.qkv",
                  "attn.c_proj": "attn.proj", "mlp.c_fc": "ffn.fc", "mlp.c_proj": "ffn.proj"}
    for key, value in sd.items():
        if not key.startswith("transformer.h.") or key.endswith(GPT2_BUFFERS):
            continue
        layer, rest = key.removeprefix("transformer.h.").split(".", 1)
        name, kind = rest.rsplit(".", 1)
        if name not in gpt2_names:
            raise CheckpointError(f"unexpected key {key!r} in the {what} backbone.")
        # Conv1D keeps its weight as (in, out); nn.Linear as (out, in)
        conv = kind == "weight" and not name.startswith("ln")
        renamed[f"decoder.blocks.{layer}.{gpt2_names[name]}.{kind}"] = value.t() if conv else value
    renamed.update({f"memory.{k}": v for k, v in convert_dnc_memory(sd).items()})
    _load_renamed(model, renamed, what)
    return model


# ----- TMT (TemporalMesh-Transformer) -------------------------------------------------------------
def _tmt_renames(n_layer: int) -> dict[str, str | tuple[str, str]]:
    """memlm name -> original name, or (k, v) names fused into one memlm K/V matrix."""
    names: dict[str, str | tuple[str, str]] = {
        "wte.weight": "embedding.embed.weight", "temporal_decay": "pos_encoder.w_decay",
        "ln_f.weight": "norm.weight", "ln_f.bias": "norm.bias"}
    for i in range(n_layer):
        m, o = f"blocks.{i}.", f"layers.{i}."
        for j in (1, 2, 3):
            names[f"{m}ln{j}.weight"] = f"{o}norm{j}.weight"
            names[f"{m}ln{j}.bias"] = f"{o}norm{j}.bias"
        for part, orig in (("attn", "attn"), ("anchors", "memory_cross")):
            names[f"{m}{part}.q.weight"] = f"{o}{orig}.q_proj.weight"
            names[f"{m}{part}.kv.weight"] = (f"{o}{orig}.k_proj.weight", f"{o}{orig}.v_proj.weight")
            names[f"{m}{part}.proj.weight"] = f"{o}{orig}.out_proj.weight"
        names[f"{m}attn.w_decay"] = f"{o}attn.w_decay"
        names[f"{m}anchors.memory"] = f"{o}memory_cross.memory"
        for stream, orig in (("a", "syntax"), ("b", "semantic")):
            for kind in ("weight", "bias"):
                names[f"{m}ffn.{stream}.fc.{kind}"] = f"{o}ffn.{orig}_up.{kind}"
                names[f"{m}ffn.{stream}.proj.{kind}"] = f"{o}ffn.{orig}_down.{kind}"
        for kind in ("weight", "bias"):
            names[f"{m}ffn.gate.{kind}"] = f"{o}ffn.gate.{kind}"
            names[f"{m}exit_gate.proj.{kind}"] = f"{o}exit_gate.gate_proj.{kind}"
    return names


def build_tmt(sd: dict[str, torch.Tensor], overrides: dict[str, Any]) -> MemLM:
    """The original TMT (vignesh2027/TemporalMesh-Transformer, `ckpt["model_state"]`).

    Built as memlm's `attn_mode="tmt_faithful_leaky"`, the whole original model,
    which READS FUTURE TOKENS (the model warns; `memlm audit` flags it). Sizes,
    heads (attn.w_decay has one entry per head), stream width and anchor count
    come from the shapes; graph_k, exit_threshold and max_seq_len are not stored
    and default to the original TMTConfig's 8, 0.85 and 1024 (override with
    mesh_k=..., exit_threshold=..., context_len=...).
    """
    import warnings

    import torch

    import memlm
    from memlm.memory.mesh_attention import LeakyModeWarning

    sd = _strip(sd, ("module.", "_orig_mod."))
    what = "TemporalMesh-Transformer"
    vocab, d = _shape(sd, "embedding.embed.weight", what)
    (n_head,) = _shape(sd, "layers.0.attn.w_decay", what)
    stream, _ = _shape(sd, "layers.0.ffn.syntax_up.weight", what)
    anchors, _ = _shape(sd, "layers.0.memory_cross.memory", what)
    n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    head = sd.pop("output_proj.weight", None)
    if head is not None and not torch.equal(head, sd["embedding.embed.weight"]):
        raise CheckpointError("output_proj.weight differs from embedding.embed.weight; the "
                              "original ties them, so this is not one of its checkpoints.")
    fields: dict[str, Any] = dict(
        vocab_size=vocab, d_model=d, n_head=n_head, n_layer=n_layer, context_len=1024,
        attn_mode="tmt_faithful_leaky", mesh_k=8, exit_threshold=0.85, ffn_type="dual",
        ffn_gate="vector", ffn_stream_dim=stream, n_anchors=anchors, dropout=0.1, bias=True,
        tie_embeddings=True, norm_eps=1e-5)
    fields.update(overrides)
    with warnings.catch_warnings():  # the leak is stated in the docs, the card and the audit
        warnings.simplefilter("ignore", LeakyModeWarning)
        try:
            model = memlm.build("tmt", **fields)
        except TypeError as e:
            raise ConfigError(f"bad override for tmt: {e}") from e
    renamed: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for name, orig in _tmt_renames(n_layer).items():
        parts = orig if isinstance(orig, tuple) else (orig,)
        absent = [p for p in parts if p not in sd]
        if absent:
            raise CheckpointError(f"the checkpoint has no {absent[0]!r}; it is not a {what} "
                                  "state dict (or its layers differ from the original's).")
        renamed[name] = torch.cat([sd[p] for p in parts]) if len(parts) > 1 else sd[parts[0]]
        used.update(parts)
    unexpected = sorted(set(sd) - used)
    if unexpected:
        raise CheckpointError(f"unexpected keys in the {what} checkpoint: {unexpected[:4]}.")
    expected = model.state_dict()
    for key, value in renamed.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(f"{key!r} has shape {tuple(value.shape)}, the model expects "
                                  f"{tuple(expected[key].shape)}; set the sizes with --set.")
    model.load_state_dict(renamed, strict=False)
    missing = [k for k in expected if k not in renamed and k != "lm_head.weight"]
    if missing:
        raise CheckpointError(f"the {what} checkpoint left {missing[:4]} unset.")
    return model


def dnc_memory_from_original(sd: dict[str, torch.Tensor], cfg: dict[str, Any]) -> Any:
    """memoryllm's DNC memory as a memlm `DNCMemory(faithful=True)` holding its weights.

    `cfg` carries the original's sizes: hidden_size, mem_slots, mem_width, num_reads.
    """
    from memlm.memory.dnc import DNCMemory

    memory = DNCMemory(cfg["hidden_size"], cfg["mem_slots"], cfg["mem_width"],
                       cfg["num_reads"], faithful=True)
    memory.load_state_dict(convert_dnc_memory(sd))
    return memory


SOURCES: dict[str, Source] = {
    "gmt-v7": Source("GMT v7 trainer checkpoint (ckpt['model'], diag_mask, top-level temp)",
                     build_gmt_v7),
    "armt": Source("ARMT wrapper state dict (memory_cell.*, GPT-2 backbone)", build_armt),
    "rmt": Source("RMT wrapper state dict (memory_cell.*, GPT-2 backbone)", build_rmt),
    "dnc-gpt2": Source("memoryllm DNCLLM checkpoint (ckpt['model_state'], GPT-2 + DNC memory)",
                       build_dnc_gpt2),
    "tmt": Source("TemporalMesh-Transformer checkpoint (ckpt['model_state']); LEAKY faithful "
                  "model", build_tmt),
}


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """`key=value` strings (YAML values) -> dict; keys are memlm model config fields."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, value = _split(item)
        out[key.removeprefix("model.")] = value
    return out


def convert(source: str, path: str | Path, overrides: dict[str, Any] | None = None) -> MemLM:
    """A memlm model holding the weights of the original checkpoint at `path`."""
    if source not in SOURCES:
        from memlm.errors import unknown_name

        raise unknown_name("convert source", source, SOURCES)
    sd = read_state_dict(path)
    return SOURCES[source].build(sd, dict(overrides or {}))


def convert_to_folder(source: str, path: str | Path, out: str | Path,
                      tokenizer_spec: str | None = None,
                      overrides: dict[str, Any] | None = None) -> MemLM:
    """Convert and write a memlm model folder (weights, config, card, tokenizer)."""
    from memlm.data.tokenizers import check_vocab, make_tokenizer
    from memlm.train.run import TOKENIZER, TOKENIZER_FINGERPRINT

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} exists and is not empty; choose a new --out folder.")
    model = convert(source, path, overrides)
    tokenizer = make_tokenizer(tokenizer_spec or SOURCES[source].default_tokenizer)
    check_vocab(tokenizer, model.config.vocab_size, where=f"--tokenizer {tokenizer.name}")
    model.save_pretrained(out, **{TOKENIZER_FINGERPRINT: tokenizer.fingerprint(),
                                  "converted_from": f"{source}:{Path(path).name}"})
    tokenizer.save(out / TOKENIZER)
    return model


# ----- command line -----------------------------------------------------------------------------
def add_parser(sub: Any) -> None:
    """Register `memlm convert` on the CLI's subparsers (kept here so cli.py stays small)."""
    p = sub.add_parser(
        "convert", help="import an original implementation's checkpoint (GMT v7, ARMT, RMT, DNC-GPT2, TMT)",
        description="Read a checkpoint as the original's training script saves it (read with "
        "safetensors or torch.load(weights_only=True), never unpickling code) and write a "
        "memlm model folder that memlm eval / inspect and transformers load.")
    p.add_argument("--from", dest="source", required=True, choices=sorted(SOURCES),
                   help="required; " + "; ".join(f"{k}: {v.help}" for k, v in SOURCES.items()))
    p.add_argument("path", help="checkpoint file (.safetensors/.pt/.pth/.bin) or its folder")
    p.add_argument("--out", required=True, help="new folder for the memlm model (required)")
    p.add_argument("--tokenizer", help="tokenizer spec saved with the model (default: gpt2)")
    p.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE",
                   help="a setting the checkpoint does not store, e.g. n_head=4, "
                   "segment_len=1024, correction=false (repeatable; default: none, the importer's settings)")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args: Any) -> int:
    model = convert_to_folder(args.source, args.path, args.out, args.tokenizer,
                              parse_overrides(args.overrides))
    print(f"converted {args.source} checkpoint {args.path} -> {args.out} "
          f"({model.config.arch}, {model.num_params():,} parameters)")
    return 0
