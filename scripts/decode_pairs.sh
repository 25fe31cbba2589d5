#!/usr/bin/env bash
# Issue 9's speed bounds, side by side: PAIRS pairs of runs on one checkpoint, each PyTorch run
# (transformers `generate`) just before its candle run (`claas bench decode`), so both see the
# same machine state. Prints each pair's ratios, then the medians over the pairs.
#
# Usage: scripts/decode_pairs.sh [MODEL_DIR] [PAIRS]   (from the repository root, after
#        `cargo build --release --bin claas`; PYTHON names an interpreter with torch)
set -euo pipefail
model=${1:-models/qwen3-0.6b-random}
pairs=${2:-8}
python=${PYTHON:-python3}
args=(--prompt 256 --new-tokens 32 --runs 3)
field() { sed -n "s/.*$1 \([0-9.]*\) .*/\1/p"; }
ttft_ratios=()
decode_ratios=()
for i in $(seq 1 "$pairs"); do
    torch=$("$python" scripts/torch_generate_bench.py "$model" "${args[@]}" --threads 2 2>/dev/null | tail -n 1)
    candle=$(target/release/claas bench decode --model "$model" "${args[@]}" 2>/dev/null | tail -n 1)
    t_ttft=$(field "time to first token" <<<"$torch")
    c_ttft=$(field "time to first token" <<<"$candle")
    t_dec=$(field "decode" <<<"$torch")
    c_dec=$(field "decode" <<<"$candle")
    r_ttft=$(awk -v c="$c_ttft" -v t="$t_ttft" 'BEGIN { printf "%.3f", c / t }')
    r_dec=$(awk -v c="$c_dec" -v t="$t_dec" 'BEGIN { printf "%.3f", c / t }')
    ttft_ratios+=("$r_ttft")
    decode_ratios+=("$r_dec")
    echo "pair $i: ttft candle $c_ttft ms / pytorch $t_ttft ms = $r_ttft;" \
        "decode candle $c_dec / pytorch $t_dec tokens/s = $r_dec"
done
median() { printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
echo "median over $pairs pairs: ttft ratio $(median "${ttft_ratios[@]}") (bound: <= 1)," \
    "decode ratio $(median "${decode_ratios[@]}") (bound: >= 1)"
