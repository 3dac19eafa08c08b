"""The `memlm` command: a thin layer over the Python API.

Every subcommand parses its flags, calls one library function and prints the
result. memlm's own errors (bad config, missing data, corrupt checkpoint), bad
flags and file-system failures (permissions, full disk) are printed as one clear
line and exit with status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from memlm.errors import ConfigError, MemlmError


def _add_run_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SEC.KEY=VAL",
                   help="override a config value, e.g. --set train.lr=3e-4 (repeatable; "
                   "default: none)")


class _HelpWithDefaults(argparse.HelpFormatter):
    """Every flag's help ends with its default: the value, "off" for a switch.

    Flags whose default is None say in their own help what happens without them
    (e.g. "default: the config's value"), since None means nothing to a user.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if isinstance(action, argparse._StoreTrueAction):
            return f"{text} (default: off)"
        if action.default not in (None, []):
            return f"{text} (default: %(default)s)"
        return text


def parse_seeds(text: str) -> list[int]:
    """`--seeds` everywhere: a comma list of seeds, each run once ("0,1,2" = three runs)."""
    try:
        seeds = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds takes a comma list of integers such as 0,1,2 (three runs, "
                          f"each seed once; no repeats), got {text!r}.")
    return seeds


# ----- train ------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    if args.nproc and args.nproc > 1 and "RANK" not in os.environ:
        return _relaunch_with_torchrun(args.nproc)
    from memlm.train.run import run_config_from_flags, train_summary
    from memlm.train.trainer import train

    cfg = run_config_from_flags(args.config, args.overrides, data=args.data,
                                tokenizer=args.tokenizer, device=args.device, steps=args.steps)
    result = train(cfg, args.out, resume=args.resume, overwrite=args.overwrite,
                   progress=not args.quiet, fsdp=args.fsdp)
    if int(os.environ.get("RANK", "0")) == 0:
        print(train_summary(result, cfg, args.out))
    return 0


def _relaunch_with_torchrun(nproc: int) -> int:
    """`memlm train ... --nproc N` == `torchrun --standalone --nproc_per_node N -m memlm ...`."""
    import subprocess

    argv = [a for a in sys.argv[1:]]
    i = argv.index("--nproc")
    del argv[i : i + 2]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "memlm", *argv]
    return subprocess.call(cmd)


# ----- eval -------------------------------------------------------------------------------


