#!/usr/bin/env bash
# Issue 13's numbered cases, run as a user runs them: the real command line on the real Fashion-MNIST.
#   bash experiments/reliability_cases.sh [SCRATCH_DIR]
# For each case: the exit code, how many lines the command printed on stderr, its last line, and what is
# on disk afterwards. tests/test_reliability.py asserts the same behaviour; this is the by-hand check.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(pwd)/.venv/bin/python}
S=${1:-$(mktemp -d)}
mkdir -p "$S"
T="--config.total_steps=5 --config.checkpoint_every_steps=2 --config.log_every_steps=1 --config.schedule.warmup_steps=1"
SMALL="--config.model.width=32 --config.model.depth=1 --config.model.mlp_dim=64 --config.model.num_heads=2 --config.progress=False --config.eval_batch_size=1000"

run() {  # run NAME ARGS...: the seqvis command line, summarised
  local name=$1; shift
  "$PY" -m seqvis.cli.train --config=configs/vit.py $SMALL "$@" >"$S/$name.out" 2>"$S/$name.err"
  local rc=$?
  printf '%-34s exit %-3s stderr %4s lines | %s\n' "$name" "$rc" "$(wc -l <"$S/$name.err")" "$( (grep -m1 '^error:' "$S/$name.err" || tail -n 1 "$S/$name.err") | cut -c1-220)"
}
ckpts() { printf '%-34s checkpoints: %s\n' "" "$(ls "$1/checkpoints" 2>/dev/null | tr '\n' ' ')"; }

echo "scratch: $S"
# 1. NaN with a checkpoint every step and a log every 10; then resume with a sane lr.
run case1_nan --workdir="$S/w1" --config.total_steps=10 --config.schedule.base_lr=1e6 \
  --config.optimizer.grad_clip_norm=0 --config.log_every_steps=10 --config.checkpoint_every_steps=1 \
  --config.schedule.warmup_steps=1
ckpts "$S/w1"
run case1_resume_sane_lr --workdir="$S/w1" --config.total_steps=10 --config.optimizer.grad_clip_norm=0 \
  --config.log_every_steps=10 --config.checkpoint_every_steps=1 --config.schedule.warmup_steps=1
ckpts "$S/w1"
# 2. keep_checkpoints=0
run case2_keep0 --workdir="$S/w2" $T --config.keep_checkpoints=0
ckpts "$S/w2"
# 3. corrupt newest checkpoint: fall back, re-train, save; then init_from works.
run case3_train --workdir="$S/w3" $T
find "$S/w3/checkpoints/5/state" -type f -size +1k -exec truncate -s 10 {} +  # the newest
run case3_resume_corrupt --workdir="$S/w3" $T --config.total_steps=6
ckpts "$S/w3"; ls "$S/w3" | tr '\n' ' '; echo
run case3_init_from --workdir="$S/w3b" $T --config.init_from="$S/w3"
# 4. a refused resume (different model) writes nothing
cp "$S/w3/config.json" "$S/config3.json"
run case4_other_model --workdir="$S/w3" $T --config.total_steps=6 --config.model.depth=2
cmp -s "$S/w3/config.json" "$S/config3.json" && echo "                                   config.json unchanged" \
  || echo "                                   config.json CHANGED"
# 5. silent nonsense
run case5_num_classes --workdir="$S/w5a" $T --config.data.num_classes=5
run case5_negative_lr --workdir="$S/w5b" $T --config.schedule.base_lr=-0.01
run case5_negative_steps --workdir="$S/w5c" --config.total_steps=-5
# 6. an explicit idx_dir that is empty
mkdir -p "$S/empty_idx"
run case6_empty_idx_dir --workdir="$S/w6" $T --config.data.idx_dir="$S/empty_idx" --config.data.data_dir="$S/tfds6"
# 7. optimiser-structure and data-stream changes on resume
run case7_clip_change --workdir="$S/w3" $T --config.total_steps=8 --config.optimizer.grad_clip_norm=0
run case7_batch_change --workdir="$S/w3" $T --config.total_steps=8 --config.batch_size=64
ckpts "$S/w3"
# 8. every checkpoint corrupt; bad IDX files; a text file as .npz; a non-numeric results CSV
cp -r "$S/w3" "$S/w8"
find "$S"/w8/checkpoints/[0-9]*/state -type f -size +1k -exec truncate -s 10 {} +
run case8_all_corrupt --workdir="$S/w8" $T --config.total_steps=8
ckpts "$S/w8"
mkdir -p "$S/bad_idx"; cp /usr/share/datasets/fashion-mnist/*.gz "$S/bad_idx/"
head -c 5000 /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz >"$S/bad_idx/train-images-idx3-ubyte.gz"
run case8_truncated_idx --workdir="$S/w8b" $T --config.data.idx_dir="$S/bad_idx" --config.data.data_dir="$S/tfds8"
echo "not weights" >"$S/weights.npz"
run case8_text_as_npz --workdir="$S/w8c" $T --config.init_from="$S/weights.npz"
printf 'point,status,family,model,params,examples_seen,gflops_per_example,train_flops,test_error\np1,ok,vit,m,100,1000,0.001,1e9,n/a\n' >"$S/results.csv"
"$PY" -m experiments.scaling_curves --results="$S/results.csv" --out="$S/curves" >"$S/case8_csv.out" 2>"$S/case8_csv.err"
printf '%-34s exit %-3s stderr %4s lines | %s\n' case8_non_numeric_csv "$?" "$(wc -l <"$S/case8_csv.err")" "$(tail -n 1 "$S/case8_csv.err" | cut -c1-220)"
# 9. a full disk during a checkpoint write (file size limit), then resume: each metrics step once
( ulimit -f 40; run case9_full_disk --workdir="$S/w9" $T --config.total_steps=6 )
ls "$S/w9/checkpoints" | tr '\n' ' '; echo
run case9_resume --workdir="$S/w9" $T --config.total_steps=6
"$PY" -c "import json,sys,collections; s=[(json.loads(l)['step'], 'eval' if any(k.startswith('eval/') for k in json.loads(l)) else 'train') for l in open(sys.argv[1])]; d=[k for k,v in collections.Counter(s).items() if v>1]; print(' '*35+'metrics.jsonl rows (step, kind)', len(s), 'duplicates', d)" "$S/w9/metrics.jsonl"
