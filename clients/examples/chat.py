"""Chat with a Flywheel server (or any OpenAI-compatible endpoint) through the OpenAI SDK.

    python -m clients.examples.chat --base-url http://127.0.0.1:8000/v1 "What is 2 + 2?"

Flywheel replies carry the policy version that produced them in the `x-flywheel-policy-version`
header; `with_raw_response` exposes the headers next to the parsed reply.
"""

from __future__ import annotations

import argparse

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="OpenAI API base URL (ends in /v1)")
    parser.add_argument("--api-key", default="EMPTY", help="Bearer token (Flywheel's OpenAI routes accept any)")
    parser.add_argument("--model", default=None, help="Model name (default: the first the server lists)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("prompt", nargs="?", default="Write one sentence about flywheels.")
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = args.model or client.models.list().data[0].id
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": args.prompt}],
        max_tokens=args.max_tokens,
        temperature=0.7,
        seed=0,
    )
    reply = raw.parse()
    print(reply.choices[0].message.content)
    print(
        f"[model {reply.model}, {reply.usage.prompt_tokens} prompt + {reply.usage.completion_tokens} completion "
        "tokens, "
        f"finish {reply.choices[0].finish_reason}, policy version "
        f"{raw.headers.get('x-flywheel-policy-version', 'n/a')}]"
    )


if __name__ == "__main__":
    main()
