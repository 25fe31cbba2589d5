#!/usr/bin/env python3
"""Writes the project's golden trainer fixtures (tests/fixtures/) from a fixed seed.

The loss and step fixtures are computed by the project's own PyTorch reference of one SDPO
step (`scripts/torch_sdpo_step.py`: `sdpo_loss`, `train_step`) in float32 on the CPU with
one thread; the tokenizer fixture by `tokenizers` and transformers. Two runs with the same
pinned packages (scripts/requirements-golden.txt) give byte-identical files.

  target/pyref/bin/python scripts/make_golden.py --out tests/fixtures
  target/pyref/bin/python scripts/make_golden.py --check tests/fixtures
  target/pyref/bin/python scripts/make_golden.py --check ../shared/fixtures
  target/pyref/bin/python scripts/make_golden.py --out tests/fixtures --only tokenizer

--out writes:
  sdpo_loss/cases.json                 six loss cases: inputs, scalars, d loss / d student logits
  distill_step/base_model/             a random tiny Qwen3 (config.json, model.safetensors f32)
  distill_step/adapter_init/           a PEFT LoRA adapter (r 4, alpha 8, seven projections, B = 0)
  distill_step/step{1,2}/input.json    each step's batch and training config
  distill_step/step{1,2}/expected_metrics.json, adapter_model.safetensors
                                       the metrics of each step and the adapter after it
  tokenizer/tokenizer.json             a tiny byte-level BPE (~500 ids) trained here by
                                       `tokenizers` on CORPUS, with Qwen3's special tokens
  tokenizer/tokenizer_config.json      Qwen3's chat template, eos <|im_end|>, pad <|endoftext|>
  tokenizer/chat_template_cases.json   conversations rendered by transformers'
                                       apply_chat_template, and their token ids

The tokenizer fixture takes one thing from outside this script: Qwen3's official chat
template, read from the `chat_template` field of a Qwen3 `tokenizer_config.json`
(--qwen3-tokenizer-config; by default ../shared/fixtures/tokenizer/tokenizer_config.json
beside the repository; a real Qwen3 checkpoint's tokenizer_config.json works the same).

--check DIR re-runs the reference on DIR's inputs (the same file layouts) and compares
with DIR's expected values: scalars ~1e-5 relative and gradients ~1e-5 absolute for the
loss, metrics ~1e-4 relative and adapters ~1e-5 absolute for the steps. For tokenizer/ it
loads DIR/tokenizer with transformers' AutoTokenizer, re-renders every case and re-tokenizes
the text: text and ids must match exactly, and so must the raw `tokenizers` ids. It prints
the largest differences and exits 1 when one is over its bound.
--only limits --out and --check to some of sdpo_loss, distill_step, tokenizer.
"""

import argparse
import json
import os
import random
import shutil
import sys
import tempfile

import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; no hub look-ups
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
warnings.filterwarnings("ignore", category=FutureWarning)  # gradient_checkpointing_enable's rename
warnings.filterwarnings("ignore", message=".*config file in base_model.*")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_sdpo_step import LORA_TARGETS, sdpo_loss, train_step  # noqa: E402

DEFAULT_SEED = 20261207

TRAINING = {
    "learning_rate": 1e-3,
    "alpha": 0.5,
    "is_clip": 5.0,
    "max_grad_norm": 1.0,
    "kl_reg_weight": 0.1,
    "teacher_top_k": 10,
}

# (name, B, T, V, K, alpha, is_clip, kl_reg_weight, masked tail positions)
LOSS_CASES = [
    ("gjs_alpha_0.5", 1, 6, 32, 8, 0.5, 5.0, 0.0, 0),
    ("gjs_alpha_0.5_kl", 1, 7, 32, 10, 0.5, 5.0, 0.1, 0),
    ("gjs_alpha_0.25_tight_clip", 2, 5, 40, 8, 0.25, 1.2, 0.05, 0),
    ("gjs_alpha_0_student_side", 1, 6, 32, 8, 0.0, 5.0, 0.1, 0),
    ("reverse_kl_alpha_1", 1, 8, 32, 8, 1.0, 5.0, 0.1, 0),
    ("masked_tail", 2, 6, 24, 6, 0.5, 2.0, 0.2, 2),
]

