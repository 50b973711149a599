"""`flywheel sample {grpo,rejection,distill}`: generate scored rollouts into Redis / JSONL.

    flywheel sample grpo --endpoint.base-url http://127.0.0.1:8000/v1 --prompts.task chain_sum --sampling.n 8
    flywheel sample rejection --sampling.n 8 --keep best_k --k 2 --sft-output runs/sft.jsonl
    flywheel sample distill --endpoint.base-url http://teacher:8000/v1 --output runs/distill.jsonl

`flywheel sample` without a mode runs grpo. Every mode talks to the server only through the
OpenAI API; see sampler/run.py for concurrency, sampler/rewards for the reward terms.
"""

from __future__ import annotations

from flywheel.sampler.config import DistillConfig, GrpoSampleConfig, RejectionConfig
from flywheel.sampler.distill import run as run_distill
from flywheel.sampler.grpo import run as run_grpo
from flywheel.sampler.rejection import run as run_rejection

Config = GrpoSampleConfig
run = run_grpo

SUBCOMMANDS = {
    "grpo": (GrpoSampleConfig, run_grpo),
    "rejection": (RejectionConfig, run_rejection),
    "distill": (DistillConfig, run_distill),
}
