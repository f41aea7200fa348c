"""Write an experiment's report from its run dirs: the tables and figures `make tables` produces, the
paired per-problem test of every regime against detach (same seed, same held-out problems), the base
model's score, λ statistics and the wall time. Nothing in the report is typed by hand.

    python experiments/report.py runs/e01_regimes experiments/out/e01      # -> experiments/out/e01/report.md
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from mtp_occ.eval.compare import compare_runs


def _runs(root: Path) -> dict[tuple[str, int], Path]:
    out = {}
    for d in sorted(p.parent for p in root.glob("*/run.json")):
        cfg = (d / "config.yaml").read_text()
        regime = re.search(r"^regime:\n(?:  .*\n)*?  name: (\S+)", cfg, re.M).group(1)
        seed = int(re.search(r"^seed: (\d+)", cfg, re.M).group(1))
        out[(regime, seed)] = d
    return out


def _diagnostics(runs: dict[tuple[str, int], Path]) -> list[str]:
    """Exact c, v² (first vs second half of training) and how the proxy ĉ, v̂² tracks them."""
    import numpy as np

    rows = []
    for (regime, seed), d in sorted(runs.items()):
        diag = [r for r in (json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()) if "diag/c" in r]
        if len(diag) < 4:
            continue
        c, v2 = np.array([r["diag/c"] for r in diag]), np.array([r["diag/v2"] for r in diag])
        c_hat, v2_hat = np.array([r["diag/c_hat"] for r in diag]), np.array([r["diag/v2_hat"] for r in diag])
        h = len(diag) // 2
        rows.append(f"| {regime} | {seed} | {len(diag)} | {c[:h].mean():.3g} → {c[h:].mean():.3g} | "
                    f"{v2[:h].mean():.3g} → {v2[h:].mean():.3g} | {np.corrcoef(c, c_hat)[0, 1]:.2f} | "
                    f"{(np.sign(c) == np.sign(c_hat)).mean():.2f} | {np.corrcoef(v2, v2_hat)[0, 1]:.2f} |")
    if not rows:
        return []
    return ["", "## Exact decomposition vs the OCC proxy", "",
            "| regime | seed | diag steps | c (1st half → 2nd half) | v² (1st → 2nd half) | r(c, ĉ) | sign agreement | r(v², v̂²) |",
            "|---|---:|---:|---|---|---:|---:|---:|", *rows]


def main(root: Path, out: Path) -> None:
    subprocess.run([sys.executable, "-m", "analysis.tables", "--run-root", str(root), "--out", str(out)], check=True)
    runs = _runs(root)
    lines = [f"# Report: {root.name}", "", f"{len(runs)} runs under `{root}`.", "",
             "## Held-out accuracy (Table 1)", "", (out / "table1.md").read_text(), ""]
    base = next(iter(runs.values())) / "eval" / "base" / "summary.json"
    if base.exists():
        b = json.loads(base.read_text())["average"]
        lines += [f"Base model (before RL, shared by every run): avg {100 * b['avg']:.1f}, pass {100 * b['pass']:.1f}, "
                  f"maj {100 * b['maj']:.1f}.", ""]
    paired = []
    for (regime, seed), d in sorted(runs.items()):
        ref = runs.get(("detach", seed))
        if regime == "detach" or ref is None:
            continue
        r = compare_runs(d, ref)["average"]
        paired.append(f"| {regime} | {seed} | {100 * r['a']:.1f} | {100 * r['b']:.1f} | {100 * r['diff']:+.1f} | "
                     f"[{100 * r['lo']:+.1f}, {100 * r['hi']:+.1f}] | {r['p_value']:.3f} |")
    if paired:
        lines += ["## Paired test against detach (per seed; B − A with A = the regime, B = detach)", "",
                  "| regime | seed | regime avg | detach avg | detach − regime | 95% CI | p |",
                  "|---|---:|---:|---:|---:|---|---:|", *paired]
    lam = defaultdict(list)
    for (regime, _), d in runs.items():
        rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        lam[regime] += [r["mtp/lambda"] for r in rows if "mtp/lambda" in r]
    lines += ["", "## λ per regime (mean over steps of the per-step mean over updates)", "",
              "| regime | mean λ | min | max |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {sum(v) / len(v):.3g} | {min(v):.3g} | {max(v):.3g} |" for k, v in sorted(lam.items()) if v]
    lines += _diagnostics(runs)
    wall = [sum(json.loads(x).get("time/step_s", 0.0) for x in (d / "metrics.jsonl").read_text().splitlines()) / 60
            for d in runs.values()]
    lines += ["", "## Cost", "", (out / "cost.md").read_text(), "",
              f"RL time per run (sum of step times): {min(wall):.1f}–{max(wall):.1f} min on 2 CPU cores; "
              "figures: `fig_*.png` here."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print(out / "report.md")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
