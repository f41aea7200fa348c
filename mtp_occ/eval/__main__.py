"""`python -m mtp_occ.eval TARGET [overrides...]`: evaluate a run's latest checkpoint or a saved model.

    python -m mtp_occ.eval runs/regime=occ                         # the run's own eval settings
    python -m mtp_occ.eval runs/regime=occ eval=math6 eval.k=32    # the six math benchmarks, avg@32
    python -m mtp_occ.eval path/to/hf_model_dir eval=math6 eval.limit=20 eval.template=qwen_boxed

TARGET is a run dir (its `overrides.txt` recomposes the config; the newest complete checkpoint supplies
the weights) or a model dir written by `mtp_occ.model.load.save_model` / any HF causal LM dir. Results go
to `<run dir>/eval/<tag>/` (or `--out`), with `summary.json` and every sample in `samples.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mtp_occ.config import ConfigError, compose
from mtp_occ.rundir import EVAL_DIR, RunDir


def _load(target: Path, overrides: list[str]):
    """(cfg, model, tokenizer, default out dir) for a run dir or a model dir."""
    from mtp_occ import checkpoint
    from mtp_occ.policy import build_policy

    run = RunDir(target)
    if run.overrides.exists():
        saved = [line for line in run.overrides.read_text().splitlines() if line]
        cfg = compose([*saved, f"name={target.name}", f"run_root={target.parent}", *overrides])
        model, tok, _ = build_policy(cfg.model, cfg.data, cfg.model.pretrain.seed)
        last = checkpoint.latest(run.checkpoints)
        if last is None:
            raise FileNotFoundError(f"{target} has no complete checkpoint to evaluate")
        model.load_state_dict(checkpoint.model_weights(last))
        return cfg, model, tok, run.checkpoint_eval(last.name, overrides).root
    if (target / "config.json").exists():  # a model dir (HF layout)
        cfg = compose(["model.source=hf", f"model.name_or_path={target}", f"model.name={target.name}", *overrides])
        model, tok, _ = build_policy(cfg.model, cfg.data, cfg.model.pretrain.seed)
        return cfg, model, tok, target / EVAL_DIR
    raise FileNotFoundError(f"{target} is neither a run dir (overrides.txt) nor a model dir (config.json)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mtp_occ.eval", description=__doc__.split("\n")[0])
    ap.add_argument("target", type=Path, help="run dir or model dir")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. eval=math6 eval.limit=10")
    ap.add_argument("--out", type=Path, default=None, help="output dir (default: <target>/eval/<tag>)")
    args = ap.parse_args(argv)
    try:
        cfg, model, tok, out = _load(args.target, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from mtp_occ.eval.policy import evaluate_policy

    summary = evaluate_policy(cfg, model, tok, args.out or out, step=None)
    print(json.dumps({"out": str(args.out or out), **summary["average"],
                      "benchmarks": {n: round(b["avg"], 4) for n, b in summary["benchmarks"].items()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
