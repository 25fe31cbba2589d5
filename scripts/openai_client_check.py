"""The python `openai` client, unchanged, against the claas proxy.

Usage: python openai_client_check.py BASE_URL MODEL  (BASE_URL ends in /v1)
Prints what it was shown; exits non-zero when the client cannot use an answer.
"""

import sys

import openai


def main() -> None:
    base_url, model = sys.argv[1], sys.argv[2]
    client = openai.OpenAI(base_url=base_url, api_key="unused")
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say hi"},
    ]

    chat = client.chat.completions.create(model=model, messages=messages)
    assert chat.choices[0].finish_reason == "stop", chat
    assert chat.usage is not None and chat.usage.completion_tokens > 0, chat
    print(f"chat: {chat.choices[0].message.content}")

    with_lp = client.chat.completions.create(
        model=model, messages=messages, logprobs=True, top_logprobs=2
    )
    entries = with_lp.choices[0].logprobs.content
    assert entries and all(len(e.top_logprobs) == 2 for e in entries), with_lp
    print(f"logprobs: {len(entries)} tokens")

    parts = []
    for chunk in client.chat.completions.create(
        model=model, messages=messages, stream=True
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    print(f"stream: {''.join(parts)}")

    models = client.models.list()
    assert any(m.id == model for m in models.data), models
    print(f"models: {[m.id for m in models.data]}")

    text = client.completions.create(model=model, prompt="Hello", max_tokens=3)
    print(f"completion: {text.choices[0].text!r}")

    try:
        client.chat.completions.create(model="no-such-model", messages=messages)
    except openai.NotFoundError as e:
        print(f"unknown model: {e.status_code}")
    else:
        raise SystemExit("an unknown model was answered")


if __name__ == "__main__":
    main()
