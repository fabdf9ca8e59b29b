#!/usr/bin/env bash
# Everything a session with a lent GPU should run, in stages that each fit one 10-minute
# device call. Results land in $OUT (the device tool brings them back) as one archive per
# stage, plus the log; unpack them under bench/results/<device>-<date>/ and commit.
#
#   bash bench/gpu_session.sh tests      # pytest -m gpu (Triton kernels, decode, custom ops)
#   bash bench/gpu_session.sh attn       # bench/attn_speed.py: 8K-128K fwd+bwd, then 512K-1M fwd
#   bash bench/gpu_session.sh generate   # bench/generate_speed.py + roofline (plain/speculative/staged)
#
# The device image already has torch, triton, einops, transformers, rich, matplotlib,
# hypothesis and pytest-xdist, so nothing is installed: the repo runs from its checkout.
# No flash-attn there: dense baselines are SDPA flash / cuDNN.
set -uo pipefail
stage=${1:?usage: bash bench/gpu_session.sh tests|attn|generate}
out=${OUT:-/tmp/gpu_session}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 - <<'PY' > "$out/env_$stage.txt" 2>&1
import platform, torch, triton
print(platform.platform(), "python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print(torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0))
PY
nvidia-smi >> "$out/env_$stage.txt" 2>&1
work=$(mktemp -d)
case "$stage" in
  tests)
    timeout 560 python3 -m pytest -m gpu -q -p no:cacheprovider --timeout 300 tests 2>&1 | tee "$out/tests.log"
    ;;
  attn)
    timeout 330 python3 bench/attn_speed.py --seqlens 8k,32k,128k --modes fwd,fwd+bwd --max-seconds 3 \
      --out "$work/attn" 2>&1 | tee "$out/attn.log"
    timeout 220 python3 bench/attn_speed.py --seqlens 512k,1m --modes fwd --max-seconds 3 \
      --providers moba-triton,moba-full,sdpa-flash,sdpa-cudnn,flex-moba,moba-paper-reimpl,moba-official \
      --out "$work/attn_long" 2>&1 | tee -a "$out/attn.log"
    python3 bench/roofline.py "$work/attn/attn_speed.json" --out "$work/attn/roofline.png" 2>&1 | tee -a "$out/attn.log"
    ;;
  generate)
    timeout 400 python3 bench/generate_speed.py --draft-noise 0.02 --gamma 4 --new-tokens 128 --prompt-len 2048 \
      --out "$work/generate" 2>&1 | tee "$out/generate.log"
    python3 bench/roofline.py "$work/generate/points.json" --no-model --out "$work/generate/roofline.png" 2>&1 | tee -a "$out/generate.log"
    ;;
  *)
    echo "unknown stage $stage (tests|attn|generate)"; exit 2 ;;
esac
status=${PIPESTATUS[0]}
tar czf "$out/$stage.tgz" -C "$work" . 2>/dev/null
exit "$status"
