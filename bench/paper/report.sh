#!/usr/bin/env bash
# The table (results.md) and the plots (*.png) of a bench/paper/run.sh run, from its points.csv.
# run.sh calls it at the end; run it again to redraw a run's results:
#
#   bench/paper/report.sh bench/paper/results/<time>
#
# The plots need matplotlib, installed once from PyPI into a virtual environment cached in
# $KMMR_BENCH_CACHE (default ~/.cache/kmmr-bench), keyed by its version.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
dir=${1:?usage: report.sh RESULTS_DIR}
[[ -f $dir/points.csv ]] || { echo "report.sh: no points.csv in $dir" >&2; exit 2; }
MATPLOTLIB_VERSION=3.11.2
cache="${KMMR_BENCH_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/kmmr-bench}"
venv=$cache/plot-venv-matplotlib-$MATPLOTLIB_VERSION
python3 "$here/table.py" "$dir/points.csv" >"$dir/results.md"
if [[ ! -x $venv/bin/python ]]; then
  echo "report.sh: installing matplotlib $MATPLOTLIB_VERSION into $venv" >&2
  rm -rf "$venv.tmp"
  python3 -m venv "$venv.tmp"
  "$venv.tmp/bin/pip" install -q "matplotlib==$MATPLOTLIB_VERSION"
  mv "$venv.tmp" "$venv"
fi
"$venv/bin/python" "$here/plot.py" "$dir/points.csv" "$dir"
echo "report.sh: $dir/results.md and $(find "$dir" -maxdepth 1 -name '*.png' | wc -l) plots" >&2
