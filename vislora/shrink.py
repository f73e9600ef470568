"""`vislora shrink`: a trained LoRA run made smaller by a truncated SVD of each learned update.

vislora.svd.shrink_adapter does the mathematics (from the factors, exact by Eckart-Young). This
module rebuilds the run, writes the smaller adapter as a complete run directory (recipe.yaml with
the new rank_pattern, classes.json, preprocess.json, adapter/) that `eval`, `export` and `predict`
accept, and measures the run before and after on its val split (vislora.evaluate). A PiSSA run is
shrunk as what its adapter directory holds: the plain LoRA equivalent relative to the original
weights (vislora.svd.pissa_as_lora), so the shrunk run is a plain LoRA run.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from vislora import rundir, runpaths
from vislora.adapters import save_adapter
from vislora.config import LoraConfig
from vislora.errors import VisloraError
from vislora.evaluate import evaluate
from vislora.files import write_json
from vislora.recipe import save_recipe
from vislora.svd import check_shrink_args, shrink_adapter

REPORT = "shrink_report.json"
ADAPTER_KEYS = ("r", "rank_pattern", "alpha_pattern", "exclude", "qkv", "init")  # what shrinking changes


def default_out(run_dir: Path, rank: int | None, energy: float | None, budget: int | None) -> Path:
    """RUN_shrink_rank4, RUN_shrink_energy0.95 or RUN_shrink_budget20000, beside the run."""
    key, value = next((k, v) for k, v in (("rank", rank), ("energy", energy), ("budget", budget)) if v is not None)
    return run_dir.with_name(f"{run_dir.name}_shrink_{key}{value:g}")


def _check_out(out: Path, run_dir: Path, force: bool) -> None:
    """The new run goes to an empty folder other than the run; --force replaces a run there (train's
    rules)."""
    if out.resolve() == run_dir.resolve():
        raise VisloraError(f"--out {out} is the run being shrunk: write the smaller run elsewhere")
    runpaths.check_out(out, [], resume=False, force=force)
    runpaths.clear(out)
    out.mkdir(parents=True, exist_ok=True)
    runpaths.mark(out)


def shrunk_recipe(recipe: dict, config: LoraConfig) -> dict:
    """The run's recipe with the adapter fields of the shrunk model's config (ranks, dropped layers,
    plain init)."""
    new = config.to_dict()
    return {**recipe, "adapter": {**recipe["adapter"], **{k: new[k] for k in ADAPTER_KEYS}}}


def _metrics(target: Path, out: Path) -> dict:
    """The numbers of an evaluation on the run's val split (top1, macro_f1, ... for
    classification)."""
    report = evaluate(target, out=out)
    return {k: v for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def shrink_run(run_dir: str | Path, rank: int | None = None, energy: float | None = None,
               budget: int | None = None, out: str | Path | None = None, force: bool = False) -> dict:
    """Shrink a LoRA run's adapter (one of rank / energy / budget, see vislora.svd.shrink_adapter)
    into a new run directory `out`; writes and returns the report: per-layer ranks and energy,
    parameters and val metrics before and after."""
    run_dir = Path(run_dir).resolve()  # `shrink .` names its run by the folder's real name
    check_shrink_args(rank, energy, budget)  # before anything is created
    if not (run_dir / runpaths.ADAPTER).is_dir():
        raise FileNotFoundError(f"{run_dir / runpaths.ADAPTER} does not exist: shrink needs a LoRA run (a linear "
                                "probe or full fine-tuning run has no adapter to shrink)")
    if (runpaths.read_recipe(run_dir)["adapter"] or {}).get("use_dora"):
        raise VisloraError(f"shrink: {run_dir} is a DoRA run (adapter.use_dora): its update is not the low-rank "
                         "s B A that a truncated SVD shrinks; shrink works on LoRA runs")
    out = Path(out) if out else default_out(run_dir, rank, energy, budget)
    _check_out(out, run_dir, force)
    before = _metrics(run_dir, out / "eval" / "before.json")
    model, recipe, preprocess = rundir.load_run(run_dir)
    layers = shrink_adapter(model, rank=rank, energy=energy, budget=budget)
    save_recipe(shrunk_recipe(recipe, model.vislora_config), out / runpaths.RECIPE)
    for name in (runpaths.CLASSES, runpaths.PREPROCESS):
        shutil.copyfile(run_dir / name, out / name)
    save_adapter(model, out / runpaths.ADAPTER)
    after = _metrics(out, out / "eval" / "report.json")
    report = {"source": str(run_dir), "out": str(out),
              "selection": {k: v for k, v in (("rank", rank), ("energy", energy), ("budget", budget)) if v is not None},
              "params_before": sum(r["old_params"] for r in layers), "params_after": sum(r["params"] for r in layers),
              "val_before": before, "val_after": after, "layers": layers}
    write_json(out / REPORT, report)
    return report


def format_shrink(report: dict) -> str:
    """Per layer: old rank, new rank, energy kept, relative error; then parameters and val top-1
    before/after."""
    width = max([len("layer"), *(len(r["name"]) for r in report["layers"])])
    lines = [f"{'layer':<{width}}  {'old r':>5}  {'new r':>5}  {'energy':>7}  {'rel.err':>7}"]
    for r in report["layers"]:
        lines.append(f"{r['name']:<{width}}  {r['old_rank']:>5}  {r['rank']:>5}  {r['energy']:7.4f}  "
                     f"{r['rel_error']:7.4f}")
    before, after = report["params_before"], report["params_after"]
    lines.append(f"adapter parameters: {before:,} -> {after:,} ({100 * after / max(before, 1):.1f}%)")
    for key in ("top1", "macro_f1"):
        if key in report["val_before"] and key in report["val_after"]:
            lines.append(f"val {key}: {report['val_before'][key]:.4f} -> {report['val_after'][key]:.4f}")
    return "\n".join(lines)