QWEN3 = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "initializer_range": 0.15,
    "attention_bias": False,
    "use_sliding_window": False,
}
ROPE_THETA = 1000000.0
LORA_R, LORA_ALPHA = 4, 8
FIRST_TOKEN = 3  # ids 0..2 are pad, bos, eos


# ---------------------------------------------------------------- files


def write_json(path, obj, indent=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(json.dumps(obj, indent=indent) + "\n")


def read_json(path):
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------- sdpo_loss


def run_loss(inputs, training):
    """The reference loss on one case's inputs: (expected dict, grad as a tensor)."""
    logits = torch.tensor(inputs["student_logits"], dtype=torch.float32, requires_grad=True)
    loss, m = sdpo_loss(
        logits,
        torch.tensor(inputs["teacher_logprobs"], dtype=torch.float32),
        torch.tensor(inputs["teacher_indices"], dtype=torch.long),
        torch.tensor(inputs["response_ids"], dtype=torch.long),
        torch.tensor(inputs["old_student_logprobs"], dtype=torch.float32),
        torch.tensor(inputs["base_logprobs"], dtype=torch.float32),
        torch.tensor(inputs["response_mask"], dtype=torch.float32),
        float(training["alpha"]),
        float(training["is_clip"]),
        float(training["kl_reg_weight"]),
    )
    loss.backward()
    expected = {"loss": loss.item()}
    expected.update(m)
    expected["grad_student_logits"] = logits.grad.tolist()
    return expected


def make_loss_case(seed, name, B, T, V, K, alpha, is_clip, kl_w, masked):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=g) * 1.5
    # A teacher that agrees with the student only in part.
    teacher = 0.6 * student + torch.randn(B, T, V, generator=g) * 1.5
    t_vals, t_idx = torch.topk(torch.log_softmax(teacher, dim=-1), k=K, dim=-1)
    # Sampled response: half from the teacher's top-K, half anywhere in the vocabulary.
    pick = torch.randint(0, K, (B, T), generator=g)
    anywhere = torch.randint(0, V, (B, T), generator=g)
    from_topk = torch.rand(B, T, generator=g) < 0.5
    response = torch.where(from_topk, t_idx.gather(-1, pick.unsqueeze(-1)).squeeze(-1), anywhere)
    if alpha >= 1.0:
        # The reverse-KL branch: one token in the top-K, one outside it (floor -20).
        response[0, 0] = t_idx[0, 0, 1]
        outside = [v for v in range(V) if v not in set(t_idx[0, 1].tolist())]
        response[0, 1] = outside[int(torch.randint(0, len(outside), (1,), generator=g))]
    mask = torch.ones(B, T)
    if masked:
        mask[:, T - masked :] = 0.0
        response[:, T - masked :] = 0  # padding
    chosen = torch.log_softmax(student, dim=-1).gather(-1, response.unsqueeze(-1)).squeeze(-1)
    # Rollout and base log-probs near the student's: IS ratios around 1 (some past a
    # tight clip) and a non-trivial k3 term.
    old = chosen + torch.randn(B, T, generator=g) * 1.0
    base = chosen + torch.randn(B, T, generator=g) * 0.7
    training = {"alpha": alpha, "is_clip": is_clip, "kl_reg_weight": kl_w}
    inputs = {
        "student_logits": student.tolist(),
        "teacher_logprobs": t_vals.tolist(),
        "teacher_indices": t_idx.tolist(),
        "base_logprobs": base.tolist(),
        "old_student_logprobs": old.tolist(),
        "response_ids": response.tolist(),
        "response_mask": mask.tolist(),
    }
    return {
        "name": name,
        "shape": {"B": B, "T": T, "V": V, "K": K},
        "training": training,
        "inputs": inputs,
        "expected": run_loss(inputs, training),
    }


