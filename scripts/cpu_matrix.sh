#!/usr/bin/env bash
# Runs the test suite and the demo under other CPU code paths, thread counts and retraining seeds on this
# machine, so that nothing hinges on which rows a model retrained on one CPU gets right (docs/cpu-matrix.md).
#   bash scripts/cpu_matrix.sh [OUT_DIR]        all settings (suite + demo each; about 10 min per setting)
#   SETTINGS="native avx2" bash scripts/cpu_matrix.sh   a subset
# Each setting: the environment below, `pytest tests` (the suite), then `make demo` in a fresh QOPS_HOME; the
# demo passes when every target of the summary passed its gates. Results: OUT_DIR/matrix.md (one row each).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${1:-$ROOT/.demo-matrix}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # demo.sh changes directory: every path absolute
PY=$ROOT/.venv/bin/python
[ -x "$PY" ] || { echo "run make install first"; exit 2; }

declare -A ENVS=(
  [native]=""
  [avx2]="ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2"
  [default]="ATEN_CPU_CAPABILITY=default"
  [onednn_avx2_1thread]="ONEDNN_MAX_CPU_ISA=AVX2 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1"
  [seed1]="QOPS_TEST_SEED=1 QOPS_RETRAIN_SEED=1"
  [seed2_avx2]="QOPS_TEST_SEED=2 QOPS_RETRAIN_SEED=2 ATEN_CPU_CAPABILITY=avx2"
)
SETTINGS=${SETTINGS:-"native avx2 default onednn_avx2_1thread seed1 seed2_avx2"}
SKIP_SUITE=${SKIP_SUITE:-0}
cpu=$(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')
isa=$(grep -m1 -o -w -E "avx512_vnni|amx_int8" /proc/cpuinfo | sort -u | tr '\n' ' ')
echo "| setting | environment | suite | demo (per target: gate, accuracy q/fp32) | demo FP32 accuracy |" > "$OUT/matrix.md"
echo "|---|---|---|---|---|" >> "$OUT/matrix.md"
echo "machine: $cpu, $(nproc) cores, ISA: $isa" > "$OUT/machine.txt"
for s in $SETTINGS; do
  envs=${ENVS[$s]}
  echo "==> [$(date +%H:%M:%S)] $s: ${envs:-(none)}"
  suite="skipped"
  if [ "$SKIP_SUITE" != "1" ]; then
    env $envs "$PY" -m pytest -q -p no:cacheprovider tests > "$OUT/suite-$s.log" 2>&1
    suite=$(grep -E "^[0-9]+ (passed|failed)|passed|failed" "$OUT/suite-$s.log" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//')
  fi
  home="$OUT/demo-$s"
  rm -rf "$home"
  env $envs QOPS_HOME="$home" bash scripts/demo.sh > "$OUT/demo-$s.log" 2>&1
  demo=$("$PY" - "$home" <<'PY'
import json, sys
from pathlib import Path
try:
    latest = json.loads((Path(sys.argv[1]) / "artifacts/german-credit/latest_summary.json").read_text())
    s = json.loads(Path(latest["summary"]).read_text())
except Exception as e:  # no summary: the demo failed before it
    print(f"no summary ({type(e).__name__}) | n/a"); sys.exit()
rows = s["targets"]
ok = all(r.get("gate") == "passed" and (r.get("mlflow") or {}).get("registered") for r in rows)
cells = "; ".join(f"{r['target']}: {r.get('gate')} {r.get('metric_quantized', float('nan')):.3f}/"
                  f"{r.get('metric_fp32', float('nan')):.3f}" for r in rows)
print(f"{'all passed' if ok else 'NOT ALL PASSED'} ({cells}) | {rows[0].get('metric_fp32', float('nan')):.3f}")
PY
)
  echo "| $s | \`${envs:-(none)}\` | $suite | $demo |" >> "$OUT/matrix.md"
  tail -1 "$OUT/matrix.md"
done
echo "results: $OUT/matrix.md"
