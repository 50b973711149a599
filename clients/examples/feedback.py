"""Rate a completion through the OpenAI SDK: POST /v1/feedback with the id the SDK returned.

    python -m flywheel.clients.examples.feedback --base-url http://127.0.0.1:8000/v1 --rating up "What is 2 + 2?"

The server must capture traffic (`flywheel serve --capture-redis-url redis://...`): feedback rates a
captured completion. Ask for token ids and logprobs (as below) and the rating can also train GRPO
(token in, token out); without them it still makes DPO pairs (`flywheel train dpo --from-feedback`).
A rating is "up", "down" or a number in the server's declared range (`feedback_scores`, default 1..5);
rating the same completion again replaces the first rating.
"""

from __future__ import annotations

import argparse

from openai import OpenAI


def rating(value: str) -> str | float:
    return value if value in ("up", "down") else float(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="OpenAI API base URL (ends in /v1)")
    parser.add_argument("--api-key", default="EMPTY", help="The server's API key (a production route: no admin token)")
    parser.add_argument("--model", default=None, help="Model name (default: the first the server lists)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rating", type=rating, default="up", help="up, down, or a score in the declared range")
    parser.add_argument("--comment", default=None, help="Free-text comment")
    parser.add_argument("--preferred", default=None, help="An answer you would have preferred")
    parser.add_argument("prompt", nargs="?", default="What is 2 + 2?")
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = args.model or client.models.list().data[0].id
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": args.prompt}],
        max_tokens=args.max_tokens,
        logprobs=True,  # the server's logprobs and token ids make the rating a GRPO reward
        extra_body={"return_token_ids": True},
    )
    print(reply.choices[0].message.content)
    body = {"id": reply.id, "rating": args.rating}
    if args.comment:
        body["comment"] = args.comment
    if args.preferred:
        body["preferred"] = args.preferred
    answer = client.post("/feedback", body=body, cast_to=object)
    print(
        f"[feedback on {answer['id']}: reward {answer['reward']:.3f}, "
        f"{'replaced an earlier rating' if answer['replaced'] else 'first rating'}]"
    )


if __name__ == "__main__":
    main()