def cmd_eval(args: argparse.Namespace) -> int:
    from memlm.data.corpus import source_tokens
    from memlm.eval.tasks import EvalOptions, format_results, run_tasks
    from memlm.train.run import load_run, validation_tokens

    model, tokenizer = load_run(args.run)
    tokens = ((lambda: source_tokens(tokenizer, args.data)) if args.data
              else (lambda: validation_tokens(args.run, tokenizer)))
    results = run_tasks(model, tokenizer, args.tasks, EvalOptions.from_object(args), tokens)
    print(format_results(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


# ----- generate ---------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    from memlm.generation import generate_text
    from memlm.train.run import load_run

    model, tokenizer = load_run(args.run)
    print(generate_text(model, tokenizer, args.prompt, args.max_new_tokens, stop=args.stop or (),
                        stop_eot=args.stop_eot, seed=args.seed, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, use_cache=not args.no_cache))
    return 0


# ----- calibrate --------------------------------------------------------------------------


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Pick a TMT model's early-exit threshold on held-out text and save the model with it."""
    from memlm.data.corpus import read_text
    from memlm.memory.early_exit import calibrate_on_tokens, format_calibration
    from memlm.train.run import load_run, save_model_folder

    model, tokenizer = load_run(args.run)
    res = calibrate_on_tokens(model, tokenizer.encode(read_text(args.data)), eps=args.eps,
                              windows=args.windows, where=args.run, source=args.data)
    print(format_calibration(res, model.config.n_layer))
    if args.out:
        save_model_folder(model, tokenizer, args.out)
        print(f"model with exit_threshold = {res['lambda']} saved to {args.out}")
    return 0


# ----- inspect ----------------------------------------------------------------------------


def cmd_inspect(args: argparse.Namespace) -> int:
    from memlm.inspect.text import inspect_text
    from memlm.train.run import load_run

    model, tokenizer = load_run(args.run)
    text, out_dir = inspect_text(model, tokenizer, args.text or "", args.out, args.layer,
                                 args.graph)
    print(text)
    if out_dir is not None:
        print(f"pictures written to {out_dir}/")
    return 0


# ----- stream -----------------------------------------------------------------------------


def cmd_stream(args: argparse.Namespace) -> int:
    from memlm.data.corpus import source_tokens
    from memlm.eval.stream import stream_file
    from memlm.eval.tasks import format_results
    from memlm.train.run import load_run

    model, tokenizer = load_run(args.run)
    source: Any = args.data
    if Path(args.data).suffix not in (".bin", ".npy"):  # text: through the token cache
        source = source_tokens(tokenizer, args.data)
    res = stream_file(model, tokenizer, source, segment_len=args.segment,
                      batch_size=args.batch_size, max_tokens=args.max_tokens, progress=True,
                      precision=args.precision)
    print(format_results({"stream": res}))
    return 0


# ----- demo / compare / report ------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from memlm.experiments.demo import run_demo

    archs = args.archs.split(",") if args.archs else None
    seeds = tuple(parse_seeds(args.seeds))
    overrides = {k: v for k, v in (("steps", args.steps), ("bptt_window", args.bptt),
                                   ("layout", args.layout), ("train_chars", args.train_chars),
                                   ("precision", args.precision), ("threads", args.threads))
                 if v is not None}
    run_demo(args.out, mode="ci" if args.ci else "full", archs=archs, seeds=seeds,
             progress=not args.quiet, **overrides)
    if args.open:
        _open_in_browser(Path(args.out) / "report.html")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from memlm.experiments.compare import compare

    size = dict(n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model,
                context_len=args.context_len)
    print(compare(args.archs, args.out, config=args.config, size=size, data=args.data,
                  tokenizer=args.tokenizer, tokens=args.tokens, steps=args.steps,
                  batch_size=args.batch_size, params=args.params, seeds=parse_seeds(args.seeds),
                  progress=not args.quiet))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from memlm.experiments.report import write_report

    path = write_report(args.folder, args.output)
    print(f"report written to {path}")
    if args.open:
        _open_in_browser(path)
    return 0


def _open_in_browser(path: Path) -> None:
    import webbrowser

    if not webbrowser.open(path.resolve().as_uri()):
        print(f"(no browser available; open {path} yourself)")


# ----- audit / diagnose -------------------------------------------------------------------


def cmd_audit(args: argparse.Namespace) -> int:
    from memlm.testing.audit import all_passed, audit, format_audit
    from memlm.train.run import load_any_model

    results = audit(load_any_model(args.model), seq_len=args.seq_len)
    print(format_audit(results))
    return 0 if all_passed(results) else 1


def cmd_diagnose(args: argparse.Namespace) -> int:
    from memlm.experiments.diagnose import diagnose_run_or_arch
    from memlm.specs import parse_counts

    print(diagnose_run_or_arch(
        args.run, args.task, parse_counts(args.pairs or args.sizes or "8"),
        parse_counts(args.distance or "0"), n_samples=args.samples, seed=args.seed,
        context_len=args.context_len, seq_len=args.seq_len, train_steps=args.train_steps))
    return 0


# ----- main -------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with bad flags reported on one line (exit status 2), like memlm's errors."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


#: integer flags that may be 0 or negative; every other integer flag must be >= 1
_ANY_INT = {"seed", "layer"}
_NONNEGATIVE_INT = {"nproc"}


def check_flag_ranges(args: argparse.Namespace) -> None:
    """Range-check every numeric flag before any work starts.

    Generic on purpose: a new integer flag (a size, count, length or interval) is checked
    without being listed. A negative --seq-len once grew memory until the kernel killed it.
    """
    for name, value in vars(args).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int):
            low = None if name in _ANY_INT else 0 if name in _NONNEGATIVE_INT else 1
            if low is not None and value < low:
                raise ConfigError(f"{flag} must be >= {low}, got {value}.")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise ConfigError(f"{flag} must be a finite number, got {value}.")
    if getattr(args, "temperature", None) is not None and args.temperature < 0:
        raise ConfigError(f"--temperature must be >= 0, got {args.temperature}.")
    if getattr(args, "top_p", None) is not None and not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {args.top_p}.")


def build_parser() -> argparse.ArgumentParser:
    from memlm import __version__

    parser = _Parser(prog="memlm", description=__doc__.splitlines()[0],
                     formatter_class=_HelpWithDefaults)
    parser.add_argument("--version", action="version", version=f"memlm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help,
                              formatter_class=_HelpWithDefaults)

    p = command("train", "train a model from a YAML config")
    p.add_argument("config", help="YAML file or preset name (see memlm/configs/)")
    p.add_argument("--data", help="text file, folder, glob, builtin:NAME or hf:NAME:CONFIG "
                   "(default: the config's data.source)")
    p.add_argument("--tokenizer", help="byte | char | gpt2[:DIR] | bpe:SIZE "
                   "(default: the config's data.tokenizer)")
    p.add_argument("--out", help="run folder (checkpoints, metrics.jsonl, curve.png) "
                   "(default: none, nothing is written)")
    p.add_argument("--steps", type=int, help="optimizer steps; with a curriculum, its stages "
                   "are cut to (or the last one lengthened to) this many steps "
                   "(default: the config's train.max_steps or curriculum)")
    p.add_argument("--device", help="cpu | cuda | auto (default: the config's train.device)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    p.add_argument("--nproc", type=int, default=0,
                   help="processes (torchrun --standalone); 0 or 1: this process only")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 instead of DDP")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_run_overrides(p)
    p.set_defaults(func=cmd_train)

    p = command("eval", "evaluate a run: perplexity, BABILong, zero-shot")
    p.add_argument("run", help="run folder or saved model folder")
    p.add_argument("--data", help="text file to evaluate on (default: the run's val split)")
    p.add_argument("--tasks", help="comma list: ppl, babilong:qa1@0k,1k,4k, zeroshot:piqa "
                   "(default: ppl)")
    p.add_argument("--seq-len", type=int, help="tokens per window (default: the model's "
                   "context length)")
    p.add_argument("--stride", type=int, help="sliding-window stride (default: seq len)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per batch")
    p.add_argument("--max-batches", type=int, help="stop after this many batches "
                   "(default: all of the text)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto: bf16 only where it is faster")
    p.add_argument("--samples", type=int, default=50, help="BABILong samples per length")
    p.add_argument("--limit", type=int, help="zero-shot items per task (default: all)")
    p.add_argument("--zeroshot-dir", help="folder with arc_easy/piqa/winogrande/hellaswag JSONL "
                   "(default: $MEMLM_ZEROSHOT_DIR or ../shared/data/zeroshot)")
    p.add_argument("--babi", help="bAbI v1.2 folder (default: $MEMLM_BABI_DIR or "
                   "../shared/data/babi)")
    p.add_argument("--background", help="BABILong background text file (default: generated)")
    p.add_argument("--seed", type=int, default=0, help="seed of BABILong sampling")
    p.add_argument("--json", help="also write the results to this JSON file (default: none)")
    p.set_defaults(func=cmd_eval)

    p = command("generate", "sample text from a run")
    p.add_argument("run", help="run folder or saved model folder")
    p.add_argument("--prompt", required=True, help="text to continue (required)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to add at most")
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    p.add_argument("--top-k", type=int, help="sample from the k likeliest tokens "
                   "(default: all tokens)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass (default: none, all "
                   "tokens)")
    p.add_argument("--stop", action="append", help="stop at this text's first token "
                   "(repeatable; default: none)")
    p.add_argument("--stop-eot", action="store_true", help="stop at the end-of-text token")
    p.add_argument("--no-cache", action="store_true", help="re-read the window every step "
                   "instead of using the KV cache")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.set_defaults(func=cmd_generate)

    p = command("calibrate", "pick a TMT model's early-exit threshold on held-out text")
    p.add_argument("run", help="run folder or saved model folder (a tmt model)")
    p.add_argument("--data", required=True,
                   help="held-out text: file, folder, glob or builtin:... (required)")
    p.add_argument("--eps", type=float, default=0.05,
                   help="allowed share of tokens whose argmax differs from full depth")
    p.add_argument("--windows", type=int, default=64, help="context windows of text to use")
    p.add_argument("--out", help="save the calibrated model (and tokenizer) to this folder "
                   "(default: print only)")
    p.set_defaults(func=cmd_calibrate)

    p = command("inspect", "what the memory did, token by token")
    p.add_argument("run", help="run folder or saved model folder")
    p.add_argument("--text", help="text to run through the model with tracing on "
                   "(default: none; required unless --graph)")
    p.add_argument("--graph", action="store_true", help="draw the memory graph of --layer")
    p.add_argument("--layer", type=int, help="layer to draw (default: the inspector's choice)")
    p.add_argument("--out", help="folder (or .png path) for pictures (default: no pictures)")
    p.set_defaults(func=cmd_inspect)

    p = command("stream", "perplexity of a text of any length, constant memory")
    p.add_argument("run", help="run folder or saved model folder")
    p.add_argument("--data", required=True, help="text file to read (required)")
    p.add_argument("--segment", type=int, default=512, help="tokens per segment")
    p.add_argument("--max-tokens", type=int, help="stop after this many tokens (default: all)")
    p.add_argument("--batch-size", type=int, default=1, help="rows read side by side")
    p.add_argument("--precision", default="fp32", choices=["bf16", "fp32"],
                   help="compute precision")
    p.set_defaults(func=cmd_stream)

    p = command("demo", "the main job: memory models vs dense on built-in data")
    p.add_argument("--out", default="memlm-demo", help="folder for runs, results and report")
    p.add_argument("--archs", help="comma list (default: every registered architecture)")
    p.add_argument("--seeds", default="0",
                   help="comma list of seeds; each architecture trains once per seed")
    p.add_argument("--ci", action="store_true", help="reduced mode (seconds, for CI)")
    # exploring the setup (defaults: memlm/experiments/demo.py MODES); the table states what ran
    p.add_argument("--steps", type=int, help="training steps per model (default: the mode's)")
    p.add_argument("--bptt", type=int, help="segments a stateful model reads per step "
                   "(default: the mode's)")
    p.add_argument("--layout", choices=["episodes", "stream"],
                   help="episodes: fresh memory every step; stream: memory carried along rows "
                   "(default: the mode's)")
    p.add_argument("--train-chars", type=int, help="characters of generated training text "
                   "(default: the mode's)")
    p.add_argument("--precision", choices=["fp32", "bf16"],
                   help="fp32 (default) or bf16 autocast, for training and scoring")
    p.add_argument("--threads", type=int, help="torch threads per training process (default 1)")
    p.add_argument("--open", action="store_true", help="open the report in a browser")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    p = command("compare", "architectures at matched size, budget and seeds")
    p.add_argument("archs", nargs="+", help="architecture names; the first is the baseline")
    p.add_argument("--config", help="YAML whose model/train/data sections are the base "
                   "(default: the --n-layer/--d-model/... flags and default train/data)")
    p.add_argument("--data", help="data source (default: the config's, else builtin:recall)")
    p.add_argument("--tokenizer", help="byte | char | gpt2[:DIR] | bpe:SIZE "
                   "(default: the config's, else byte)")
    p.add_argument("--params", help="target parameter count, e.g. 5M, matched within 5%% "
                   "(default: no matching, the given sizes)")
    p.add_argument("--tokens", help="training tokens per run, e.g. 20M "
                   "(default: from the steps)")
    p.add_argument("--steps", type=int, help="optimizer steps per run; a curriculum is cut or "
                   "lengthened to match (default: the config's train.max_steps)")
    p.add_argument("--batch-size", type=int, help="sequences per step "
                   "(default: the config's train.batch_size)")
    p.add_argument("--seeds", default="0,1,2",
                   help="comma list of seeds; each architecture trains once per seed")
    p.add_argument("--n-layer", type=int, default=4, help="layers (without --config)")
    p.add_argument("--n-head", type=int, default=4, help="attention heads (without --config)")
    p.add_argument("--d-model", type=int, default=128, help="model width (without --config)")
    p.add_argument("--context-len", type=int, default=128,
                   help="context length (without --config)")
    p.add_argument("--out", default="cmp", help="folder for runs, results.json and the report")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_compare)

    p = command("report", "one self-contained HTML page for a compare folder")
    p.add_argument("folder", help="folder written by memlm compare or memlm demo")
    p.add_argument("--output", help="HTML path (default: FOLDER/report.html)")
    p.add_argument("--open", action="store_true", help="open the page in a browser")
    p.set_defaults(func=cmd_report)

    p = command("audit", "is this model really causal? (memlm or HF folder)")
    p.add_argument("model", help="memlm run/model folder or a transformers model folder")
    p.add_argument("--seq-len", type=int, help="tokens per probe (default: the model's "
                   "context length, at most 64)")
    p.set_defaults(func=cmd_audit)

    p = command("diagnose", "recall accuracy vs difficulty (MQAR, needle, copy)")
    p.add_argument("run", help="run folder, or an architecture name to train a tiny one")
    p.add_argument("--task", default="mqar", choices=["mqar", "needle", "copy"],
                   help="which recall probe")
    p.add_argument("--pairs", help="MQAR key-value pairs, e.g. 8,32,128 (default: 8)")
    p.add_argument("--sizes", help="needle haystack lengths / copy lengths (default: 8)")
    p.add_argument("--distance", help="MQAR distance / copy delay / needle depth %%, e.g. 1k,8k "
                   "(default: 0)")
    p.add_argument("--samples", type=int, default=20, help="samples per setting")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples (and tiny model)")
    p.add_argument("--train-steps", type=int, default=300,
                   help="steps when training a tiny model from an architecture name")
    p.add_argument("--context-len", type=int, default=128,
                   help="context length of a tiny model trained here")
    p.add_argument("--seq-len", type=int, help="training sample length, >= task length "
                   "(default: --context-len)")
    p.set_defaults(func=cmd_diagnose)

    from memlm.convert import add_parser as add_convert_parser

    add_convert_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_flag_ranges(args)
        return int(args.func(args) or 0)
    except MemlmError as e:
        print(f"memlm {args.command}: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:  # the environment, not memlm: permissions, a full disk, ...
        what = e.strerror or str(e)
        where = f": {e.filename}" if e.filename else ""
        print(f"memlm {args.command}: error: {what}{where}. Check the path, its permissions "
              "and the free disk space.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _one_line(message: str) -> str:
    return " ".join(message.split())


if __name__ == "__main__":
    raise SystemExit(main())
