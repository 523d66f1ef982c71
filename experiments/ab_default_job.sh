#!/usr/bin/env bash
# The default job's training speed, this tree against an older revision, alternating runs in one session:
#   bash experiments/ab_default_job.sh OLD_REV [STEPS] [REPEATS]
# Prints one JSON line per run: mean training img/s over the logged steps after the first 100, accuracy.
set -euo pipefail
cd "$(dirname "$0")/.."
OLD=${1:?usage: ab_default_job.sh OLD_REV [STEPS] [REPEATS]}; STEPS=${2:-700}; REPEATS=${3:-2}
PY=$(pwd)/.venv/bin/python
OLD_TREE=$(mktemp -d)/seqvis_old
git worktree add -f -q "$OLD_TREE" "$OLD"
trap 'git worktree remove --force "$OLD_TREE"' EXIT
for rep in $(seq "$REPEATS"); do
  for side in old new; do
    dir=$(pwd); [ "$side" = old ] && dir=$OLD_TREE
    wd=$(mktemp -d)/w
    (cd "$dir" && PYTHONPATH="$dir" TF_CPP_MIN_LOG_LEVEL=2 "$PY" -m seqvis.cli.train --config=configs/vit.py \
       --workdir="$wd" --config.total_steps="$STEPS" --config.progress=False >"$wd.log" 2>&1)
    "$PY" - "$side" "$rep" "$wd" <<'PYEOF'
import json, sys
side, rep, wd = sys.argv[1:]
rows = [json.loads(l) for l in open(f"{wd}/metrics.jsonl")]
ips = [r["train/img_per_sec"] for r in rows if "train/img_per_sec" in r and r["step"] > 100]
res = json.load(open(f"{wd}/results.json"))
print(json.dumps({"side": side, "rep": int(rep), "steps": res.get("steps"), "logs": len(ips),
                  "train_img_per_sec": sum(ips) / max(len(ips), 1), "accuracy": res.get("accuracy"),
                  "train_seconds": res.get("train_seconds")}))
PYEOF
  done
done
