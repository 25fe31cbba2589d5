"""Greedy generation with Hugging Face transformers (PyTorch, KV cache on), for the
side-by-side against `claas bench decode` (BENCHMARKS.md).

Usage: python torch_generate_bench.py CHECKPOINT_DIR [--prompt 256] [--new-tokens 64]
       [--runs 3] [--threads 2]

Prints the time to first token (generate with max_new_tokens=1) and decode tokens/s (the
time for N tokens minus the first, over N-1), medians over --runs after a warm-up, on the
same kind of random prompt ids as the Rust bench.
"""

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM


def prompt_ids(n: int, vocab: int) -> list[int]:
    # The same xorshift as `claas bench decode`, so both see the same prompt.
    x = 0x9E3779B97F4A7C15
    mask = (1 << 64) - 1
    out = []
    for _ in range(n):
        x ^= (x << 13) & mask
        x ^= x >> 7
        x ^= (x << 17) & mask
        out.append(x % vocab)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32)
    model.eval()
    ids = torch.tensor([prompt_ids(a.prompt, model.config.vocab_size)])
    mask = torch.ones_like(ids)

    def gen(n: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
            )
        assert out.shape[1] == a.prompt + n
        return time.perf_counter() - start

    gen(a.new_tokens)  # warm-up
    ttft = [gen(1) for _ in range(a.runs)]
    full = [gen(a.new_tokens) for _ in range(a.runs)]
    first = statistics.median(ttft)
    tps = (a.new_tokens - 1) / (statistics.median(full) - first)
    print(
        f"pytorch {torch.__version__}: prompt {a.prompt} tokens, {a.new_tokens} new: "
        f"time to first token {first * 1000:.1f} ms, decode {tps:.2f} tokens/s "
        f"(medians of {a.runs} runs, {a.threads} threads)"
    )


if __name__ == "__main__":
    main()
