#!/usr/bin/env bash
# 1 vs 16 stored LM samples per train prefix for BIT*, at the default's step budget (issue 14).
#
#   bash scripts/negatives_per_prefix.sh news [16]
#
# Needs a finished default run in this checkout (dvc repro train_ebm_bit_star@<dataset>
# evaluate@<dataset>). In a scratch directory it links the run's windows, tokenizer and base
# LM, samples `n` negatives per train prefix with the negatives stage, trains BIT* on them
# with params.yaml's settings and evaluates it exactly as the default evaluates its BIT*
# (same windows, same log Z samples: the two arms are paired). Prints both arms' validation
# NCE, log Z verdict and Table 1 range.
set -euo pipefail
dataset=${1:?dataset}; n=${2:-16}
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${WORK:-$(mktemp -d)}
mkdir -p "$work/data/$dataset" "$work/models/$dataset/lm" "$work/models/$dataset/energy"
for d in windows tokenizer docs; do ln -sfn "$repo/data/$dataset/$d" "$work/data/$dataset/$d"; done
for v in base balm ralm; do ln -sfn "$repo/models/$dataset/lm/$v" "$work/models/$dataset/lm/$v"; done
python - "$repo/params.yaml" "$work/params.yaml" "$dataset" "$n" <<'PY'
import sys, yaml
src, dst, dataset, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
p = yaml.safe_load(open(src))
p["negatives"]["samples"][dataset]["train"] = n
p["evaluate"].update({"lms": ["base"], "energies": ["bit_star"]})
p["evaluate"]["n_eval"] = {"bit_star": p["evaluate"]["n_eval"]["bit_star"]}
p["evaluate"]["positions"].update({"energies": [], "exact_last_windows": 0})
yaml.safe_dump(p, open(dst, "w"))
PY
cd "$work"
rebm negatives "$dataset" -p params.yaml
rebm train-ebm "$dataset" bit_star -p params.yaml
rebm evaluate "$dataset" -p params.yaml > /dev/null
python - "$repo" "$work" "$dataset" "$n" <<'PY'
import json, sys
repo, work, dataset, n = sys.argv[1:]
for label, root in (("1 per prefix (default run)", repo), (f"{n} per prefix", work)):
    train = json.load(open(f"{root}/models/{dataset}/energy/bit_star_metrics.json"))
    ev = json.load(open(f"{root}/results/{dataset}/evaluation/metrics.json"))
    j = ev["joint"]["bit_star"]
    print(f"{label:28s} negatives/prefix={train['negatives_per_prefix']:3d} valid NCE={train['valid_loss']:.4f} "
          f"pair acc={train['valid_pair_accuracy']:.3f} | mean log Z T_n={j['convergence']['mean_log_z_lower']:+.3f} "
          f"U_n={j['convergence']['mean_log_z_upper']:+.3f} ({j['verdict']}) | ppl {j['ppl_low']:.2f}-{j['ppl_high']:.2f} "
          f"vs base {j['vs_base_pct_low']:+.2f}..{j['vs_base_pct_high']:+.2f}% | self-normalised "
          f"{j['self_normalised_ppl']:.2f}")
PY
