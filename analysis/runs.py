"""Runs -> one tidy pandas frame, from run dirs, wandb offline files or the wandb API.

    from analysis.runs import load_run_dirs, eval_frame
    metrics = load_run_dirs("runs/")   # run, step, metric, value, sweep, regime, coef_schedule, seed, ...
    evals = eval_frame("runs/")        # run, step, benchmark, stat, value, sweep, regime, ...

Every loader returns the same long shape: one row per (run, step, metric) with the run's config
flattened into columns (`CONFIG_COLUMNS`), so a table or figure is a groupby away. Sources, in order
of trust:

  1. run dirs (`load_run_dirs`, `eval_frame` for every run dir under a root; `load_metrics`,
     `load_evals` for chosen ones, as `experiments/report.py` picks them): `metrics.jsonl` is written and
     fsynced before wandb sees a number (`mtp_occ.log`), and only run dirs hold the evaluation's
     confidence intervals. File names are `mtp_occ.rundir`'s.
  2. wandb offline files (`load_wandb_offline`): `wandb.Api()` cannot read them and wandb 0.31 writes no
     config or summary JSON offline, so we ask wandb's own reader, `wandb leet inspect --json`
     (history records) and `--summary --json` (config, name, state). Several attempts of one run id
     (requeues) are merged, the later attempt winning a step both logged.
  3. the wandb API (`load_wandb_api`), cached as parquet per run; needs a login.

`run` is the run's name (run.json, or wandb's display name), qualified as `<sweep>/<name>` where two
sweeps share a name. `sweep` is the run dir's parent directory name (for wandb runs whose files are not
inside a run dir: the wandb group). `status` is run.json's status, or the wandb state (finished,
failed, crashed, running) for wandb sources. Eval lines may share a step with training lines; a metric
logged twice at one step keeps its last value. Also here, shared by tables, figures and reports: the
paper's orders (`sort_regimes`, `sort_benchmarks`), `config_key_columns` (what tells runs of one regime
apart: its coefficient, from the regime's own `coef_keys`, the schedule and `head_ce`) and `main_config_runs`, each
regime's main configuration. Importing this never imports torch; wandb only inside the functions that
need it, and torch only when `config_key_columns` asks `mtp_occ.regimes` for a regime's coefficient.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from mtp_occ.log import read_metrics, read_run_json
from mtp_occ.rundir import EVAL_DIR, METRICS_FILE, SUMMARY_FILE, WANDB_DIR, RunDir

COEF_COLUMNS = ["lam", "lambda_plus"]  # the regimes' coefficient keys (regime.lam, regime.lambda_plus)
COEF_LABELS = {"lam": "λ", "lambda_plus": "λ₊"}
CONFIG_COLUMNS = ["sweep", "regime", "coef_schedule", "seed", "model", *COEF_COLUMNS, "head_ce", "status"]
METRIC_COLUMNS = ["run", "step", "metric", "value"]
EVAL_COLUMNS = ["run", "step", "benchmark", "stat", "value"]
_EVAL_METRIC = re.compile(r"^eval/(?P<benchmark>[^/]+)/(?P<stat>[^/]+)$")
REGIME_ORDER = ("detach", "ce", "policy", "occ")  # the paper's order; other regimes follow by name
REGIME_LABELS = {"detach": "Detach", "ce": "CE", "policy": "Policy", "occ": "OCC"}
BENCHMARK_ORDER = ("aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench")
BENCHMARK_LABELS = {"aime24": "AIME24", "aime25": "AIME25", "amc23": "AMC23", "math500": "MATH-500",
                    "minerva": "Minerva", "olympiadbench": "OlympiadBench", "average": "Average"}
LOGIN_HELP = ("no wandb login: run `wandb login` once, or set WANDB_API_KEY (and WANDB_BASE_URL for a "
              "self-hosted server); offline runs are read with load_wandb_offline instead")


# ------------------------------------------------------------------------------------------ names
def sort_regimes(regimes: Iterable[str]) -> list[str]:
    """detach, ce, policy, occ, then any other regime alphabetically."""
    rank = {r: i for i, r in enumerate(REGIME_ORDER)}
    return sorted(set(regimes), key=lambda r: (rank.get(r, len(rank)), r))


def sort_benchmarks(benchmarks: Iterable[str]) -> list[str]:
    """The six paper benchmarks in the paper's order, then others alphabetically; "average" excluded."""
    rank = {b: i for i, b in enumerate(BENCHMARK_ORDER)}
    return sorted(set(benchmarks) - {"average"}, key=lambda b: (rank.get(b, len(rank)), b))