def write_loss_cases(out, seed):
    cases = [make_loss_case(seed * 100 + i, *spec) for i, spec in enumerate(LOSS_CASES)]
    for c in cases:
        e = c["expected"]
        flat = torch.tensor(e["grad_student_logits"])
        assert torch.isfinite(flat).all() and all(
            torch.isfinite(torch.tensor(e[k])) for k in ("loss", "distill_loss", "kl_reg")
        ), c["name"]
    doc = {"source": f"scripts/make_golden.py seed {seed}: torch_sdpo_step.sdpo_loss, torch float32 CPU", "cases": cases}
    write_json(os.path.join(out, "sdpo_loss", "cases.json"), doc)
    return cases


def check_loss_cases(path):
    worst = {"scalar_rel": 0.0, "scalar_abs": 0.0, "grad_abs": 0.0}
    for c in read_json(path)["cases"]:
        got = run_loss(c["inputs"], c["training"])
        want = c["expected"]
        for k in ("loss", "distill_loss", "kl_reg", "mean_is_ratio", "clip_fraction"):
            d = abs(got[k] - want[k])
            worst["scalar_abs"] = max(worst["scalar_abs"], d)
            worst["scalar_rel"] = max(worst["scalar_rel"], d / max(abs(want[k]), 1e-6))
        d = (torch.tensor(got["grad_student_logits"]) - torch.tensor(want["grad_student_logits"])).abs().max()
        worst["grad_abs"] = max(worst["grad_abs"], d.item())
        print(f"  {c['name']}: loss {got['loss']!r} (expected {want['loss']!r}), max |d grad| {d.item():.3e}")
    ok = worst["scalar_rel"] <= 1e-5 and worst["grad_abs"] <= 1e-5
    return ok, worst


# ---------------------------------------------------------------- distill_step


def load_base(base_dir):
    from transformers import Qwen3ForCausalLM

    base = Qwen3ForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    for p in base.parameters():
        p.requires_grad = False
    return base


def run_step(base_dir, adapter_dir, opt_state, data, save_dir):
    """One step as the reference's local engine runs it: a fresh base model, the adapter
    loaded trainable, AdamW (+ the saved state), train mode with gradient checkpointing;
    then the adapter and the optimizer state saved to save_dir. Returns the metrics."""
    from peft import PeftModel

    base = load_base(base_dir)
    model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    training = data["training"]
    lora_params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        lora_params, lr=float(training["learning_rate"]), betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01
    )
    if opt_state is not None:
        optimizer.load_state_dict(torch.load(opt_state, map_location="cpu", weights_only=True))
    metrics = train_step(model, optimizer, lora_params, data["samples"], training, base.config.vocab_size)
    model.save_pretrained(save_dir)
    torch.save(optimizer.state_dict(), os.path.join(save_dir, "optimizer_state.pt"))
    return metrics


def run_chain(distill_dir, work):
    """Both steps from adapter_init, each resuming the previous step's adapter and
    optimizer state. Returns [(metrics, adapter safetensors path)] for step1, step2."""
    base_dir = os.path.join(distill_dir, "base_model")
    adapter, opt_state = os.path.join(distill_dir, "adapter_init"), None
    results = []
    for step in ("step1", "step2"):
        save = os.path.join(work, step)
        data = read_json(os.path.join(distill_dir, step, "input.json"))
        metrics = run_step(base_dir, adapter, opt_state, data, save)
        results.append((metrics, os.path.join(save, "adapter_model.safetensors")))
        adapter, opt_state = save, os.path.join(save, "optimizer_state.pt")
    return results


