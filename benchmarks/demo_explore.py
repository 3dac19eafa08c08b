"""One exploration run of the demo's task with its settings changed (docs/demo.md, "After the grid").

    python benchmarks/demo_explore.py NAME SEED ARCHS TRAIN_CHARS [TRAIN_RECALL] [EVAL_RECALL] [RUN] [MODEL] [TINY]

    python benchmarks/demo_explore.py armt-near075 2 armt 8000000 '{"near_fraction": 0.75}'
    python benchmarks/demo_explore.py gpt-near05 2 gpt 8000000 '{}' '{"near_fraction": 0.5}'
    python benchmarks/demo_explore.py s2-lr 2 gpt,armt 8000000 '{}' '{}' '{"lr": 0.001}'
    python benchmarks/demo_explore.py cur 0 armt 20000 '{}' '{}' '{"curriculum": [[0.3, 1]]}'
    python benchmarks/demo_explore.py d128 0 gpt 20000 '{}' '{}' '{}' '{"d_model": 128}'

TRAIN_RECALL patches `memlm.experiments.demo.TRAIN_RECALL` (the `recall_stream` options of the
training text, such as the near-fact share, which no CLI flag reaches); the scoring text is the
patched training options with only far facts, then EVAL_RECALL on top (a near share there scores
the local skill: `recall_near`). RUN is passed to `run_demo` (lr, steps, precision, threads,
curriculum, score...). MODEL patches `BASE_MODEL` (d_model, n_layer...). TINY patches the
architectures' registered demo sizes, per architecture: '{"tmt-xmem": {"xmem_beta": 0.5}}'.
Training runs in this process (workers=1), so the patches hold. Writes /tmp/memlm-explore/NAME
and prints per architecture the recall numbers and answer counts.
"""

from __future__ import annotations

import json
import sys
import time


def _tuples(patch: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in patch.items()}


def main(argv: list[str]) -> int:
    import memlm.experiments.demo as demo

    name, seed, archs, chars = argv[0], int(argv[1]), argv[2].split(","), int(argv[3])
    train_patch, eval_patch, run, model, tiny = (json.loads(a) for a in (argv[4:] + ["{}"] * 5)[:5])
    demo.TRAIN_RECALL.update(_tuples(train_patch))
    demo.BASE_MODEL.update(model)
    for arch, patch in tiny.items():
        spec = demo.ARCHITECTURES.get(arch)
        object.__setattr__(spec, "tiny", {**spec.tiny, **patch})  # a frozen spec, patched here only
    if "curriculum" in run:
        run["curriculum"] = tuple(tuple(stage) for stage in run["curriculum"])
    demo.EVAL_RECALL.update({**demo.TRAIN_RECALL, "near_fraction": 0.0, **_tuples(eval_patch)})
    t0 = time.time()
    payload = demo.run_demo(f"/tmp/memlm-explore/{name}", mode="full", archs=archs, seeds=(seed,),
                            progress=False, workers=1, train_chars=chars, **run)
    for row in payload["rows"]:
        m = row["metrics"]
        print(name, row["arch"], {k: round(m[k]["mean"], 3) for k in m
                                  if k.startswith(("recall", "n_"))})
    print(f"{name}: {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