# ----------------------------------------------------------------------------------------- config
def config_columns(config: dict[str, Any]) -> dict[str, Any]:
    """The resolved config (config.yaml, or the dict given to wandb) -> the frame's config columns."""
    regime = config.get("regime") or {}
    return {
        "regime": regime.get("name"),
        "coef_schedule": (config.get("coef_schedule") or {}).get("name"),
        "seed": config.get("seed"),
        "model": (config.get("model") or {}).get("name"),
        "lam": regime.get("lam"),
        "lambda_plus": _find_key(regime, "lambda_plus"),
        "head_ce": float(regime.get("head_ce") or 0.0),  # runs from before `regime.head_ce` had none
    }


def coefficient_columns(regime: Any) -> list[str]:
    """The columns holding `regime`'s coefficient: the keys the regime itself declares
    (`mtp_occ.regimes.coefficient_keys`: `lam` for policy, `lambda_plus` for occ, none for a regime this
    code does not know) that are frame columns."""
    from mtp_occ.regimes import coefficient_keys

    keys = coefficient_keys(regime) if isinstance(regime, str) else ()
    return [k for k in keys if k in COEF_COLUMNS]


def config_key_columns(regime: Any) -> list[str]:
    """The columns that tell runs of `regime` apart: its coefficient, `coef_schedule`, then `head_ce` (the
    MTP head's own CE weight, a knob of every regime). A key the regime ignores (occ's `lam`) splits nothing."""
    return [*coefficient_columns(regime), "coef_schedule", "head_ce"]


def _find_key(tree: Any, key: str) -> Any:
    """`regime.lambda_plus` today; also found if a regime nests it (e.g. `regime.occ.lambda_plus`)."""
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        for value in tree.values():
            found = _find_key(value, key)
            if found is not None:
                return found
    return None


def _with_columns(frame: pd.DataFrame, columns: list[str], info: dict[str, Any]) -> pd.DataFrame:
    for col in CONFIG_COLUMNS:
        frame[col] = info.get(col)
    return frame[columns + CONFIG_COLUMNS]


def _concat(frames: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=columns + CONFIG_COLUMNS)
    out = pd.concat(frames, ignore_index=True)
    out["value"] = out["value"].astype(float)
    out["seed"] = pd.to_numeric(out["seed"]).astype("Int64")
    out[[*COEF_COLUMNS, "head_ce"]] = out[[*COEF_COLUMNS, "head_ce"]].apply(pd.to_numeric).astype(float)
    return out.sort_values(["run", "step"] if "metric" not in out else ["run", "metric", "step"],
                           kind="stable", ignore_index=True)


def _long(records: Iterable[tuple[int, dict[str, Any]]]) -> pd.DataFrame:
    """(step, {metric: value}) records -> run-less long rows; non-numbers and `_keys` dropped."""
    rows = [(int(step), k, float(v)) for step, rec in records for k, v in rec.items()
            if not k.startswith("_") and isinstance(v, int | float) and not isinstance(v, bool)]
    frame = pd.DataFrame(rows, columns=["step", "metric", "value"])
    return frame.drop_duplicates(["step", "metric"], keep="last")  # a re-logged step: the last wins


def main_config_runs(frame: pd.DataFrame, verbose: bool = True) -> pd.DataFrame:
    """Per regime, only the runs of its most common configuration (`config_key_columns`: coefficient and
    schedule): the main sweep's comparison when a root also holds ablations (Table 1, the figures).
    Prints what it leaves out."""
    keep = frame["regime"].isna().to_numpy(copy=True)  # runs without a config: nothing to choose between
    for regime, positions in frame.groupby("regime").indices.items():
        rows, columns = frame.iloc[positions], config_key_columns(regime)
        key = pd.Series([", ".join(f"{k}={v}" for k, v in zip(columns, values, strict=True))
                         for values in rows[columns].itertuples(index=False)], dtype=object)
        runs = rows["run"].reset_index(drop=True)
        counts = runs.groupby(key).nunique()
        best = counts.idxmax()
        keep[positions[(key == best).to_numpy()]] = True
        if len(counts) > 1 and verbose:
            left_out = sorted(set(runs[key != best]))
            print(f"{regime}: using the runs with {best}; leaving out {left_out}")
    return frame[keep]


# ---------------------------------------------------------------------------------------- run dirs
def find_run_dirs(root: Path | str) -> list[Path]:
    """Run dirs under `root` (any depth): dirs holding metrics.jsonl or eval/summary.json."""
    root = Path(root)
    found = {p.parent for p in root.rglob(METRICS_FILE)}
    found |= {p.parent.parent for p in root.rglob(f"{EVAL_DIR}/{SUMMARY_FILE}")}
    return sorted(d for d in found if WANDB_DIR not in d.relative_to(root).parts)


def run_info(run_dir: Path) -> dict[str, Any]:
    """run name, sweep and config columns of one run dir."""
    meta = read_run_json(run_dir)
    config_path = RunDir(run_dir).config
    config = yaml.safe_load(config_path.read_text()) if config_path.exists() else {}
    return {"run": meta.get("name") or run_dir.name, "sweep": run_dir.parent.name,
            "status": meta.get("status"), **config_columns(config or {})}