def check_distill(distill_dir):
    from safetensors.torch import load_file

    ok = True
    worst = {}
    with tempfile.TemporaryDirectory(prefix="claas-golden-check-") as work:
        for step, (metrics, adapter) in zip(("step1", "step2"), run_chain(distill_dir, work)):
            want = read_json(os.path.join(distill_dir, step, "expected_metrics.json"))
            rel = 0.0
            for k, w in want.items():
                d = abs(metrics[k] - w)
                r = d / abs(w) if w != 0 else d
                rel = max(rel, r)
                print(f"  {step} {k}: {metrics[k]!r} (expected {w!r}, |d| {d:.3e})")
            got_t, want_t = load_file(adapter), load_file(os.path.join(distill_dir, step, "adapter_model.safetensors"))
            assert sorted(got_t) == sorted(want_t), "adapter keys differ"
            ad = max((got_t[k] - want_t[k]).abs().max().item() for k in want_t)
            print(f"  {step}: metrics max rel diff {rel:.3e}, adapter max |d| {ad:.3e} over {len(want_t)} tensors")
            worst[step] = {"metrics_rel": rel, "adapter_abs": ad}
            ok = ok and rel <= 1e-4 and ad <= 1e-5
    return ok, worst


def qwen3_config():
    from transformers import Qwen3Config

    cfg = Qwen3Config(**QWEN3, rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA})
    cfg.architectures = ["Qwen3ForCausalLM"]
    return cfg


def write_base_model(path, seed):
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(qwen3_config()).to(torch.float32)
    # RMSNorm weights away from 1, so that a loader that ignores them is caught.
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(path)
    os.chmod(os.path.join(path, "model.safetensors"), 0o644)  # safetensors writes it 0600
    cfg_path = os.path.join(path, "config.json")
    cfg = read_json(cfg_path)
    assert cfg["rope_parameters"]["rope_theta"] == ROPE_THETA, cfg
    cfg["rope_theta"] = ROPE_THETA  # top-level, as real Qwen3 checkpoints have it
    with open(cfg_path, "w") as f:
        f.write(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return model


def write_adapter_init(path, base, seed):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=LORA_R,
        lora_alpha=LORA_ALPHA,
        target_modules=LORA_TARGETS,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)
    model = get_peft_model(base, cfg)  # PEFT default init: A Kaiming-uniform, B zero
    with tempfile.TemporaryDirectory(prefix="claas-golden-adapter-") as tmp:
        model.save_pretrained(tmp)
        os.makedirs(path, exist_ok=True)
        shutil.copyfile(os.path.join(tmp, "adapter_model.safetensors"), os.path.join(path, "adapter_model.safetensors"))
    # The adapter_config.json the reference's storage writes at init (same fields PEFT reads).
    write_json(
        os.path.join(path, "adapter_config.json"),
        {
            "base_model_name_or_path": "base_model",
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": False,
            "init_lora_weights": True,
            "lora_alpha": LORA_ALPHA,
            "lora_dropout": 0.0,
            "peft_type": "LORA",
            "r": LORA_R,
            "target_modules": LORA_TARGETS,
            "task_type": "CAUSAL_LM",
        },
        indent=2,
    )


def make_step_input(base, rng, g, step, lengths):
    samples = []
    for i, (p_len, r_len, extra) in enumerate(lengths):
        prompt = [rng.randrange(FIRST_TOKEN, QWEN3["vocab_size"]) for _ in range(p_len)]
        response = [rng.randrange(FIRST_TOKEN, QWEN3["vocab_size"]) for _ in range(r_len)]
        # The hindsight teacher prompt: the prompt, then the feedback's tokens.
        teacher = prompt + [rng.randrange(FIRST_TOKEN, QWEN3["vocab_size"]) for _ in range(extra)]
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logits = base(input_ids=ids, use_cache=False).logits[:, p_len - 1 : -1].float()
            lp = torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor([response]).unsqueeze(-1))
        # The serving engine's rollout log-probs: the base model's own, slightly off.
        rollout = (lp.view(-1) + torch.randn(r_len, generator=g) * 0.05).tolist()
        samples.append(
            {
                "user_prompt": f"golden step {step} prompt {i}",
                "system_prompt": "You are a helpful assistant.",
                "feedback": f"golden feedback {step}.{i}",
                "prompt": "",
                "response": "",
                "prompt_token_ids": prompt,
                "response_token_ids": response,
                "response_logprobs": rollout,
                "teacher_prompt_token_ids": teacher,
            }
        )
    return {"samples": samples, "training": dict(TRAINING)}


