#!/usr/bin/env bash
# The recipe study's queue runner (issue 21): runs `dpscale train` once per line of the queue file, one at a
# time, in the background over sessions. Each line is "NAME|ARGS"; a run is done when
# $SWEEP/results/NAME/metrics.json exists, failed when $SWEEP/failed/NAME exists. Results (metrics.json,
# privacy_report.json, the command, /usr/bin/time -v) are copied into $SWEEP/results/NAME/.
#     SWEEP=/work/sweep QUEUE=examples/sweeps/sst2_queue.txt nohup bash examples/sweeps/run_queue.sh &
# Print the rows: python examples/results_table.py $SWEEP/results/*/
cd "$(dirname "$0")/../.."
SWEEP=${SWEEP:-runs/sweep}
QUEUE=${QUEUE:-examples/sweeps/sst2_queue.txt}
mkdir -p "$SWEEP"
export OMP_NUM_THREADS=1
while true; do
  next=""
  while IFS= read -r line; do
    [ -z "$line" ] && continue; [[ "$line" == \#* ]] && continue
    name="${line%%|*}"
    if [ ! -f $SWEEP/results/$name/metrics.json ] && [ ! -f $SWEEP/failed/$name ]; then next="$line"; break; fi
  done < $QUEUE
  [ -z "$next" ] && { echo "$(date -u +%FT%T) queue done" >> $SWEEP/runner.log; exit 0; }
  name="${next%%|*}"; args="${next#*|}"
  mkdir -p $SWEEP/results/$name $SWEEP/failed
  echo "$(date -u +%FT%T) start $name: $args" >> $SWEEP/runner.log
  start=$(date +%s)
  if /usr/bin/time -v -o $SWEEP/results/$name/time.txt .venv/bin/dpscale train $args --output-dir $SWEEP/runs/$name > $SWEEP/results/$name/log.txt 2>&1; then
    cp $SWEEP/runs/$name/metrics.json $SWEEP/results/$name/ 2>/dev/null
    cp $SWEEP/runs/$name/privacy_report.json $SWEEP/results/$name/ 2>/dev/null
    echo "dpscale train $args --output-dir runs/$name" > $SWEEP/results/$name/command.txt
    echo "$(date -u +%FT%T) done $name in $(( $(date +%s) - start )) s" >> $SWEEP/runner.log
  else
    touch $SWEEP/failed/$name
    echo "$(date -u +%FT%T) FAILED $name" >> $SWEEP/runner.log
  fi
done
