"""Wall time of transformers' `from_pretrained` in f32 on the CPU, the figure `claas bench
load` is compared with. With safetensors, PyTorch maps the files and reads a weight's pages
only when it is first used, so each run also prints the time to then read every weight once.
Usage: python scripts/torch_load_time.py DIR [RUNS]"""

import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM


def main() -> None:
    path = sys.argv[1]
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    secs = []
    for run in range(1, runs + 1):
        started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
        s = time.perf_counter() - started
        with torch.no_grad():
            total = sum(float(p.sum()) for p in model.parameters())
        touched = time.perf_counter() - started - s
        del model
        print(f"run {run}: {s:.3f} s (+ {touched:.3f} s to read every weight once: {total:.3g})", flush=True)
        secs.append(s)
    print(
        f"torch {torch.__version__}: load {path} median {statistics.median(secs):.3f} s "
        f"over {runs} runs ({torch.get_num_threads()} threads)"
    )


if __name__ == "__main__":
    main()
