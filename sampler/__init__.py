"""sampler/: prompts -> scored rollouts -> Redis / JSONL.

record.py     RolloutRecord (the wire format; msgpack in Redis field `r`, JSONL)
queue.py      RolloutQueue / PromptQueue on Redis Streams (at-least-once, dead letters, backpressure, stats)
rewards/      scorer registry shared with the eval client (get_scorer, WeightedScorer)
prompts.py    prompt sources: reasoning-gym task, JSONL file, production capture stream
client.py     OpenAI-API calls with token ids, logprobs and policy versions
run.py        shared mode config, bounded-concurrency loop, progress and summary
grpo.py, rejection.py, distill.py   the `flywheel sample` modes (cli.py wires them)
"""
