"""Build docs/results_qh9.md from the JSON outputs of scripts/results_qh9.sh (never typed by hand).

    python scripts/results_qh9_table.py runs/results_qh9 --out docs/results_qh9.md

Reads OUT_DIR/{generate,baseline}.json and, for every variant present, OUT_DIR/{train,eval}_<variant>.json and
OUT_DIR/<variant>/config.yaml; states the issue's two expectations and whether the measurements meet them.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import yaml

VARIANTS = {
    "sparse": "sparse model (residual H - H_init)",
    "dense": "dense twin (residual H - H_init)",
    "sparse_raw": "sparse model (learns H)",
    "dense_raw": "dense twin (learns H)",
}
METRICS = ("h_mae_ueh", "h_diag_mae_ueh", "h_offdiag_mae_ueh", "eps_mae_ueh", "psi_cos_pct")


def last_json(path: Path) -> dict:
    """The JSON object on the last line of a command's --json output."""
    return json.loads(path.read_text().strip().splitlines()[-1])


def fmt(value: float, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def build(out_dir: Path) -> str:
    generate = last_json(out_dir / "generate.json")
    baseline = last_json(out_dir / "baseline.json")
    rows, found = [], {}
    header = "| predictor | rows | H MAE (uEh) | diag | off-diag | eps MAE (uEh) | psi (%) | training |"
    rows += [header, "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    names = {"minao": "MINAO initial-guess Fock (trivial)", "mean": "mean training matrix per molecule (trivial)"}
    for name, scores in baseline["baselines"].items():
        rows.append(f"| {names.get(name, name)} | {scores['n']} | " + " | ".join(
            fmt(scores[k], 1 if k == "psi_cos_pct" else 0) for k in METRICS) + " | - |")
    for variant, label in VARIANTS.items():
        if not (out_dir / f"eval_{variant}.json").is_file():
            continue
        scores = last_json(out_dir / f"eval_{variant}.json")
        trained = last_json(out_dir / f"train_{variant}.json")
        found[variant] = (scores, trained)
        training = f"{trained['epochs']} epochs, {trained['steps']} steps, {trained['seconds'] / 60:.1f} min"
        rows.append(f"| {label} | {scores['n']} | " + " | ".join(
            fmt(scores[k], 1 if k == "psi_cos_pct" else 0) for k in METRICS) + f" | {training} |")

    trivial = min(s["h_mae_ueh"] for s in baseline["baselines"].values() if s.get("n"))
    checks = []
    for suffix, what in (("", "residual"), ("_raw", "raw")):
        sparse, dense = found.get(f"sparse{suffix}"), found.get(f"dense{suffix}")
        if not (sparse and dense):
            continue
        ratio = sparse[0]["h_mae_ueh"] / dense[0]["h_mae_ueh"]
        checks.append(
            f"- {what}: sparse H MAE / dense H MAE = {ratio:.2f} (expected <= 1.10: "
            f"{'met' if ratio <= 1.10 else 'NOT met'}); best trivial baseline / sparse = "
            f"{trivial / sparse[0]['h_mae_ueh']:.1f}x, / dense = {trivial / dense[0]['h_mae_ueh']:.1f}x "
            f"(expected >= 10x: sparse {'met' if trivial / sparse[0]['h_mae_ueh'] >= 10 else 'NOT met'}, "
            f"dense {'met' if trivial / dense[0]['h_mae_ueh'] >= 10 else 'NOT met'})"
        )
    config = {}
    for variant in found:
        path = out_dir / variant / "config.yaml"
        if path.is_file():
            config[variant] = yaml.safe_load(path.read_text())
    sample = next(iter(config.values()), {})
    model = sample.get("model", {})
    train = sample.get("train", {})
    lines = [
        "# QH9 model: measured results",
        "",
        f"Built by `scripts/results_qh9_table.py` from `{_shown(out_dir)}` on {datetime.date.today()} "
        f"({platform.machine()}, {platform.system()}); every number below is read from the JSON outputs there "
        "(the layout and commands of `scripts/results_qh9.sh`).",
        "",
        f"Data: {generate['total']} geometries ({generate['computed'] + generate['existing']} stored, "
        f"{generate['failed']} failed SCF) of 12 small G2 molecules (H2O NH3 CH4 HF HCN H2CO C2H2 C2H4 CH3OH "
        "N2H4 H3CNH2 H2CF2), 26 conformers each (Gaussian displacements of 0.05 A), B3LYP5/def2-SVP with QH9's "
        f"pyscf settings. Split: QH9's `{baseline['split_by']}` (held-out conformers of the same molecules), "
        f"scored on the `{baseline['part']}` part ({baseline['n']} rows).",
        "",
        f"Model (configs/qh9.yaml): node irreps `{model.get('node_irreps')}`, {model.get('layers')} interaction "
        f"blocks, spherical harmonics to l = {model.get('lmax_sh')}, head multiplicity {model.get('head_mul')}; "
        f"sparse: tensor-product sparsity {model.get('tp_sparsity')}"
        f"{' of the paths into each output irrep' if model.get('tp_per_output') else ''}, pair sparsity "
        f"{model.get('pair_sparsity')} of the pairs longer than {model.get('pair_keep_radius')} A (encoder) and "
        f"{model.get('head_pair_keep_radius')} A (head), "
        f"random phase {model.get('random_steps')} steps, adaptive {model.get('adaptive_steps')}, then fixed. "
        f"Training: {train.get('epochs')} epochs, batch {train.get('batch_size')}, AdamW lr {train.get('lr')} "
        f"({train.get('decay')}), one torch thread per run, the sparse and dense runs side by side on a shared "
        "2-core machine (wall times include that contention).",
        "",
        *rows,
        "",
        "The issue's expectations (sparse within 10% of dense in H MAE; both at least 10x better than the best "
        "trivial baseline):",
        "",
        *(checks or ["- (no sparse/dense pair measured yet)"]),
        "",
    ]
    return "\n".join(lines)


def _shown(out_dir: Path) -> str:
    """``out_dir`` as the docs may name it: relative to the repository, never a machine's absolute path."""
    root = Path(__file__).resolve().parents[1]
    try:
        return str(out_dir.resolve().relative_to(root))
    except ValueError:  # outside the checkout: its own name, the layout scripts/results_qh9.sh writes
        return f"<OUT_DIR>/{out_dir.resolve().name}" if out_dir.name else "<OUT_DIR>"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path("docs/results_qh9.md"))
    args = parser.parse_args()
    text = build(args.out_dir)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
