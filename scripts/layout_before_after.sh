#!/usr/bin/env bash
# What keeping the layout in BIT*'s input changes (issue 14): the default run against the same
# run with BIT* trained and used on the earlier input (train_ebm.bit_star.keep_layout: false).
#
#   bash scripts/layout_before_after.sh news
#
# Needs a finished default run in this checkout. In a scratch directory it links everything
# the two stages read, trains BIT* with keep_layout false (same seed, data and steps), runs
# generate, and writes the result as results/<dataset>/generation/baseline_metrics.json here:
# the "before" of the report's before -> after table.
set -euo pipefail
dataset=${1:?dataset}
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${WORK:-$(mktemp -d)}
mkdir -p "$work/data/$dataset" "$work/models/$dataset/energy"
for d in windows tokenizer docs negatives; do ln -sfn "$repo/data/$dataset/$d" "$work/data/$dataset/$d"; done
ln -sfn "$repo/models/$dataset/lm" "$work/models/$dataset/lm"
python - "$repo/params.yaml" "$work/params.yaml" <<'PY'
import sys, yaml
p = yaml.safe_load(open(sys.argv[1]))
p["train_ebm"]["bit_star"]["keep_layout"] = False
yaml.safe_dump(p, open(sys.argv[2], "w"))
PY
cd "$work"
rebm train-ebm "$dataset" bit_star -p params.yaml
rebm generate "$dataset" -p params.yaml > /dev/null
python - "$repo" "$work" "$dataset" "$(git -C "$repo" rev-parse --short HEAD)" <<'PY'
import json, sys
repo, work, dataset, commit = sys.argv[1:]
metrics = json.load(open(f"{work}/results/{dataset}/generation/metrics.json"))
label = ("BIT* on the earlier input (train_ebm.bit_star.keep_layout: false: line breaks dropped by MiniLM, "
         "end of document read as a line break); same models, seeds and data otherwise")
out = f"{repo}/results/{dataset}/generation/baseline_metrics.json"
json.dump({"label": label, "commit": commit, "metrics": metrics}, open(out, "w"), indent=2, sort_keys=True)
print(f"{out}: {label}")
PY
