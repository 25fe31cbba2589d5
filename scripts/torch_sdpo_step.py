#!/usr/bin/env python3
"""PyTorch + transformers + peft reference for one CLaaS SDPO LoRA training step.

Used to benchmark (and cross-check) the Rust candle trainer side by side. It is not
part of the build or the tests; run it from a venv that has torch, transformers,
peft and safetensors installed.

The step, per sample (sequential):
  1. base logprobs of the response tokens (no grad, adapter disabled);
  2. teacher top-K logprobs over the response positions, with the teacher prompt
     (no grad, adapter disabled);
  3. student logits with grad (adapter enabled);
  4. SDPO loss (generalized JSD over the teacher's top-K, IS-weighted, plus a KL
     regularizer to the base policy).
Then: mean of the per-sample losses, backward, clip_grad_norm_ over the LoRA
params (its pre-clip norm is the reported grad_norm), AdamW step, zero_grad.

Examples:
  python scripts/torch_sdpo_step.py --model DIR --adapter ADAPTER_DIR \
      --input step1/input.json --steps 1 --threads 1
  python scripts/torch_sdpo_step.py --model DIR --prompt-len 64 --response-len 64 \
      --teacher-len 96 --batch 1 --rank 32 --alpha 64 --steps 5 --threads 2
  python scripts/torch_sdpo_step.py --model DIR --prompt-len 512 --response-len 256 \
      --teacher-len 576 --dtype bfloat16 --device cuda --steps 5   # peak_gpu_mb in the JSON

Per-step wall times go to stderr; one JSON line with the results goes to stdout.
"""

import argparse
import json
import random
import resource
import statistics
import sys
import time

import torch

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

SYNTHETIC_TRAINING = {
    "learning_rate": 1e-4,
    "alpha": 0.5,
    "is_clip": 5.0,
    "max_grad_norm": 1.0,
    "kl_reg_weight": 0.1,
    "teacher_top_k": 100,
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF Qwen3 checkpoint dir (config.json + safetensors)")
    p.add_argument("--adapter", default=None, help="PEFT LoRA adapter dir to load (trainable) instead of a fresh one")
    p.add_argument("--input", default=None, help="step input JSON ({samples, training}); synthetic mode if absent")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--response-len", type=int, default=64)
    p.add_argument("--teacher-len", type=int, default=96)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--alpha", type=float, default=64.0, help="LoRA alpha (not the SDPO alpha)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attn_implementation")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    return p.parse_args()


def sdpo_loss(
    student_logits,  # (B, T, V), with grad
    teacher_logprobs,  # (B, T, K) top-K teacher logprobs
    teacher_indices,  # (B, T, K) their token ids
    response_ids,  # (B, T)
    old_logprobs,  # (B, T) rollout logprobs
    base_logprobs,  # (B, T) base-policy logprobs
    mask,  # (B, T)
    alpha,
    is_clip,
    kl_reg_weight,
):
    s = torch.log_softmax(student_logits, dim=-1)
    s_chosen = s.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)

    if alpha < 1.0:
        s_k = s.gather(-1, teacher_indices)
        t_p = teacher_logprobs.exp()
        t_p = t_p / t_p.sum(-1, keepdim=True).clamp(min=1e-8)
        s_p = s_k.exp()
        s_p = s_p / s_p.sum(-1, keepdim=True).clamp(min=1e-8)
        log_t = t_p.log()
        log_s = s_p.log()
        # log(alpha) as a float32 tensor, as the reference does: alpha = 0 gives -inf,
        # which logsumexp handles (math.log(0) would raise).
        alpha_t = torch.tensor(alpha, dtype=s.dtype, device=s.device)
        log_m = torch.logsumexp(
            torch.stack([log_s + torch.log(1 - alpha_t), log_t + torch.log(alpha_t)]), dim=0
        )
        kl_t = (t_p * (log_t - log_m)).sum(-1)
        kl_s = (s_p * (log_s - log_m)).sum(-1)
        per_token = torch.lerp(kl_s, kl_t, alpha_t)
    else:
        match = teacher_indices == response_ids.unsqueeze(-1)
        in_topk = match.any(-1)
        t_match = torch.where(match, teacher_logprobs, torch.full_like(teacher_logprobs, -float("inf"))).amax(-1)
        t_chosen = torch.where(in_topk, t_match, torch.full_like(t_match, -20.0))
        per_token = (s_chosen - t_chosen).detach() * s_chosen

    ratio = torch.exp(torch.clamp((s_chosen - old_logprobs).detach(), -20.0, 20.0)).clamp(max=is_clip)
    per_token = per_token * ratio

    lr_ = torch.clamp(s_chosen - base_logprobs, -20.0, 20.0)
    kl = (torch.exp(lr_) - 1.0) - lr_

    n = mask.sum().clamp(min=1)
    distill = (per_token * mask).sum() / n
    kl_reg = (kl * mask).sum() / n
    loss = distill + kl_reg_weight * kl_reg
    mean_is_ratio = (ratio * mask).sum() / n
    clip_fraction = ((ratio >= is_clip).float() * mask).sum() / n
    return loss, {
        "distill_loss": distill.item(),
        "kl_reg": kl_reg.item(),
        "mean_is_ratio": mean_is_ratio.item(),
        "clip_fraction": clip_fraction.item(),
    }


def response_logits(model, ids, prefix_len):
    """logits[:, prefix_len-1:-1]: the positions that predict the response tokens."""
    out = model(input_ids=ids, use_cache=False)
    logits = out.logits[:, prefix_len - 1 : -1]
    if logits.dtype != torch.float32:
        logits = logits.float()
    return logits


