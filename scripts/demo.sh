#!/usr/bin/env bash
# The demo: Airflow on SQLite and MLflow on SQLite + local artifacts, all under .demo/ in this checkout.
#  1. airflow db migrate; register the example DAGs
#  2. german_credit_retrain: train the credit-risk model, log it to MLflow, alias `champion`, update the Asset
#  3. german_credit_quantize (scheduled on that Asset; triggered here with `airflow dags test`)
#  4. print the summary table and, last, `summary: <path>`
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${VENV:-$ROOT/.venv}
export QOPS_HOME=${QOPS_HOME:-$ROOT/.demo}
export AIRFLOW_HOME=${AIRFLOW_HOME:-$QOPS_HOME/airflow}
export AIRFLOW__CORE__DAGS_FOLDER=$ROOT/dags
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$QOPS_HOME/mlflow.db}
export PYTHONWARNINGS=ignore
mkdir -p "$QOPS_HOME" "$AIRFLOW_HOME"
LOGS=$QOPS_HOME/logs
mkdir -p "$LOGS"
PATH=$VENV/bin:$PATH
cd "$QOPS_HOME"  # MLflow's local artifact store (./mlruns) lands in .demo/mlruns

step() { printf '\n==> [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

step "Airflow metadata DB (SQLite) in $AIRFLOW_HOME"
airflow db migrate > "$LOGS/db_migrate.log" 2>&1
airflow dags reserialize > "$LOGS/reserialize.log" 2>&1
errors=$(airflow dags list-import-errors -o json 2>/dev/null | tail -n 1)
if [ "$errors" != "[]" ]; then airflow dags list-import-errors; exit 1; fi

step "Retraining DAG german_credit_retrain (log: $LOGS/retrain.log)"
airflow dags test german_credit_retrain > "$LOGS/retrain.log" 2>&1 || { tail -50 "$LOGS/retrain.log"; exit 1; }
python - "$QOPS_HOME/retrain/result.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"    registered {r['model_name']} version {r['version']} as {r['model_uri']}; "
      f"validation accuracy {r['val_accuracy']:.4f} ({r['n_features']} features)")
PY

step "Quantization DAG german_credit_quantize, triggered by the model Asset (log: $LOGS/quantize.log)"
touch "$LOGS/.quantize-start"
airflow dags test german_credit_quantize > "$LOGS/quantize.log" 2>&1 &
pid=$!
# progress: one line per finished task
seen=0
while kill -0 $pid 2>/dev/null; do
  sleep 2
  n=$(grep -c "\[DAG TEST\] end task" "$LOGS/quantize.log" || true)
  if [ "$n" != "$seen" ]; then
    grep "\[DAG TEST\] end task" "$LOGS/quantize.log" | sed -n "$((seen + 1)),${n}p" | sed -E 's/.*task_id=([^ ]+).*/    done: \1/'
    seen=$n
  fi
done
quant_rc=0
wait $pid || quant_rc=$?
if [ ! "$QOPS_HOME/artifacts/german-credit/latest_summary.json" -nt "$LOGS/.quantize-start" ]; then
  tail -60 "$LOGS/quantize.log"; echo "quantization DAG failed before writing a summary; log: $LOGS/quantize.log"; exit 1
fi
if [ "$quant_rc" != "0" ]; then
  echo "    the DAG run failed: some target did not pass its gates (or a stage failed); see $LOGS/quantize.log"
fi

step "Summary"
echo "MLflow UI:  make mlflow-ui   (then open http://127.0.0.1:5000)"
echo "Airflow:    AIRFLOW_HOME=$AIRFLOW_HOME $VENV/bin/airflow standalone"
echo
# exits non-zero when no target passed its gates
qops summary "$QOPS_HOME/artifacts/german-credit/latest_summary.json"
