"""Does python peft load an adapter claas-rs trained, and compute what we compute?

Usage: python peft_parity.py CLAAS_BIN BASE_DIR ADAPTER_DIR [--ids 1,2,3,...]

Runs `CLAAS_BIN model logits` (our Qwen3 + LoRA forward) and transformers +
`PeftModel.from_pretrained` on the same token ids, with and without the adapter, and prints
the largest absolute logit difference of each. Exits 1 above 1e-4. Needs torch,
transformers and peft (not in CI: torch is gigabytes; BENCHMARKS.md quotes a run).
"""

import argparse
import json
import subprocess
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def ours(claas: str, base: str, adapter: str | None, ids: list[int]) -> torch.Tensor:
    cmd = [claas, "model", "logits", "--model", base, "--ids", ",".join(map(str, ids))]
    if adapter:
        cmd += ["--adapter", adapter]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return torch.tensor(json.loads(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("claas")
    ap.add_argument("base")
    ap.add_argument("adapter")
    ap.add_argument("--ids", default="1,17,42,99,5,64,3,120,7,88,31,2")
    a = ap.parse_args()
    ids = [int(i) for i in a.ids.split(",")]
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(a.base, torch_dtype=torch.float32).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        theirs_base = base(x).logits[0]
    peft = PeftModel.from_pretrained(base, a.adapter).eval()
    with torch.no_grad():
        theirs_lora = peft(x).logits[0]
    worst = 0.0
    for name, theirs, adapter in [
        ("base", theirs_base, None),
        ("with adapter", theirs_lora, a.adapter),
    ]:
        diff = (ours(a.claas, a.base, adapter, ids) - theirs).abs().max().item()
        worst = max(worst, diff)
        print(f"{name}: max |claas - peft| = {diff:.3g} over {len(ids)} positions")
    moved = (theirs_lora - theirs_base).abs().max().item()
    print(f"the adapter moves the logits by up to {moved:.3g}")
    if worst > 1e-4 or moved == 0.0:
        sys.exit(1)


if __name__ == "__main__":
    main()