def _run_infos(root: Path | str) -> list[tuple[Path, dict[str, Any]]]:
    """`run_info` of every run dir, names qualified (`qualify_shared_names`)."""
    infos = [(run_dir, run_info(run_dir)) for run_dir in find_run_dirs(root)]
    qualify_shared_names([info for _, info in infos])
    return infos


def qualify_shared_names(infos: list[dict[str, Any]]) -> None:
    """A run name found in several sweeps (names derive from the overrides, so two sweeps easily share
    one) becomes `<sweep>/<name>`, in place: one frame never mixes two runs under one name."""
    shared = pd.Series([info["run"] for info in infos]).duplicated(keep=False)
    for info, is_shared in zip(infos, shared, strict=True):
        info["run"] = f"{info['sweep']}/{info['run']}" if is_shared else info["run"]


def load_run_dirs(root: Path | str) -> pd.DataFrame:
    """The metrics of every run dir under `root`, long: run, step, metric, value + CONFIG_COLUMNS."""
    return load_metrics(_run_infos(root))


def load_metrics(runs: Iterable[tuple[Path, dict[str, Any]]]) -> pd.DataFrame:
    """The metrics of these (run dir, `run_info`) pairs, in `load_run_dirs`'s shape; the rows are named
    by each info's "run" (keep them distinct: `qualify_shared_names`)."""
    frames = []
    for run_dir, info in runs:
        records = [rec for rec in read_metrics(run_dir) if "step" in rec]
        frame = _long((rec["step"], {k: v for k, v in rec.items() if k != "step"}) for rec in records)
        frame.insert(0, "run", info["run"])
        frames.append(_with_columns(frame, METRIC_COLUMNS, info))
    return _concat(frames, METRIC_COLUMNS)


def eval_frame(root: Path | str) -> pd.DataFrame:
    """Final evaluations (`eval/summary.json`), long: run, step, benchmark, stat, value + CONFIG_COLUMNS.
    stats: avg, pass, maj, their `_lo`/`_hi` CI bounds, n, k, timeouts (benchmark "average": avg, pass,
    maj). Fractions in [0, 1]."""
    return load_evals(_run_infos(root))


def load_evals(runs: Iterable[tuple[Path, dict[str, Any]]]) -> pd.DataFrame:
    """The final evaluations of these (run dir, `run_info`) pairs, in `eval_frame`'s shape (runs
    without one are left out)."""
    frames = []
    for run_dir, info in runs:
        path = RunDir(run_dir).eval.summary
        if not path.exists():
            continue
        summary = json.loads(path.read_text())
        rows = [(b, s, v) for b, stats in summary.get("benchmarks", {}).items() for s, v in _stats(stats)]
        rows += [("average", s, v) for s, v in _stats(summary.get("average", {}))]
        frame = pd.DataFrame(rows, columns=["benchmark", "stat", "value"])
        frame.insert(0, "step", summary.get("step"))
        frame.insert(0, "run", info["run"])
        frames.append(_with_columns(frame, EVAL_COLUMNS, info))
    return _concat(frames, EVAL_COLUMNS)


def _stats(stats: dict[str, Any]) -> Iterable[tuple[str, float]]:
    for stat, value in stats.items():
        if isinstance(value, list | tuple) and len(value) == 2:
            yield f"{stat.removesuffix('_ci')}_lo", value[0]
            yield f"{stat.removesuffix('_ci')}_hi", value[1]
        elif isinstance(value, int | float) and not isinstance(value, bool):
            yield stat, value


def evals_from_metrics(metrics: pd.DataFrame) -> pd.DataFrame:
    """The last logged `eval/<benchmark>/<stat>` of each run, in `eval_frame`'s shape (no CIs): lets the
    tables use wandb sources, which hold no eval/summary.json."""
    parts = metrics["metric"].str.extract(_EVAL_METRIC)
    evals = pd.concat([metrics, parts], axis=1)[parts["benchmark"].notna()]
    if evals.empty:
        return pd.DataFrame(columns=EVAL_COLUMNS + CONFIG_COLUMNS)
    last = evals.groupby("run")["step"].transform("max")
    return evals[evals["step"] == last][EVAL_COLUMNS + CONFIG_COLUMNS].reset_index(drop=True)


# ------------------------------------------------------------------------------ wandb offline files
def find_wandb_files(root: Path | str) -> list[Path]:
    """`run-<id>.wandb` transaction logs under `root` (offline-run-* and run-* dirs, any depth)."""
    return sorted(Path(root).rglob("run-*.wandb"))


