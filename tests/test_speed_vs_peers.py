"""benchmarks/speed_vs_peers.py: its nanoGPT peer, the ratios it reports, and a real tiny run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from conftest import load_script

import memlm

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "speed_vs_peers.py"


def _load():
    return load_script("benchmarks/speed_vs_peers.py")


def test_nanogpt_peer_is_the_dense_baseline_shape():
    """Same parameter count as memlm's dense GPT with learned positions, and it learns."""
    bench = _load()
    torch.manual_seed(0)
    peer = bench.nanogpt_model(n_layer=2, n_head=4, d_model=32, seq=16, vocab=64)
    ours = memlm.build("gpt", vocab_size=64, n_layer=2, n_head=4, d_model=32, context_len=16,
                       pos_emb="learned")
    assert sum(p.numel() for p in peer.parameters()) == ours.num_params()
    opt = bench.nanogpt_optimizer(peer, lr=3e-3)
    x = torch.arange(16).remainder(5)[None].repeat(4, 1)  # a period-5 sequence
    y = torch.roll(x, -1, dims=1)
    first = float(peer(x, y).detach())
    for _ in range(30):
        loss = peer(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert float(peer(x, y).detach()) < 0.5 * first


def _run(kind: str, arch: str | None, tps: float, **extra) -> dict:
    return {"kind": kind, "arch": arch, "size": "small", "precision": "fp32",
            "tokens_per_sec": tps, "flops_per_token": 1e6, **extra}


def test_ratios_use_the_neighbouring_dense_pair():
    bench = _load()
    payload = {
        "peaks": {"small": {"fp32": {"square": 4e10, "model_shapes": 5e10}}},
        "runs": [
            _run("nanogpt", None, 1000.0), _run("memlm", "gpt", 1100.0),
            _run("memlm", "armt", 550.0),
            _run("nanogpt", None, 500.0), _run("memlm", "gpt", 400.0),  # the load went up
            _run("memlm", "dnc", 200.0),
        ],
    }
    rows = {r["arch"]: r for r in bench.summarise(payload)}
    assert rows["armt"]["vs_dense"] == 0.5 and rows["armt"]["vs_nanogpt"] == 0.55
    assert rows["dnc"]["vs_dense"] == 0.5 and rows["dnc"]["vs_nanogpt"] == 0.4
    dense = rows["gpt (dense)"]
    assert dense["vs_nanogpt_range"] == [0.8, 1.1]
    # MFU against the larger peak: median 750 tokens/s * 1e6 FLOPs / 5e10
    assert abs(dense["mfu"] - 750.0 * 1e6 / 5e10) < 1e-12
    table = bench.markdown({**payload, "machine": {"cpu": "Test CPU", "threads": 2}})
    assert "| small | fp32 | armt | 550 | 0.50 | 0.55 |" in table
    assert "| 0.95 (0.80-1.10) |" in table and "Test CPU" in table


def test_gemm_shapes_cover_forward_and_both_gradients():
    shapes = _load()._gemm_shapes(n_layer=1, d_model=8, seq=4, batch=2)
    assert (8, 8, 24) in shapes and (8, 24, 8) in shapes and (24, 8, 8) in shapes
    assert len(shapes) == 15


def test_smallest_run_end_to_end(tmp_path):
    """One real measurement of each kind, each in its own process; JSON, table and --render."""
    out = tmp_path / "speed.json"
    cmd = [sys.executable, str(BENCH), "--sizes", "tiny", "--precisions", "fp32", "--archs",
           "gpt", "--seconds", "0.05", "--warmup", "1", "--min-steps", "1",
           "--peak-seconds", "0.05", "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(out.read_text())
    kinds = [r["kind"] for r in payload["runs"]]
    assert kinds == ["peak", "nanogpt", "memlm", "peak"]
    assert payload["machine"]["threads"] == 1 and payload["machine"]["cpu"]
    dense = payload["rows"][0]
    assert dense["arch"] == "gpt (dense)" and dense["tokens_per_sec"] > 0 and 0 < dense["mfu"]
    assert out.with_suffix(".md").read_text() in proc.stdout
    rendered = subprocess.run([sys.executable, str(BENCH), "--render", str(out)],
                              capture_output=True, text=True, timeout=60)
    assert rendered.returncode == 0
    assert rendered.stdout == out.with_suffix(".md").read_text()


def test_bad_input_is_one_line_and_status_2(tmp_path):
    bad = tmp_path / "not_results.json"
    bad.write_text("[1, 2]")
    for args in (["--archs", "nope"], ["--sizes", "huge"], ["--render", str(bad)],
                 ["--render", str(tmp_path / "missing.json")]):
        proc = subprocess.run([sys.executable, str(BENCH), *args, "--out",
                               str(tmp_path / "o.json")],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, args
        assert proc.stderr.count("\n") == 1 and "error:" in proc.stderr, proc.stderr
    assert not (tmp_path / "o.json").exists()


def test_interleaving_order(monkeypatch):
    """The dense pair comes before every architecture; --pair-once only opens and closes."""
    bench = _load()
    seen: list[str] = []

    def fake(spec, timeout):
        seen.append(spec.get("arch") or spec["kind"])
        if spec["kind"] == "peak":
            return {p: {"square": 1e9, "model_shapes": 1e9} for p in bench.PRECISIONS}
        return {"tokens_per_sec": 1.0, "flops_per_token": 1.0}

    monkeypatch.setattr(bench, "run_worker", fake)
    args = bench.parse_args(["--sizes", "tiny", "--precisions", "fp32", "--archs", "gpt,armt,dnc"])
    bench.measure(args)
    assert seen == ["peak", "nanogpt", "gpt", "armt", "nanogpt", "gpt", "dnc", "peak"]
    seen.clear()
    bench.measure(bench.parse_args(["--quick", "--precisions", "fp32", "--archs", "gpt,armt,dnc"]))
    assert seen == ["peak", "nanogpt", "gpt", "armt", "dnc", "nanogpt", "gpt", "peak"]


def test_variants_sizes_and_compile_options(monkeypatch):
    """`dnc-compiled` is the DNC with compile_step (its first step in the table); `medium`
    exists and is opt-in; the inductor options reach the worker and need --compile."""
    bench = _load()
    model = bench.memlm_model_config("dnc-compiled", "small")
    assert model["arch"] == "dnc" and model["compile_step"] is True
    assert "compile_step" not in bench.memlm_model_config("dnc", "small")
    assert bench.SIZES["medium"]["d_model"] == 512 and "medium" not in bench.DEFAULT_SIZES
    payload = {
        "peaks": {"small": {"fp32": {"square": 4e10, "model_shapes": 5e10}}},
        "runs": [_run("nanogpt", None, 1000.0), _run("memlm", "gpt", 1000.0),
                 _run("memlm", "dnc-compiled", 600.0, first_step_s=41.2)],
    }
    assert "| small | fp32 | dnc-compiled (first step 41 s) | 600 | 0.60 |" in bench.markdown(payload)
    specs = []

    def fake(spec, timeout):
        specs.append(spec)
        if spec["kind"] == "peak":
            return {p: {"square": 1e9, "model_shapes": 1e9} for p in bench.PRECISIONS}
        return {"tokens_per_sec": 1.0, "flops_per_token": 1.0}

    monkeypatch.setattr(bench, "run_worker", fake)
    bench.measure(bench.parse_args(["--sizes", "tiny", "--precisions", "fp32", "--archs",
                                    "dnc-compiled", "--compile", "--max-autotune",
                                    "--inductor-cache", "/tmp/x"]))
    assert [s.get("arch") for s in specs] == [None, None, "gpt", "dnc-compiled", None]
    assert all(s["max_autotune"] and s["inductor_cache"] == "/tmp/x" for s in specs)
    try:
        bench.parse_args(["--max-autotune"])
    except bench.BenchError as e:
        assert "--compile" in str(e)
    else:
        raise AssertionError("--max-autotune without --compile was accepted")


def test_profile_names_the_forward_regions():
    """--profile prints the operator table and the architecture's regions as step shares."""
    proc = subprocess.run([sys.executable, str(BENCH), "--profile", "tmt", "--sizes", "tiny",
                           "--precisions", "fp32", "--threads", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "| mesh_attention:MeshAttention.forward | 2 |" in proc.stdout
    assert "Self CPU" in proc.stdout
    bad = subprocess.run([sys.executable, str(BENCH), "--profile", "nope"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


def test_cpu_clock_needs_one_thread_and_is_recorded(tmp_path):
    bench = _load()
    try:
        bench.parse_args(["--clock", "cpu", "--threads", "2"])
    except bench.BenchError as e:
        assert "--threads 1" in str(e)
    else:
        raise AssertionError("--clock cpu with 2 threads was accepted")
    args = bench.parse_args(["--clock", "cpu", "--threads", "1"])
    assert args.clock == "cpu"
    payload = {"peaks": {"small": {"fp32": {"square": 4e10, "model_shapes": 5e10}}},
               "runs": [_run("nanogpt", None, 1000.0), _run("memlm", "gpt", 1000.0)],
               "args": {"clock": "cpu"}}
    assert "thread CPU time" in bench.markdown(payload)
    assert bench.CLOCKS["cpu"] is __import__("time").thread_time


def test_step_ab_runs_both_trees_and_refuses_a_tree_without_memlm(tmp_path):
    script = BENCH.parent / "step_ab.py"
    root = BENCH.parents[1]
    proc = subprocess.run([sys.executable, str(script), "--base", str(root), "--archs", "gpt",
                           "--precisions", "fp32", "--size", "tiny", "--rounds", "1",
                           "--steps", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "| gpt | fp32 | base |" in proc.stdout and "| gpt | fp32 | this |" in proc.stdout
    bad = subprocess.run([sys.executable, str(script), "--base", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