def write_distill(out, seed):
    d = os.path.join(out, "distill_step")
    base_dir = os.path.join(d, "base_model")
    write_adapter_init(os.path.join(d, "adapter_init"), write_base_model(base_dir, seed), seed + 2)
    base = load_base(base_dir).eval()  # as saved, and without the LoRA layers
    rng = random.Random(seed + 3)
    g = torch.Generator().manual_seed(seed + 4)
    # (prompt, response, teacher extra) lengths of the two samples of each step
    plan = {"step1": [(7, 6, 5), (11, 9, 4)], "step2": [(9, 5, 6), (6, 8, 3)]}
    for step, lengths in plan.items():
        write_json(os.path.join(d, step, "input.json"), make_step_input(base, rng, g, step[-1], lengths), indent=1)
    del base
    with tempfile.TemporaryDirectory(prefix="claas-golden-steps-") as work:
        for step, (metrics, adapter) in zip(("step1", "step2"), run_chain(d, work)):
            write_json(os.path.join(d, step, "expected_metrics.json"), metrics, indent=2)
            shutil.copyfile(adapter, os.path.join(d, step, "adapter_model.safetensors"))
            print(f"  {step}: {json.dumps(metrics)}")


# ---------------------------------------------------------------- tokenizer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_QWEN3_TOKENIZER_CONFIG = os.path.normpath(
    os.path.join(REPO_ROOT, "..", "shared", "fixtures", "tokenizer", "tokenizer_config.json")
)

# Qwen3's layout: the three ChatML specials first (ids 0, 1, 2 here), in the BPE vocabulary
# and as special added tokens; <think> and </think> are added tokens that are not special,
# after the learned vocabulary.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINK_TOKENS = ["<think>", "</think>"]
TOKENIZER_VOCAB = 500  # specials + 256 byte symbols + learned merges (think tokens come after)
EOS_TOKEN, PAD_TOKEN = "<|im_end|>", "<|endoftext|>"

