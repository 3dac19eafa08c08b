"""Re-run the test suite against the newest releases and report what broke.

CI (.ci/run) installs the exact versions in constraints.txt, so a new release of
transformers, lm-eval, torch, ... cannot break CI by surprise, and also cannot
warn anyone. This script is the warning, run by hand (say monthly):

    python benchmarks/newest_releases.py                 # newest releases within pyproject's ranges
    python benchmarks/newest_releases.py --beyond-bounds # newest releases, ignoring upper bounds
    python benchmarks/newest_releases.py --keep VENV -- -k hf   # keep the venv; pass pytest args

It builds a new virtual environment, installs memlm with its dev/eval/tensorboard/wandb
extras *without* constraints.txt (`--upgrade`, so pip takes the newest allowed
release of everything), then runs ruff and the suite, and prints:

- every package whose version differs from constraints.txt (old -> new);
- the tests that failed or errored, with the first line of each failure;
- a verdict line. The exit status is 0 when everything passed, 1 otherwise.

Packages come from pip's configured indexes; on Linux, PyPI's newest torch is a CUDA
build (GBs of nvidia-* wheels): set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
for the CPU build. `--out FILE` also writes the report as JSON. With `--beyond-bounds` the
packages memlm pins by major (torch, transformers, tokenizers, lm-eval, numpy,
...) are upgraded past pyproject's upper bounds afterwards, to see whether
those bounds can be raised.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXTRAS = "dev,eval,tensorboard,wandb"
# the packages pyproject bounds by major version; --beyond-bounds lifts them
BOUNDED = ["torch", "numpy", "safetensors", "pyyaml", "tqdm", "matplotlib", "tiktoken",
           "tokenizers", "transformers", "lm-eval", "accelerate", "tensorboard", "wandb"]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(text: str) -> dict[str, str]:
    """name -> version from `name==version` lines (constraints.txt, pip freeze)."""
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[_norm(name)] = version.split("+", 1)[0].strip()
    return pins


def version_changes(old: dict[str, str], new: dict[str, str]) -> list[dict[str, str | None]]:
    """Packages added, removed or at another version, sorted by name."""
    return [{"package": name, "tested": old.get(name), "newest": new.get(name)}
            for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name)]


def failures_from_junit(path: Path) -> list[dict[str, str]]:
    """Failed or errored test cases in a pytest --junitxml file."""
    if not path.is_file():
        return []
    out = []
    for case in ET.parse(path).getroot().iter("testcase"):
        for tag in ("failure", "error"):
            node = case.find(tag)
            if node is not None:
                message = (node.get("message") or node.text or "").strip().splitlines()
                out.append({"test": f"{case.get('classname')}::{case.get('name')}",
                            "kind": tag, "message": message[0][:300] if message else ""})
    return out


def _clean_env(venv: Path) -> dict[str, str]:
    """This environment with the new venv first on PATH and no PYTHONPATH (no other memlm)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, **kwargs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--beyond-bounds", action="store_true",
                    help="also upgrade past pyproject's upper bounds (default: off)")
    ap.add_argument("--keep", metavar="VENV", default=None,
                    help="build the environment here and keep it (default: a temporary folder)")
    ap.add_argument("--out", metavar="FILE", default=None,
                    help="also write the report as JSON (default: print only)")
    ap.add_argument("pytest_args", nargs="*", help="passed to pytest after --")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        venv = Path(args.keep) if args.keep else Path(tmp) / "venv"
        if venv.exists():
            print(f"{venv} exists; pass a new folder to --keep", file=sys.stderr)
            return 2
        start = time.time()
        run([sys.executable, "-m", "venv", str(venv)], check=True)
        py = str(venv / "bin" / "python")
        run([py, "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
        run([py, "-m", "pip", "install", "-q", "--upgrade", "-e", f"{REPO}[{EXTRAS}]"], check=True)
        if args.beyond_bounds:
            run([py, "-m", "pip", "install", "-q", "--upgrade", *BOUNDED], check=True)
        install_s = time.time() - start
        freeze = run([py, "-m", "pip", "freeze", "--exclude-editable"], check=True,
                     capture_output=True, text=True).stdout
        changes = version_changes(read_pins((REPO / "constraints.txt").read_text()),
                                  read_pins(freeze))
        ruff = run([str(venv / "bin" / "ruff"), "check", "memlm", "tests", "benchmarks"],
                   cwd=REPO, capture_output=True, text=True)
        junit = Path(tmp) / "junit.xml"
        tests = run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                     f"--junitxml={junit}", *args.pytest_args], cwd=REPO,
                    env=_clean_env(venv))
        failed = failures_from_junit(junit)

    report = {"install_seconds": round(install_s, 1), "beyond_bounds": args.beyond_bounds,
              "changed_packages": changes, "ruff_ok": ruff.returncode == 0,
              "ruff_output": ruff.stdout[-3000:], "pytest_exit_status": tests.returncode,
              "failed_tests": failed}
    print(f"\nnewest releases ({'beyond' if args.beyond_bounds else 'within'} pyproject's "
          f"bounds), installed in {install_s:.0f} s")
    print(f"{len(changes)} packages differ from constraints.txt:")
    for c in changes:
        print(f"  {c['package']:<28} {c['tested'] or '-':>14} -> {c['newest'] or '-'}")
    if not report["ruff_ok"]:
        print("ruff found problems:\n" + ruff.stdout[-3000:])
    for f in failed:
        print(f"  {f['kind'].upper():7} {f['test']}: {f['message']}")
    ok = report["ruff_ok"] and tests.returncode == 0
    print("verdict: everything passed" if ok else
          f"verdict: BROKEN ({len(failed)} failing tests, pytest exit {tests.returncode})")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