def inspect_wandb_file(path: Path) -> dict[str, Any]:
    """One `.wandb` file through wandb's own reader: {"summary": `leet inspect --summary --json`,
    "history": [(step, item)], "group": run group or None}."""
    summary = json.loads(_leet(path, "--summary"))
    history, group = [], None
    for line in _leet(path).splitlines():
        record = json.loads(line)
        if record.get("type") == "history":
            item = record["history"].get("item", {})
            step = record["history"].get("step", {}).get("num", item.get("_step", 0))
            history.append((int(step), _without_media(item)))
        elif record.get("type") == "run":
            group = record["run"].get("run_group") or group
    return {"summary": summary, "history": history, "group": group}


def _without_media(item: dict[str, Any]) -> dict[str, Any]:
    """Drop the flattened fields of logged media (a table's `<key>.nrows`, `<key>.size`, ...)."""
    media = {k.removesuffix("._type") for k in item if k.endswith("._type")}
    return {k: v for k, v in item.items() if k.split(".")[0] not in media}


def _leet(path: Path, *flags: str) -> str:
    cmd = [sys.executable, "-m", "wandb", "leet", "inspect", *flags, "--json", str(path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return done.stdout


def load_wandb_offline(root: Path | str, *, workers: int = 4) -> pd.DataFrame:
    """The history of every wandb run under `root` read from its local files, in `load_run_dirs`'s
    shape. Attempts sharing a run id (a requeued run; a failed online attempt before an offline
    fallback) are merged in start-time order, the later attempt winning a step both logged."""
    files = find_wandb_files(root)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # each file is a short subprocess
        inspected = list(pool.map(inspect_wandb_file, files))
    attempts: dict[str, list[tuple[Path, dict[str, Any]]]] = {}
    for path, run in zip(files, inspected, strict=True):
        attempts.setdefault(run["summary"]["run_id"], []).append((path, run))
    infos, frames = [], []
    for runs in attempts.values():
        runs.sort(key=lambda pr: _started(pr[0]))
        path, last = runs[-1]
        infos.append({"run": last["summary"].get("name") or last["summary"]["run_id"],
                      "sweep": _sweep_of(path) or last["group"], "status": last["summary"].get("state"),
                      **config_columns(last["summary"].get("config") or {})})
        frames.append(_long(step_item for _, run in runs for step_item in run["history"]))
    qualify_shared_names(infos)
    for frame, info in zip(frames, infos, strict=True):
        frame.insert(0, "run", info["run"])
    return _concat([_with_columns(f, METRIC_COLUMNS, i) for f, i in zip(frames, infos, strict=True)],
                   METRIC_COLUMNS)


def _started(wandb_file: Path) -> str:
    """The start time in the attempt dir's name: [offline-]run-YYYYMMDD_HHMMSS-<id>."""
    match = re.search(r"run-(\d{8}_\d{6})-", wandb_file.parent.name)
    return match.group(1) if match else wandb_file.parent.name


def _sweep_of(wandb_file: Path) -> str | None:
    """Files under `<run_dir>/wandb/<attempt>/` belong to that run dir: its parent is the sweep."""
    run_dir = wandb_file.parent.parent.parent
    return run_dir.parent.name if RunDir(run_dir).run_json.exists() else None


# ---------------------------------------------------------------------------------------- wandb API
def load_wandb_api(entity: str, project: str, group: str | None = None, tags: list[str] | None = None,
                   cache_dir: Path | str = "analysis/cache") -> pd.DataFrame:
    """Runs of `entity/project` (optionally one group, any of `tags`) through `wandb.Api()`, in
    `load_run_dirs`'s shape. Each finished run's history is cached as parquet under `cache_dir`."""
    import wandb

    try:
        api = wandb.Api(timeout=60)
        filters: dict[str, Any] = {}
        if group:
            filters["group"] = group
        if tags:
            filters["tags"] = {"$in": list(tags)}
        runs = list(api.runs(f"{entity}/{project}", filters=filters))
    except (wandb.errors.UsageError, wandb.errors.AuthenticationError) as e:
        raise RuntimeError(f"{LOGIN_HELP} ({e})") from e
    cache = Path(cache_dir) / entity / project
    return _concat([_api_run_frame(run, cache) for run in runs], METRIC_COLUMNS)


def _api_run_frame(run: Any, cache: Path) -> pd.DataFrame:
    """One API run; cached when it can no longer change (keyed by its last step)."""
    path = cache / f"{run.id}-{run.summary.get('_step')}.parquet"
    if path.exists():
        return pd.read_parquet(path)
    frame = _long((row.get("_step", 0), row) for row in run.scan_history())
    frame.insert(0, "run", run.name)
    info = {"sweep": run.group, "status": run.state, **config_columns(dict(run.config))}
    frame = _with_columns(frame, METRIC_COLUMNS, info)
    if run.state != "running":
        cache.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(path, index=False)
    return frame