# What the tiny BPE learns its merges from: English prose, chat-ish phrases, code, and
# some non-ASCII text and emoji (byte-level, so every byte is in the vocabulary anyway).
CORPUS = [
    """The lighthouse keeper wrote in her notebook every evening. She noted the wind, the
colour of the sea, and the ships that passed the point before the light was lit. On calm
nights the water was so still that the beam seemed to draw a line across it, and she would
count the seconds between each turn of the lamp.""",
    """A good answer is short, correct and kind. When you are not sure, say so, and explain
what you would check next. Please keep your reply focused on the question the user asked,
and give an example when an example makes the idea easier to follow.""",
    """You are a helpful assistant. The user asks a question; the assistant thinks about it
and then answers. A system message sets the tone of the whole conversation. The teacher
reads the same conversation, together with feedback that the user gave later, and uses
that hindsight to judge each token of the answer.""",
    """Feedback: the function works, but please add a docstring and a type hint. Feedback:
too long, keep it under twenty words. Feedback: good recursive solution, now try an
iterative one. Feedback: the explanation was clear and the example helped a lot.""",
    """def reverse_words(text: str) -> str:
    \"\"\"Return the words of text in reverse order.\"\"\"
    words = text.split()
    return " ".join(reversed(words))


def factorial(n: int) -> int:
    if n <= 1:
        return 1
    return n * factorial(n - 1)


for i in range(10):
    print(i, factorial(i), reverse_words("hello brave new world"))
""",
    """fn main() {
    let numbers: Vec<u32> = (1..=10).collect();
    let total: u32 = numbers.iter().map(|n| n * n).sum();
    println!("sum of squares = {total}");
}
""",
    """{"role": "user", "content": "What is the capital of Portugal?"}
{"role": "assistant", "content": "The capital of Portugal is Lisbon."}
{"learning_rate": 0.001, "alpha": 0.5, "steps": [1, 2, 3], "ok": true, "name": null}""",
    """Café, crème brûlée, naïve, résumé, déjà vu, façade, jalapeño, Zürich, São Paulo,
Kraków, Ελληνικά, русский текст, 日本語のテキスト, 中文文本, 한국어.
Emoji: 🙂 😀 🚀 🌊 ☕ ✨ 👍 — and a few symbols: € £ ¥ © ° ± × ÷ → ≤ ≥ ∞.
Très bien! C'est déjà l'été à Zürich 🙂 and the café is open 🚀.""",
    """Thinking step by step: first read the question, then list what is known, then
work out what is asked. 17 * 3 = 51 because 17 + 17 + 17 = 51. 12 squared is 144.
The octopus has eight arms and three hearts; a spider has eight legs; an ant has six.""",
]

# (name, messages, add_generation_prompt, template_kwargs). Messages have only role and
# content, as claas's `Message` has.
HINDSIGHT_HEADER = (
    "\n\n=== HINDSIGHT CONTEXT ===\n"
    "[The following is a future user message. Use this to guide your answer to the user prompt.]\n"
)
STUDENT_SYSTEM = "You are a careful assistant who explains things simply."


def _chat(*turns):
    return [{"role": r, "content": c} for r, c in turns]


TEMPLATE_CASES = [
    (
        "student_chat",
        _chat(("system", STUDENT_SYSTEM), ("user", "How many legs does a spider have?")),
        True,
        {},
    ),
    (
        "teacher_hindsight",
        _chat(
            ("system", STUDENT_SYSTEM),
            (
                "user",
                "Write a Python function that reverses the words of a sentence."
                + HINDSIGHT_HEADER
                + "Works, but please add a docstring and a type hint.",
            ),
        ),
        True,
        {},
    ),
    (
        "teacher_hindsight_empty_system",
        _chat(
            ("system", ""),
            ("user", "Summarise the story of the lighthouse keeper." + HINDSIGHT_HEADER + "Too long; keep it under twenty words."),
        ),
        True,
        {},
    ),
    (
        "no_thinking",
        _chat(("system", "Answer with one word only."), ("user", "What colour is a clear sky at noon?")),
        True,
        {"enable_thinking": False},
    ),
    ("user_only", _chat(("user", "Tell me one fact about octopuses.")), True, {}),
    (
        "multi_turn",
        _chat(
            ("system", STUDENT_SYSTEM),
            ("user", "Hi there"),
            ("assistant", "Hello! What would you like to talk about?"),
            ("user", "Recommend a book about the sea."),
        ),
        True,
        {},
    ),
    (
        # An earlier assistant turn with reasoning: the template drops the <think> block
        # of turns before the last user query (split on </think>, then lstrip).
        "multi_turn_with_think",
        _chat(
            ("system", STUDENT_SYSTEM),
            ("user", "What is 17 * 3?"),
            ("assistant", "<think>\n17 + 17 + 17 = 51, so the product is 51.\n</think>\n\n17 * 3 = 51."),
            ("user", "And 12 squared?"),
        ),
        True,
        {},
    ),
    (
        # The last turn is the assistant's, after the last user query: its reasoning is
        # kept, re-wrapped with the newlines stripped (strip / lstrip of "\n").
        "assistant_final_turn_with_think",
        _chat(
            ("system", "Think before you answer."),
            ("user", "Name a prime number larger than 10."),
            ("assistant", "<think>\n\nThe first one above 10 is 11.\n\n</think>\n\n\n11 is prime."),
        ),
        False,
        {},
    ),
    (
        "non_ascii_emoji",
        _chat(
            ("system", "Réponds en français, s'il te plaît."),
            ("user", "Où est le café ? ☕ Je suis très fatigué 🙂 — 日本語も少し。"),
        ),
        True,
        {},
    ),
]


