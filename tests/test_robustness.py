"""Robustness harness (issue 12): every bad input and fault ends in one clear line.

Each row of CASES is something a hostile but fair user does. The CLI runs in-process
(memlm.cli.main) and must exit with status 2, print exactly one `error:` line on stderr
and no traceback, and leave an existing run folder byte-for-byte unchanged (its files are
hashed before and after). The tests after the table cover what a row cannot: code
execution from a crafted checkpoint, two writers, divergence, tokenizer swaps,
bits-per-byte with --max-batches, report paths and flat memory on a 50 MB file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from memlm.cli import main
from memlm.train import run as runlayout

TEXT = "ROMEO: what light through yonder window breaks? it is the east.\n" * 200
#: a tiny, fast gpt-char-tiny run: 4 steps, checkpoints at 2 and 4
TINY = ["--quiet", "--set", "train.max_steps=4", "--set", "train.warmup_steps=1",
        "--set", "train.lr=3e-3", "--set", "train.eval_every=2", "--set", "train.save_every=2",
        "--set", "train.log_every=1", "--set", "train.batch_size=4",
        "--set", "train.eval_batches=2", "--set", "train.precision=fp32",
        "--set", "model.n_layer=1", "--set", "model.d_model=32", "--set", "model.n_head=2",
        "--set", "model.context_len=32"]


def tree_hash(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file below `folder` (empty when it does not exist)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """(exit status, stderr) of `memlm argv`, in-process; argparse exits are caught."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse reports bad flags by exiting
        code = e.code if isinstance(e.code, int) else 2
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, expect: str = "") -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, err
    assert expect.lower() in lines[0].lower(), err


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    """A finished tiny run plus the data it was trained on (never modified by tests)."""
    tmp = tmp_path_factory.mktemp("robust")
    data = tmp / "text.txt"
    data.write_text(TEXT)
    run = tmp / "run"
    assert main(["train", "gpt-char-tiny", "--data", str(data), "--out", str(run), *TINY]) == 0
    return {"data": data, "run": run}


