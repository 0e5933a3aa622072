#!/usr/bin/env bash
# Verification accuracy of one or more checkpoints on LFW, CFP-FP, CPLFW, CALFW and AgeDB-30.
# Prints the paper's table and writes results.csv / results_detail.csv; every option is passed on to
# validation_hq/eval_5valsets.py (see --help there), for example:
#
#   bash validation_hq/eval_5valsets.sh --data_root /data --val_data_path faces_emore \
#        --model_name ir50_ms1mv2 ir101_webface12m --device cuda
#   bash validation_hq/eval_5valsets.sh --data_root /data --ckpt_path runs/a/last.ckpt runs/b/last.ckpt --arch ir_50
#   bash validation_hq/eval_5valsets.sh --features_path result/5valsets/ir50_ms1mv2_features.npz
#
# PYTHON selects the interpreter (default: python3).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ "$#" -eq 0 ]; then
    exec "${PYTHON:-python3}" "${here}/eval_5valsets.py" --help
fi
exec "${PYTHON:-python3}" "${here}/eval_5valsets.py" "$@"