def read_qwen3_chat_template(path):
    cfg = read_json(path)
    template = cfg.get("chat_template")
    if not isinstance(template, str):
        sys.exit(f"{path}: no chat_template string (give a Qwen3 tokenizer_config.json)")
    for needle in ("<|im_start|>", "<|im_end|>", "enable_thinking", "</think>", "last_query_index"):
        if needle not in template:
            sys.exit(f"{path}: the chat_template has no {needle!r}; is it Qwen3's?")
    return template


def train_tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # Byte-level as in Qwen's tokenizer.json, with the GPT-2 split (use_regex).
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        min_frequency=2,
        show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=True) for t in THINK_TOKENS])
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    return tok


def tokenizer_config(tok, chat_template):
    decoder = {}
    for t in SPECIAL_TOKENS + THINK_TOKENS:
        special = t in SPECIAL_TOKENS
        decoder[str(tok.token_to_id(t))] = {
            "content": t,
            "lstrip": False,
            "normalized": not special,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
    # PreTrainedTokenizerFast, not Qwen2Tokenizer: transformers 5's Qwen2Tokenizer swaps in
    # its own pre-tokenizer and would tokenize differently from tokenizer.json.
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "bos_token": None,
        "unk_token": None,
        "model_max_length": 4096,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "split_special_tokens": False,
        "added_tokens_decoder": decoder,
        "chat_template": chat_template,
    }


def load_hf_tokenizer(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir)


def render_case(hf, messages, add_generation_prompt, template_kwargs):
    text = hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **template_kwargs
    )
    return text, hf(text, add_special_tokens=False).input_ids