@pytest.fixture
def env(base, tmp_path, monkeypatch) -> dict[str, Path]:
    """A private copy of the base run and some bad input files for one case."""
    monkeypatch.setenv("MEMLM_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    shutil.copytree(base["run"], run)
    files = {"data": base["data"], "run": run, "tmp": tmp_path,
             "missing": tmp_path / "no-such-file.txt", "latin1": tmp_path / "latin1.txt",
             "bad_yaml": tmp_path / "bad.yaml", "binary_yaml": tmp_path / "binary.yaml",
             "list_yaml": tmp_path / "list.yaml", "a_file": tmp_path / "plain-file"}
    files["latin1"].write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1") * 50)
    files["bad_yaml"].write_text("model:\n  arch: gpt\n  n_layer: [1, 2\n")
    files["binary_yaml"].write_bytes(b"\xff\xfe\x00\x01binary\x80\x81")
    files["list_yaml"].write_text("- model\n- train\n")
    files["a_file"].write_text("not a folder\n")
    return files


def _train(e, *extra):
    return ["train", "gpt-char-tiny", "--data", e["data"], "--out", e["run"], *TINY, *extra]


def _overwrite(e, *extra):
    return _train(e, "--overwrite", *extra)


def _damage(name: str, content: bytes) -> Callable[[dict[str, Path]], None]:
    def damage(e):
        target = e["run"] / name if name != "config.json" else (
            runlayout.latest_checkpoint(e["run"]) / "config.json")
        target.write_bytes(content)
    return damage


# (id, argv from the case's files, what the error line must mention, set-up before the run)
CASES: list[tuple[str, Callable[[dict[str, Path]], list], str, Callable | None]] = [
    # --overwrite must validate everything before touching the old run
    ("overwrite-missing-data", lambda e: ["train", "gpt-char-tiny", "--data", e["missing"],
                                          "--out", e["run"], "--overwrite", *TINY],
     "does not exist", None),
    ("overwrite-non-utf8-data", lambda e: ["train", "gpt-char-tiny", "--data", e["latin1"],
                                           "--out", e["run"], "--overwrite", *TINY],
     "UTF-8", None),
    ("overwrite-eval-every-0", lambda e: _overwrite(e, "--set", "train.eval_every=0"),
     "eval_every", None),
    # zero intervals, non-finite numbers, impossible devices
    ("save-every-0", lambda e: _overwrite(e, "--set", "train.save_every=0"), "save_every", None),
    ("log-every-0", lambda e: _overwrite(e, "--set", "train.log_every=0"), "log_every", None),
    ("lr-nan", lambda e: _overwrite(e, "--set", "train.lr=.nan"), "lr", None),
    ("lr-inf", lambda e: _overwrite(e, "--set", "train.lr=.inf"), "lr", None),
    ("lr-negative", lambda e: _overwrite(e, "--set", "train.lr=-1"), "lr", None),
    ("batch-size-list", lambda e: _overwrite(e, "--set", "train.batch_size=[4]"), "batch_size",
     None),
    ("override-bad-yaml", lambda e: _overwrite(e, "--set", "train.lr=[1"), "not valid YAML",
     None),
    ("device-tpu", lambda e: _overwrite(e, "--device", "tpu"), "device", None),
    ("device-cuda-on-cpu-build", lambda e: _overwrite(e, "--device", "cuda"), "not available",
     None),
    ("steps-negative", lambda e: _overwrite(e, "--steps", "-3"), "--steps", None),
    ("seq-len-negative-in-config", lambda e: _overwrite(e, "--set", "data.seq_len=-5"),
     "seq_len", None),
    ("train-without-resume-or-overwrite", lambda e: _train(e), "already holds a run", None),
    ("resume-different-model", lambda e: _train(e, "--resume", "--set", "model.d_model=64"),
     "different run", None),
    # malformed configs
    ("config-malformed-yaml", lambda e: ["train", e["bad_yaml"], "--out", e["run"]],
     "not valid YAML", None),
    ("config-binary", lambda e: ["train", e["binary_yaml"], "--out", e["run"]], "UTF-8", None),
    ("config-list", lambda e: ["train", e["list_yaml"], "--out", e["run"]], "mapping", None),
    # the run folder itself is damaged
    ("resume-binary-run-yaml", lambda e: _train(e, "--resume"), "run.yaml",
     _damage("run.yaml", b"\xff\xfe\x00binary")),
    ("eval-binary-latest", lambda e: ["eval", e["run"]], "LATEST", _damage("LATEST", b"\xff\x00")),
    ("eval-latest-escapes", lambda e: ["eval", e["run"]], "step-",
     _damage("LATEST", b"../../../../etc\n")),
    ("eval-binary-config-json", lambda e: ["eval", e["run"]], "config.json",
     _damage("config.json", b"\x89PNG\r\n\x1a\n\x00\xff")),
    ("eval-list-config-json", lambda e: ["eval", e["run"]], "JSON object",
     _damage("config.json", b"[1, 2, 3]")),
    ("generate-list-config-json", lambda e: ["generate", e["run"], "--prompt", "hi"],
     "JSON object", _damage("config.json", b"[]")),
    # numeric flags out of range
    ("eval-batch-size-0", lambda e: ["eval", e["run"], "--data", e["data"], "--batch-size", "0"],
     "--batch-size", None),
    ("eval-seq-len-negative", lambda e: ["eval", e["run"], "--data", e["data"], "--seq-len",
                                         "-64"], "--seq-len", None),
    ("eval-stride-0", lambda e: ["eval", e["run"], "--stride", "0"], "--stride", None),
    ("eval-max-batches-0", lambda e: ["eval", e["run"], "--max-batches", "0"], "--max-batches",
     None),
    ("eval-missing-data", lambda e: ["eval", e["run"], "--data", e["missing"]], "does not exist",
     None),
    ("eval-non-utf8-data", lambda e: ["eval", e["run"], "--data", e["latin1"]], "UTF-8", None),
    ("stream-segment-0", lambda e: ["stream", e["run"], "--data", e["data"], "--segment", "0"],
     "--segment", None),
    ("stream-batch-size-negative", lambda e: ["stream", e["run"], "--data", e["data"],
                                              "--batch-size", "-2"], "--batch-size", None),
    ("generate-max-new-tokens-negative", lambda e: ["generate", e["run"], "--prompt", "hi",
                                                    "--max-new-tokens", "-1"],
     "--max-new-tokens", None),
    ("generate-top-p-2", lambda e: ["generate", e["run"], "--prompt", "hi", "--top-p", "2"],
     "--top-p", None),
    ("generate-temperature-nan", lambda e: ["generate", e["run"], "--prompt", "hi",
                                            "--temperature", "nan"], "--temperature", None),
    ("flag-not-a-number", lambda e: ["eval", e["run"], "--batch-size", "eight"], "invalid int",
     None),
    # the environment: a folder that is a file, an unusable cache
    ("out-is-a-file", lambda e: ["train", "gpt-char-tiny", "--data", e["data"], "--out",
                                 e["a_file"], *TINY], "is a file", None),
    ("out-below-a-file", lambda e: ["train", "gpt-char-tiny", "--data", e["data"], "--out",
                                    e["a_file"] / "run", *TINY], "Not a directory", None),
]


@pytest.mark.parametrize("case_id, argv, expect, setup", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(case_id, argv, expect, setup, env, capsys):
    if case_id == "device-cuda-on-cpu-build" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if setup is not None:
        setup(env)
    before = tree_hash(env["run"])
    listing = sorted(set(os.listdir(env["tmp"])) - {"cache"})  # the token cache may appear
    code, err = run_cli(argv(env), capsys)
    assert_one_line_error(code, err, expect)
    assert tree_hash(env["run"]) == before, "the existing run folder was changed"
    assert sorted(set(os.listdir(env["tmp"])) - {"cache"}) == listing, \
        "a half-made folder was left behind"


# ----- the environment fails ------------------------------------------------------------------


def test_read_only_out_folder_is_refused_and_left_empty(env, capsys, monkeypatch):
    ro = env["tmp"] / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root writes anyway: make the permission check see read-only
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, m, *a, **k: False if Path(p) == ro
                            else real(p, m, *a, **k))
    try:
        code, err = run_cli(["train", "gpt-char-tiny", "--data", env["data"], "--out", ro,
                             *TINY], capsys)
        assert_one_line_error(code, err, "not writable")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_unusable_token_cache_is_a_one_line_error(env, capsys, monkeypatch):
    # a cache "folder" that is a file cannot be written even by root
    monkeypatch.setenv("MEMLM_CACHE", str(env["a_file"]))
    fresh = env["tmp"] / "fresh.txt"
    fresh.write_text(TEXT[: len(TEXT) // 2])
    code, err = run_cli(["eval", env["run"], "--data", fresh], capsys)
    assert_one_line_error(code, err, "token cache")


def test_disk_full_during_checkpoint_restores_the_old_run(env, capsys, monkeypatch):
    from memlm import io  # the weights writer of every checkpoint

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io, "save_file", full_disk)
    before = tree_hash(env["run"])
    code, err = run_cli(_overwrite(env), capsys)
    assert_one_line_error(code, err, "No space left")
    assert tree_hash(env["run"]) == before


def test_locked_out_folder_is_refused_at_once(env, capsys):
    before = tree_hash(env["run"])
    lock = runlayout.RunLock(env["run"])  # as a running `memlm train --out` holds it
    try:
        t0 = time.perf_counter()
        code, err = run_cli(_train(env, "--resume", "--steps", "6"), capsys)
        assert time.perf_counter() - t0 < 10
        assert_one_line_error(code, err, "another memlm process")
    finally:
        lock.release()
    assert tree_hash(env["run"]) == before
    # the lock is gone with its holder: the same command now works
    code, err = run_cli(_train(env, "--resume", "--steps", "6"), capsys)
    assert code == 0, err


def test_second_process_writing_the_same_out_fails(env, tmp_path):
    """Two real processes: the second `memlm train --out` exits 2 while the first runs."""
    out = tmp_path / "shared-out"
    slow = ["--set", "train.max_steps=3000", "--set", "train.eval_every=3000",
            "--set", "train.save_every=3000"]
    cmd = [sys.executable, "-m", "memlm", "train", "gpt-char-tiny", "--data", str(env["data"]),
           "--out", str(out), *TINY, *slow]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 60
        while not (out / runlayout.RUN_CONFIG).exists():  # the first holds the lock by now
            assert first.poll() is None and time.time() < deadline, "first writer did not start"
            time.sleep(0.1)
        second = subprocess.run(cmd + ["--overwrite"], capture_output=True, text=True,
                                timeout=60)
        assert_one_line_error(second.returncode, second.stderr, "another memlm process")
        assert first.poll() is None, "the second writer disturbed the first"
    finally:
        first.kill()
        first.wait()


def test_torn_metrics_line_is_skipped_with_a_warning(env, capsys):
    metrics = env["run"] / runlayout.METRICS
    metrics.write_text(metrics.read_text() + '{"kind": "train", "step": 5, "lo')  # cut by a crash
    code, err = run_cli(_train(env, "--resume", "--steps", "6"), capsys)
    assert code == 0 and "Traceback" not in err
    assert "warning" in err and "damaged line" in err
    lines = [json.loads(ln) for ln in metrics.read_text().splitlines()]
    assert max(r["step"] for r in lines) == 6


def test_audit_on_a_malicious_hugging_face_folder(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.json").write_text(json.dumps({
        "model_type": "evil", "architectures": ["Evil"],
        "auto_map": {"AutoConfig": "evil.EvilConfig",
                     "AutoModelForCausalLM": "evil.EvilModel"}}))
    (evil / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    code, err = run_cli(["audit", evil], capsys)
    assert_one_line_error(code, err, "cannot load")
    assert not marker.exists()
    (evil / "config.json").write_bytes(b"\x00\xffnot json")
    assert_one_line_error(*run_cli(["audit", evil], capsys), "config")


# ----- no code execution from a checkpoint --------------------------------------------


def test_crafted_memory_state_cannot_run_code(env, capsys, tmp_path):
    marker = tmp_path / "marker"
    ckpt = runlayout.latest_checkpoint(env["run"])
    state_path = ckpt / runlayout.TRAINER_STATE
    state = torch.load(state_path, weights_only=True)
    state["memory_state"] = {"__kind__": "namedtuple", "cls": "memlm.train.checkpoint:os.system",
                             "items": [f"id > {marker}"]}
    torch.save(state, state_path)
    before = tree_hash(env["run"])
    code, err = run_cli(_train(env, "--resume", "--steps", "6"), capsys)
    assert_one_line_error(code, err, "not a known memory-state type")
    assert not marker.exists(), "the checkpoint ran a shell command"
    assert tree_hash(env["run"]) == before


@pytest.mark.parametrize("packed", [
    {"__kind__": "dataclass", "cls": "memlm.train.checkpoint:os.system", "fields": {}},
    {"__kind__": "namedtuple", "cls": "builtins:eval", "items": ["1"]},
    {"__kind__": "namedtuple", "cls": "memlm.config:RunConfig", "items": []},
    {"__kind__": "list", "items": [{"__kind__": "dataclass", "cls": 3, "fields": {}}]},
    {"__kind__": "pickle", "items": []},
])
def test_unpack_state_refuses_anything_off_the_allow_list(packed):
    from memlm.errors import CheckpointError
    from memlm.train.checkpoint import unpack_state

    with pytest.raises(CheckpointError):
        unpack_state(packed)


def test_memory_states_of_every_stateful_model_round_trip():
    import memlm
    from memlm.registry import ARCHITECTURES
    from memlm.train.checkpoint import pack_state, unpack_state

    for name in ARCHITECTURES.names() if hasattr(ARCHITECTURES, "names") else ARCHITECTURES:
        model = memlm.build(name, n_layer=1, d_model=32, n_head=2, context_len=16)
        if not model.is_stateful:
            continue
        out = model(torch.randint(0, 200, (2, 16)), state=model.init_state(2))
        back = unpack_state(pack_state(out.state))
        flat = [torch.equal(a, b) for a, b in zip(_tensors(out.state), _tensors(back),
                                                  strict=True)]
        assert flat and all(flat), name


def _tensors(obj):
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    import dataclasses

    if dataclasses.is_dataclass(obj):
        return [t for f in dataclasses.fields(obj) for t in _tensors(getattr(obj, f.name))]
    return []


# ----- --overwrite and divergence keep what was good ---------------------------


def test_overwrite_replaces_the_run_after_its_first_checkpoint(env, capsys):
    code, err = run_cli(_overwrite(env, "--set", "train.seed=7"), capsys)
    assert code == 0, err
    assert not (env["run"] / ".replaced-run").exists()
    assert "seed: 7" in (env["run"] / runlayout.RUN_CONFIG).read_text()


def test_interrupted_overwrite_is_restored_on_the_next_start(env, capsys):
    from memlm.train.trainer import ASIDE, _move_run

    before = tree_hash(env["run"])
    _move_run(env["run"], env["run"] / ASIDE)  # as a SIGKILLed --overwrite leaves it
    (env["run"] / runlayout.RUN_CONFIG).write_text("half: written\n")
    code, err = run_cli(_train(env), capsys)  # no flag: the restored run is refused as before
    assert_one_line_error(code, err, "already holds a run")
    assert tree_hash(env["run"]) == before


def _diverging(e, *extra, lr: float = 1e9):
    return ["train", "gpt-char-tiny", "--data", e["data"], "--out", e["run"], *TINY,
            "--set", f"train.lr={lr}", "--set", "train.warmup_steps=0", "--set",
            "train.grad_clip=0", "--set", "train.max_steps=40", "--set", "train.save_every=1",
            "--set", "train.eval_every=40", *extra]


@pytest.mark.parametrize("lr", [1e9, 1e4])  # NaN at the first save / after a good one
def test_divergence_keeps_only_a_finite_checkpoint(env, capsys, lr):
    import memlm
    from memlm.eval.perplexity import evaluate

    run = env["tmp"] / "diverge"
    code, err = run_cli(_diverging({**env, "run": run}, lr=lr), capsys)
    assert_one_line_error(code, err, "training stopped")
    line = [ln for ln in err.splitlines() if "error:" in ln][0]
    latest = runlayout.latest_checkpoint(run) if run.exists() else None
    if latest is None:
        assert "no checkpoint was written" in line
        assert not run.exists(), "a run without a checkpoint was left behind"
        return
    assert str(latest) in line, "the message must name the checkpoint that exists"
    model = memlm.load(run)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    from memlm.data.tokenizers import load_tokenizer

    ids = load_tokenizer(run / runlayout.TOKENIZER).encode(TEXT[:2000])
    assert math.isfinite(evaluate(model, ids, seq_len=32)["nll"])


def test_divergence_before_the_first_save_restores_the_old_run(env, capsys):
    before = tree_hash(env["run"])
    code, err = run_cli(_diverging(env, "--overwrite", "--set", "train.save_every=40"), capsys)
    assert_one_line_error(code, err, "no checkpoint was written")
    assert "restored" in err
    assert tree_hash(env["run"]) == before


# ----- the tokenizer must be the model's own -------------------------------------------


def test_swapped_tokenizer_of_the_same_size_is_refused(env, capsys):
    from memlm.data.tokenizers import load_tokenizer, tokenizer_from_dict

    tok = load_tokenizer(env["run"] / runlayout.TOKENIZER)
    data = tok.to_dict()
    # another run's tokenizer of the same size: 3 characters differ, so ids shift
    gone = [c for c in data["chars"] if c.islower()][-3:]
    chars = [c for c in data["chars"] if c not in gone] + [
        c for c in "#%&@" if c not in data["chars"]][:3]
    swapped = tokenizer_from_dict({**data, "chars": "".join(chars)})
    assert swapped.vocab_size == tok.vocab_size and swapped.encode("the") != tok.encode("the")
    for path in env["run"].rglob(runlayout.TOKENIZER):
        swapped.save(path)
    code, err = run_cli(["generate", env["run"], "--prompt", "the the"], capsys)
    assert_one_line_error(code, err, "fingerprint")
    assert tok.fingerprint() in err and swapped.fingerprint() in err
    code, err = run_cli(_train(env, "--resume", "--steps", "6"), capsys)
    assert_one_line_error(code, err, "fingerprint")


# ----- bits per byte counts the scored bytes -------------------------------------------


def test_bits_per_byte_with_max_batches(env, capsys, tmp_path):
    out = tmp_path / "r.json"
    code, err = run_cli(["eval", env["run"], "--data", env["data"], "--max-batches", "1",
                         "--batch-size", "2", "--json", out], capsys)
    assert code == 0, err
    res = json.loads(out.read_text())["ppl"]
    assert res["tokens"] == 2 * 32 - 1 or res["tokens"] <= 2 * 32
    # ASCII text with a char tokenizer: one byte per scored token
    assert res["bits_per_byte"] == pytest.approx(res["bits_per_token"], rel=1e-9)


# ----- report names never become paths outside the folder -----------------------------


def test_report_does_not_write_outside_its_folder(env, tmp_path):
    from memlm.experiments.report import safe_name, write_report

    cmp_dir = tmp_path / "a" / "b" / "cmp"
    cmp_dir.mkdir(parents=True)
    row = {"arch": "../../x", "params": 1, "metrics": {}, "runs": [str(env["run"])]}
    (cmp_dir / "results.json").write_text(json.dumps({"rows": [row], "baseline": "gpt"}))
    outside_before = sorted(p for p in tmp_path.rglob("*") if cmp_dir not in p.parents
                            and p != cmp_dir)
    write_report(cmp_dir)
    outside_after = sorted(p for p in tmp_path.rglob("*") if cmp_dir not in p.parents
                           and p != cmp_dir)
    assert outside_after == outside_before
    assert "/" not in safe_name("../../x") and not safe_name("..").startswith(".")


# ----- evaluation memory is flat in the file size -------------------------------------


def _peak_rss_mb(argv: list[str], cache: Path) -> float:
    """Peak RSS (MB) of `python -m memlm argv` in a fresh child process.

    VmHWM, not ru_maxrss: ru_maxrss survives exec, so a child forked from a large pytest
    process would report the parent's size; VmHWM belongs to the new address space.
    """
    code = ("import runpy, sys; sys.argv = ['memlm'] + sys.argv[1:]\n"
            "try:\n    runpy.run_module('memlm', run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "hwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0]\n"
            "print('PEAK', int(hwm.split()[1]))")
    proc = subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "MEMLM_CACHE": str(cache), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.split("PEAK")[-1]) / 1024


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_eval_and_stream_of_a_50mb_file_stay_flat(env, tmp_path):
    big = tmp_path / "big.txt"
    block = (TEXT * 40).encode()
    with open(big, "wb") as f:
        for _ in range(50 * (1 << 20) // len(block) + 1):
            f.write(block)
    assert big.stat().st_size >= 50 * (1 << 20)
    small = env["data"]
    cache = tmp_path / "cache"
    run = env["run"]
    base = _peak_rss_mb(["eval", run, "--data", small, "--max-batches", "2"], cache)
    for argv in (["eval", run, "--data", big, "--max-batches", "2"],
                 ["stream", run, "--data", big, "--max-tokens", "256", "--segment", "32"]):
        peak = _peak_rss_mb(argv, cache)
        # the old code held the whole text and its ids: 30 MB of RSS per MB of text
        print(f"{argv[0]} 50 MB file: peak RSS {peak:.0f} MB (small file: {base:.0f} MB)")
        assert peak < base + 120, f"{argv[0]}: {peak:.0f} MB vs {base:.0f} MB on a small file"