def train_step(model, optimizer, lora_params, samples, training, vocab_size, dev="cpu"):
    alpha = float(training["alpha"])
    is_clip = float(training["is_clip"])
    kl_reg_weight = float(training["kl_reg_weight"])
    max_grad_norm = float(training["max_grad_norm"])
    top_k = min(max(1, int(training["teacher_top_k"])), vocab_size)

    losses = []
    per_sample = []
    tokens = 0
    for smp in samples:
        prompt = smp["prompt_token_ids"]
        response = smp["response_token_ids"]
        teacher_prompt = smp["teacher_prompt_token_ids"]
        P, T, Pt = len(prompt), len(response), len(teacher_prompt)
        tokens += T

        full_ids = torch.tensor([prompt + response], dtype=torch.long, device=dev)
        teacher_ids = torch.tensor([teacher_prompt + response], dtype=torch.long, device=dev)
        resp = torch.tensor([response], dtype=torch.long, device=dev)
        old_lp = torch.tensor([smp["response_logprobs"]], dtype=torch.float32, device=dev)
        mask = torch.ones(1, T, dtype=torch.float32, device=dev)

        with torch.no_grad(), model.disable_adapter():
            base_lp = (
                torch.log_softmax(response_logits(model, full_ids, P), dim=-1)
                .gather(-1, resp.unsqueeze(-1))
                .squeeze(-1)
            )
            t_lp_all = torch.log_softmax(response_logits(model, teacher_ids, Pt), dim=-1)
            t_vals, t_idx = torch.topk(t_lp_all, k=top_k, dim=-1)
            del t_lp_all

        student = response_logits(model, full_ids, P)
        loss, m = sdpo_loss(
            student, t_vals, t_idx, resp, old_lp, base_lp, mask, alpha, is_clip, kl_reg_weight
        )
        losses.append(loss)
        per_sample.append(m)

    total = torch.stack(losses).mean()
    total.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(lora_params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad()

    nb = len(samples)
    metrics = {"total_loss": total.item()}
    for key in ("distill_loss", "kl_reg", "mean_is_ratio", "clip_fraction"):
        metrics[key] = sum(m[key] for m in per_sample) / nb
    metrics["grad_norm"] = float(grad_norm)
    metrics["tokens_processed"] = tokens
    metrics["batch_size"] = nb
    return metrics


def synthetic_samples(args, vocab_size):
    rng = random.Random(args.seed)

    def ids(n):
        return [rng.randrange(vocab_size) for _ in range(n)]

    samples = []
    for _ in range(args.batch):
        samples.append(
            {
                "prompt_token_ids": ids(args.prompt_len),
                "response_token_ids": ids(args.response_len),
                "response_logprobs": [-2.0] * args.response_len,
                "teacher_prompt_token_ids": ids(args.teacher_len),
            }
        )
    return samples


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    import peft
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import Qwen3ForCausalLM

    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    base = Qwen3ForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation=args.attn)
    if args.adapter:
        model = PeftModel.from_pretrained(base, args.adapter, is_trainable=True)
    else:
        cfg = LoraConfig(
            r=args.rank,
            lora_alpha=args.alpha,
            target_modules=LORA_TARGETS,
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(base, cfg)

    if args.grad_checkpointing:
        model.train()
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    else:
        model.eval()
    dev = torch.device(args.device)
    model.to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    load_s = time.perf_counter() - t0

    vocab_size = base.config.vocab_size
    if args.input:
        with open(args.input) as f:
            data = json.load(f)
        samples = data["samples"]
        training = dict(SYNTHETIC_TRAINING)
        training.update(data.get("training", {}))
    else:
        samples = synthetic_samples(args, vocab_size)
        training = dict(SYNTHETIC_TRAINING)

    lora_params = [p for n, p in model.named_parameters() if p.requires_grad]
    n_lora = sum(p.numel() for p in lora_params)
    optimizer = torch.optim.AdamW(
        lora_params, lr=float(training["learning_rate"]), betas=(0.9, 0.999), weight_decay=0.01
    )

    print(
        f"loaded in {load_s:.2f}s: attn={base.config._attn_implementation} dtype={args.dtype} "
        f"lora_params={n_lora} ({len(lora_params)} tensors) samples={len(samples)} "
        f"threads={torch.get_num_threads()} grad_checkpointing={args.grad_checkpointing}",
        file=sys.stderr,
    )

    step_times = []
    metrics = None
    for i in range(args.steps):
        t = time.perf_counter()
        metrics = train_step(model, optimizer, lora_params, samples, training, vocab_size, dev)
        sync()
        dt = time.perf_counter() - t
        step_times.append(dt)
        print(
            f"step {i + 1}/{args.steps}: {dt:.3f}s loss={metrics['total_loss']:.6f} "
            f"grad_norm={metrics['grad_norm']:.6f}",
            file=sys.stderr,
        )

    timed = step_times[1:] if len(step_times) > 1 else step_times
    result = {
        "median_step_s": statistics.median(timed) if timed else None,
        "step_times_s": step_times,
        "metrics": metrics,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None,
        "device": args.device,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "threads": torch.get_num_threads(),
        "attn_implementation": base.config._attn_implementation,
        "dtype": args.dtype,
        "grad_checkpointing": args.grad_checkpointing,
        "lora_params": n_lora,
        "load_s": load_s,
        "steps": args.steps,
        "mode": "input" if args.input else "synthetic",
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
