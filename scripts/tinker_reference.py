#!/usr/bin/env python3
"""CLaaS's Tinker datum and advantage arithmetic, reimplemented in plain Python.

Follows `claas/training/engine/tinker/engine.py` (`_build_sample_datum`,
`_slice_completion_logprobs` and the metric averaging in `distill`; inventory §4.4) line by
line, so that worker/tests/tinker_reference.rs can check the Rust port
(`claas_worker::tinker::distill_datums`) against it: same inputs, same datums and
advantages to 1e-6.

Reads JSON on stdin:
    {"kl_coef": float,
     "samples": [{"prompt_ids": [int], "response_ids": [int],
                  "student_logprobs": [float],
                  "teacher_prompt_len": int,
                  "teacher_logprobs_full": [float | null]}]}
and writes JSON on stdout:
    {"datums": [{"model_input", "target_tokens", "logprobs", "advantages"}],
     "metrics": {"batch_size", "completion_len", "effective_kl_coef", "kl_gain",
                 "adv_mean", "adv_abs_mean", "kl_mean", "adv_abs_mean_raw"}}
The datum's float lists are rounded to float32, as `TensorData(dtype="float32")` sends them.

Standard library only.
"""

import json
import struct
import sys

# CLaaS's adaptive KL scaling constants (engine.py).
_TARGET_ADV_ABS_MEAN = 0.03
_MAX_KL_GAIN = 4.0


def f32(x):
    """`x` rounded to the nearest float32, as the wire carries it."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def zip_strict(a, b):
    """`zip(a, b, strict=True)`, for Pythons before 3.10 too."""
    if len(a) != len(b):
        raise ValueError("zip() arguments differ in length")
    return zip(a, b)


def slice_completion_logprobs(logprobs_full, prompt_len, completion_len):
    """engine.py `_slice_completion_logprobs`: the completion's part, None as 0.0."""
    raw = logprobs_full[prompt_len : prompt_len + completion_len]
    return [lp if lp is not None else 0.0 for lp in raw]


def build_sample_datum(sample, kl_coef):
    """engine.py `_build_sample_datum`, from the point the teacher has answered."""
    prompt_tokens = list(sample["prompt_ids"])
    response_tokens = list(sample["response_ids"])
    full_tokens = prompt_tokens + response_tokens
    prompt_len = len(prompt_tokens)
    completion_len = len(response_tokens)

    if len(sample["student_logprobs"]) != completion_len:
        raise ValueError("response_logprobs length != completion_len")
    # The rollout's log-probs arrive as float32.
    student_logprobs = [f32(x) for x in sample["student_logprobs"]]

    teacher_full = [None if x is None else f32(x) for x in sample["teacher_logprobs_full"]]
    teacher_logprobs = slice_completion_logprobs(
        teacher_full, sample["teacher_prompt_len"], completion_len
    )

    raw_kl_deltas = [t - s for s, t in zip_strict(student_logprobs, teacher_logprobs)]
    adv_abs_mean_raw = sum(abs(d) for d in raw_kl_deltas) / max(len(raw_kl_deltas), 1)

    gain = 1.0
    if adv_abs_mean_raw > 0:
        gain = min(max(_TARGET_ADV_ABS_MEAN / adv_abs_mean_raw, 1.0), _MAX_KL_GAIN)
    effective_kl_coef = kl_coef * gain

    advantages = [
        effective_kl_coef * (t - s) for s, t in zip_strict(student_logprobs, teacher_logprobs)
    ]

    input_tokens = full_tokens[:-1]
    target_tokens = full_tokens[1:]
    full_logprobs = [0.0] * prompt_len + student_logprobs
    full_advantages = [0.0] * prompt_len + advantages
    datum = {
        "model_input": input_tokens,
        "target_tokens": target_tokens,
        "logprobs": [f32(x) for x in full_logprobs[1:]],
        "advantages": [f32(x) for x in full_advantages[1:]],
    }

    metrics = {
        "completion_len": completion_len,
        "effective_kl_coef": effective_kl_coef,
        "kl_gain": gain,
        "adv_mean": sum(advantages) / max(len(advantages), 1),
        "adv_abs_mean": sum(abs(a) for a in advantages) / max(len(advantages), 1),
        "kl_mean": sum(raw_kl_deltas) / max(len(raw_kl_deltas), 1),
        "adv_abs_mean_raw": adv_abs_mean_raw,
    }
    return datum, metrics


def distill(payload):
    """engine.py `distill`'s per-batch part: datums in order, metrics averaged over samples."""
    results = [build_sample_datum(s, payload["kl_coef"]) for s in payload["samples"]]
    datums = [r[0] for r in results]
    sample_metrics = [r[1] for r in results]
    n = len(sample_metrics)

    def avg(key):
        return sum(m[key] for m in sample_metrics) / n

    metrics = {
        "batch_size": n,
        "completion_len": sum(m["completion_len"] for m in sample_metrics),
    }
    for key in ("effective_kl_coef", "kl_gain", "adv_mean", "adv_abs_mean", "kl_mean",
                "adv_abs_mean_raw"):
        metrics[key] = avg(key)
    return {"datums": datums, "metrics": metrics}


def main():
    json.dump(distill(json.load(sys.stdin)), sys.stdout)


if __name__ == "__main__":
    main()
