"""The real `tinker` SDK (0.38.0), unchanged, making CLaaS's calls against the fake Tinker.

Run by tinker/tests/python_sdk.rs with TINKER_BASE_URL pointing at a claas-fake-tinker and
TINKER_API_KEY=tml-...; argv[1] is the base model. The calls and their order follow
docs/tinker-wire.md §8 (CLaaS's engine.py and inference/tinker.py, with the async forms CLaaS
uses). Prints one `name: value` line per result for the Rust side to check; any failure
raises, so the exit status is the verdict.
"""

import asyncio
import math
import sys
import warnings

import tinker
from tinker import types

# CLaaS uses the SDK's `*_async` forms, which 0.38.0 marks deprecated.
warnings.simplefilter("ignore", FutureWarning)
warnings.simplefilter("ignore", DeprecationWarning)

PROMPT = [101, 102, 103, 104]
LEARNING_RATE = 1e-4


def datum(full, prompt_len, student_logprobs, advantages):
    """CLaaS's datum (engine.py:330-347): input full[:-1], targets full[1:], and
    importance-sampling inputs padded with zeros over the prompt."""
    pad = [0.0] * prompt_len
    return types.Datum(
        model_input=types.ModelInput.from_ints(full[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=full[1:], dtype="int64"),
            "logprobs": types.TensorData(data=(pad + student_logprobs)[1:], dtype="float32"),
            "advantages": types.TensorData(data=(pad + advantages)[1:], dtype="float32"),
        },
    )


def sampling_params():
    """CLaaS's sampling parameters (inference/tinker.py:189-202)."""
    return types.SamplingParams(
        max_tokens=64, temperature=0.7, top_p=1.0, top_k=0, seed=0, stop=["<|im_end|>"]
    )


async def main(base_model):
    service = tinker.ServiceClient()
    caps = await service.get_server_capabilities_async()
    names = [m.model_name for m in caps.supported_models]
    assert base_model in names, names
    print(f"capabilities: {names}")

    # engine.py:83-87: a LoRA training client, then its initial state.
    tc = await service.create_lora_training_client_async(base_model=base_model, rank=8)
    info = tc.get_info()
    assert info.lora_rank == 8 and info.model_data.model_name == base_model, info
    init = await (await tc.save_state_async("init")).result_async()
    assert init.path.startswith("tinker://") and init.path.endswith("/weights/init"), init.path
    print(f"init: {init.path}")

    # engine.py:187-194: each distill step loads the state and opens a teacher sampler.
    student = await service.create_training_client_from_state_async(init.path)
    teacher = await service.create_sampling_client_async(base_model=base_model)

    # inference/tinker.py:123-129: a sample with CLaaS's parameters.
    first = await asyncio.to_thread(sampler_sample, teacher)
    seq = first.sequences[0]
    assert seq.logprobs is not None and len(seq.logprobs) == len(seq.tokens) > 0, seq
    assert seq.stop_reason in ("stop", "length"), seq
    again = await asyncio.to_thread(sampler_sample, teacher)
    assert again.sequences[0].tokens == seq.tokens, "sampling is not deterministic"
    print(f"sample: {seq.tokens}")

    # The API's top_logprobs: the SDK reads the fake's top-k matrices (k per position,
    # best first).
    with_topk = await teacher.sample_async(
        types.ModelInput.from_ints(PROMPT),
        num_samples=1,
        sampling_params=sampling_params(),
        topk_sample_logprobs=3,
    )
    topk = with_topk.sequences[0].topk_logprobs
    assert topk is not None and len(topk) == len(with_topk.sequences[0].tokens), topk
    for row in topk:
        assert row is not None and len(row) == 3, row
        assert all(a[1] >= b[1] for a, b in zip(row, row[1:])), row
    print(f"topk: {topk[0]}")

    # engine.py:311: teacher log-probs of prompt + response.
    full = PROMPT + list(seq.tokens)
    teacher_lps = await teacher.compute_logprobs_async(types.ModelInput.from_ints(full))
    assert len(teacher_lps) == len(full) and teacher_lps[0] is None, teacher_lps
    assert all(lp is not None and lp < 0 for lp in teacher_lps[1:]), teacher_lps
    # The sampler's own log-probs are the same model's, so they agree.
    assert all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(teacher_lps[len(PROMPT):], seq.logprobs))
    print(f"compute_logprobs: {len(teacher_lps)}")

    # engine.py:208-213: forward_backward then optim_step, neither result awaited by CLaaS;
    # here the forward_backward result is read too, to check the protobuf round trip.
    advantages = [0.5] * len(seq.tokens)
    d = datum(full, len(PROMPT), list(seq.logprobs), advantages)
    fwd = await student.forward_backward_async([d], "importance_sampling")
    opt = await student.optim_step_async(
        types.AdamParams(learning_rate=LEARNING_RATE, beta1=0.9, beta2=0.95)
    )
    out = await fwd.result_async()
    assert "loss:sum" in out.metrics, out.metrics
    lps = out.loss_fn_outputs[0]["logprobs"].tolist()
    assert len(lps) == len(full) - 1, lps
    assert all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(lps, teacher_lps[1:]))
    print(f"forward_backward: loss:sum={out.metrics['loss:sum']:.6f}")
    await opt.result_async()

    # engine.py:218-223: save the state and the sampler weights.
    state = await (await student.save_state_async("step-1")).result_async()
    sampler_weights = await (await student.save_weights_for_sampler_async("step-1")).result_async()
    assert state.path.endswith("/weights/step-1"), state.path
    assert sampler_weights.path.endswith("/sampler_weights/step-1"), sampler_weights.path
    print(f"saved: {state.path} {sampler_weights.path}")

    # inference/tinker.py:107: /v1/sampler/refresh opens a sampler on the new weights.
    trained, trained_base = await asyncio.to_thread(
        refreshed_sampler, service, sampler_weights.path
    )
    assert trained_base == base_model, trained_base
    after = await asyncio.to_thread(sampler_sample, trained)
    assert after.sequences[0].tokens != seq.tokens, "training did not change the samples"
    print(f"trained sample: {after.sequences[0].tokens}")

    # engine.py:112-117: delete the old checkpoints through a REST client.
    rest = service.create_rest_client()
    for path in (init.path, state.path, sampler_weights.path):
        await rest.delete_checkpoint_from_tinker_path_async(path)
    print("deleted: 3")

    # A missing checkpoint is an error the SDK raises, not a hang.
    try:
        await rest.delete_checkpoint_from_tinker_path_async(init.path)
    except tinker.NotFoundError as e:
        print(f"delete again: {e.status_code}")
    else:
        raise AssertionError("deleting a deleted checkpoint succeeded")


def refreshed_sampler(service, path):
    """CLaaS's /v1/sampler/refresh (synchronous, run off the event loop as CLaaS runs it)."""
    sampler = service.create_sampling_client(model_path=path)
    return sampler, sampler.get_base_model()


def sampler_sample(sampler):
    """The synchronous form CLaaS's inference path uses (off the event loop)."""
    return sampler.sample(
        types.ModelInput.from_ints(PROMPT), num_samples=1, sampling_params=sampling_params()
    ).result()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
    print("ok")
