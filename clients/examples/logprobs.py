"""Per-token log-probabilities through the OpenAI SDK: of the generated tokens (chat) and of the
prompt itself (completions with echo), the two things an RL loop and a log-likelihood eval need.

    python -m clients.examples.logprobs --base-url http://127.0.0.1:8000/v1 "The capital of France is"
"""

from __future__ import annotations

import argparse

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="OpenAI API base URL (ends in /v1)")
    parser.add_argument("--api-key", default="EMPTY")
    parser.add_argument("--model", default=None, help="Model name (default: the first the server lists)")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--top-logprobs", type=int, default=3)
    parser.add_argument("prompt", nargs="?", default="The capital of France is")
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = args.model or client.models.list().data[0].id

    print("generated tokens (chat, top alternatives):")
    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": args.prompt}],
        max_tokens=args.max_tokens,
        temperature=0,
        logprobs=True,
        top_logprobs=args.top_logprobs,
    )
    for t in chat.choices[0].logprobs.content:
        alts = ", ".join(f"{a.token!r} {a.logprob:.2f}" for a in t.top_logprobs)
        print(f"  {t.token!r:>16} {t.logprob:8.3f}   [{alts}]")

    print("prompt tokens (completions, echo=True):")
    comp = client.completions.create(
        model=model, prompt=args.prompt, max_tokens=1, temperature=0, echo=True, logprobs=1
    )
    lp = comp.choices[0].logprobs
    for token, value, offset in zip(lp.tokens, lp.token_logprobs, lp.text_offset):
        shown = "   (first token: no logprob)" if value is None else f"{value:8.3f}"
        print(f"  @{offset:<4} {token!r:>16} {shown}")
    scored = [v for v, o in zip(lp.token_logprobs, lp.text_offset) if v is not None and o < len(args.prompt)]
    print(f"log-likelihood of the prompt after its first token: {sum(scored):.3f}")


if __name__ == "__main__":
    main()