def write_utf8(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def write_tokenizer_fixture(out, qwen3_config_path):
    import tokenizers
    import transformers

    d = os.path.join(out, "tokenizer")
    chat_template = read_qwen3_chat_template(qwen3_config_path)  # before writing anything
    tok = train_tokenizer()
    write_utf8(os.path.join(d, "tokenizer.json"), tok.to_str(pretty=True) + "\n")
    cfg = tokenizer_config(tok, chat_template)
    write_utf8(os.path.join(d, "tokenizer_config.json"), json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    hf = load_hf_tokenizer(d)
    cases = []
    for name, messages, gen, kwargs in TEMPLATE_CASES:
        text, ids = render_case(hf, messages, gen, kwargs)
        assert tok.encode(text, add_special_tokens=False).ids == ids, name
        assert tok.decode(ids, skip_special_tokens=False) == text, name
        cases.append(
            {
                "name": name,
                "messages": messages,
                "add_generation_prompt": gen,
                "template_kwargs": kwargs,
                "text": text,
                "token_ids": ids,
            }
        )
        print(f"  {name}: {len(text)} chars, {len(ids)} tokens")
    doc = {
        "source": (
            f"scripts/make_golden.py: tokenizers {tokenizers.__version__} BPE trained on its CORPUS; "
            f"texts by transformers {transformers.__version__} apply_chat_template with Qwen3's chat template"
        ),
        "cases": cases,
    }
    write_utf8(os.path.join(d, "chat_template_cases.json"), json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    print(f"  tokenizer: {tok.get_vocab_size(with_added_tokens=True)} ids, eos {tok.token_to_id(EOS_TOKEN)}")


def check_tokenizer(tok_dir):
    """Re-renders and re-tokenizes every case of tok_dir/chat_template_cases.json with the
    folder's own tokenizer. Returns (ok, counts)."""
    from tokenizers import Tokenizer

    hf = load_hf_tokenizer(tok_dir)
    raw = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    counts = {"cases": 0, "text_mismatch": 0, "ids_mismatch": 0, "raw_ids_mismatch": 0}
    for c in read_json(os.path.join(tok_dir, "chat_template_cases.json"))["cases"]:
        text, ids = render_case(hf, c["messages"], c["add_generation_prompt"], c["template_kwargs"])
        raw_ids = raw.encode(text, add_special_tokens=False).ids
        counts["cases"] += 1
        bad = []
        if text != c["text"]:
            counts["text_mismatch"] += 1
            bad.append("TEXT DIFFERS")
        if ids != c["token_ids"]:
            counts["ids_mismatch"] += 1
            bad.append("IDS DIFFER")
        if raw_ids != ids:
            counts["raw_ids_mismatch"] += 1
            bad.append("RAW TOKENIZERS IDS DIFFER")
        print(f"  {c['name']}: {len(ids)} tokens -> {', '.join(bad) if bad else 'exact'}")
    ok = counts["cases"] > 0 and counts["text_mismatch"] == counts["ids_mismatch"] == counts["raw_ids_mismatch"] == 0
    return ok, counts


# ---------------------------------------------------------------- main

PARTS = ("sdpo_loss", "distill_step", "tokenizer")



def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="fixtures directory to write (sdpo_loss/, distill_step/, tokenizer/)")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--check", action="append", default=[], help="fixtures directory to re-run and compare")
    ap.add_argument(
        "--only",
        action="append",
        choices=PARTS,
        help="write / check only these parts (repeatable; default: all)",
    )
    ap.add_argument(
        "--qwen3-tokenizer-config",
        default=DEFAULT_QWEN3_TOKENIZER_CONFIG,
        metavar="PATH",
        help="a Qwen3 tokenizer_config.json whose chat_template the tokenizer fixture uses "
        f"(default {DEFAULT_QWEN3_TOKENIZER_CONFIG})",
    )
    args = ap.parse_args()
    if not args.out and not args.check:
        ap.error("give --out and/or --check")
    parts = args.only or list(PARTS)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    if args.out:
        print(f"writing {args.out} (seed {args.seed}): {', '.join(parts)}")
        if "sdpo_loss" in parts:
            cases = write_loss_cases(args.out, args.seed)
            for c in cases:
                e = c["expected"]
                print(f"  {c['name']}: " + ", ".join(f"{k} {e[k]:.6g}" for k in e if k != "grad_student_logits"))
        if "distill_step" in parts:
            write_distill(args.out, args.seed)
        if "tokenizer" in parts:
            print(f"  chat template from {args.qwen3_tokenizer_config}")
            write_tokenizer_fixture(args.out, args.qwen3_tokenizer_config)

    failed = False
    for d in args.check:
        if "sdpo_loss" in parts:
            print(f"checking {d}/sdpo_loss")
            ok, worst = check_loss_cases(os.path.join(d, "sdpo_loss", "cases.json"))
            print(f"  sdpo_loss max diffs: {worst} -> {'ok' if ok else 'OVER BOUND'}")
            failed |= not ok
        if "distill_step" in parts:
            print(f"checking {d}/distill_step")
            ok, worst = check_distill(os.path.join(d, "distill_step"))
            print(f"  distill_step max diffs: {worst} -> {'ok' if ok else 'OVER BOUND'}")
            failed |= not ok
        if "tokenizer" in parts:
            print(f"checking {d}/tokenizer")
            ok, counts = check_tokenizer(os.path.join(d, "tokenizer"))
            print(f"  tokenizer: {counts} -> {'ok' if ok else 'MISMATCH'}")
            failed |= not ok
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
