"""Stream a chat reply token by token through the OpenAI SDK, with the usage at the end.

python -m clients.examples.streaming --base-url http://127.0.0.1:8000/v1 "Count to five."
"""

from __future__ import annotations

import argparse
import sys
import time

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="OpenAI API base URL (ends in /v1)")
    parser.add_argument("--api-key", default="EMPTY")
    parser.add_argument("--model", default=None, help="Model name (default: the first the server lists)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("prompt", nargs="?", default="Count to five.")
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = args.model or client.models.list().data[0].id
    start, first, chunks, usage = time.perf_counter(), None, 0, None
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": args.prompt}],
        max_tokens=args.max_tokens,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:  # the last chunk: no choices, just the token counts
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:  # the first chunk carries only the role, with empty content
                first = first or time.perf_counter()
                chunks += 1
                sys.stdout.write(choice.delta.content)
                sys.stdout.flush()
    total = time.perf_counter() - start
    print()
    print(
        f"[{chunks} chunks, {usage.completion_tokens if usage else '?'} completion tokens, "
        f"first token after {1000 * ((first or start) - start):.0f} ms, {1000 * total:.0f} ms in all]"
    )


if __name__ == "__main__":
    main()
