"""TrainConfig: every setting of `flywheel train`, shared by both backends."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from flywheel.sampler.config import QueueConfig
from flywheel.trainer.policy_interface import LORA_TARGETS, LoraConfig, ParallelConfig, PolicyConfig


class QueueInput(BaseModel):
    """How the trainer reads the rollout queue (sampler/queue.py's RolloutQueue)."""

    consumer: str = Field(
        default="trainer-0",
        description="Consumer name inside the group (stable across restarts so pending entries come back)",
    )
    block_s: float = Field(default=2.0, ge=0, description="How long one read waits for new records")
    max_wait_s: float = Field(
        default=600.0, gt=0, description="Error out when a step's batch is still incomplete after this long"
    )


class GrpoLossConfig(BaseModel):
    """GRPO objective settings."""

    clip_low: float = Field(default=0.2, ge=0, description="Lower clip range: ratio >= 1 - clip_low")
    clip_high: float = Field(
        default=0.28, ge=0, description="Upper clip range: ratio <= 1 + clip_high (DAPO clip-higher)"
    )
    aggregation: Literal["token-mean", "seq-mean", "dr-grpo"] = Field(
        default="token-mean",
        description="Loss aggregation: token-mean (DAPO), seq-mean (GRPO), dr-grpo (sum / constant)",
    )
    dr_grpo_constant: int = Field(
        default=1024, gt=0, description="Dr.GRPO normaliser C (tokens), typically the max completion length"
    )
    scale_by_std: bool = Field(
        default=True, description="Divide advantages by the group std (False: Dr.GRPO, mean-centred only)"
    )
    kl_coef: float = Field(
        default=0.0, ge=0, description="Weight of the k3 KL to the frozen reference (0: no reference model)"
    )
    loss: Literal["grpo", "gspo", "cispo"] = Field(
        default="grpo",
        description=(
            "Policy loss: grpo (token-level PPO clip on each token's ratio), gspo (GSPO: one length-normalised "
            "ratio per sequence, clipped with gspo_clip_low/high), cispo (CISPO: the IS weight is clipped at "
            "1 + cispo_clip_high and detached, so every token keeps its gradient). grpo by default: the loss "
            "flywheel has always trained with, and the one its loop tests measured"
        ),
    )
    gspo_clip_low: float = Field(
        default=3e-4,
        ge=0,
        description=(
            "GSPO lower clip: sequence ratio >= 1 - gspo_clip_low. 3e-4 is the GSPO paper's value: a "
            "length-normalised ratio moves ~100x less than a token's, so PPO's 0.2 would never clip"
        ),
    )
    gspo_clip_high: float = Field(
        default=4e-4, ge=0, description="GSPO upper clip: sequence ratio <= 1 + gspo_clip_high (4e-4, the GSPO paper's)"
    )
    cispo_clip_high: float = Field(
        default=4.0,
        gt=0,
        description=(
            "CISPO weight cap: w = min(ratio, 1 + cispo_clip_high), no lower bound (as in MiniMax-M1). 4.0 lets "
            "the rare tokens that PPO's 0.28 would zero keep a gradient while one token's weight stays bounded by 5"
        ),
    )
    tis_cap: float | None = Field(
        default=2.0,
        gt=0,
        description=(
            "Token-level truncated IS: weight each token by min(p_learner/p_server, tis_cap) and anchor the ratio "
            "at the learner's own pre-step logprobs. 2.0 (on by default; Yao et al. 2025's C=2, as `flywheel up` "
            "used): bounds the variance that the server/learner mismatch and stale rollouts add at the cost of a "
            "small bias, and never fires on-policy (weights ~1). None: ratio against the server's logprobs, no "
            "correction"
        ),
    )
    seq_is_cap: float | None = Field(
        default=None,
        gt=0,
        description=(
            "Sequence-level truncated IS (MIS): weight every token of a completion by "
            "min(prod_t p_learner/p_server, seq_is_cap); unbiased at the sequence level, which token TIS is not. "
            "Off by default: the product's variance grows with length, so at 100+ tokens a few sequences carry "
            "the batch; an alternative to tis_cap (set one)"
        ),
    )
    token_mask_k: float | None = Field(
        default=8.0,
        gt=1,
        description=(
            "IcePop-style token masking: drop tokens whose p_learner/p_server is outside [1/k, k] from the loss. "
            "8 (prime-rl's token_mask_low/high 0.125/8): only tokens whose two probabilities disagree 8x, i.e. "
            "kernel or precision failures, not sampling noise; TIS alone would still train on them with weight "
            "up to tis_cap. None: off"
        ),
    )
    geo_mask_k: float | None = Field(
        default=None,
        gt=1,
        description=(
            "Geometric-mean sequence masking: drop a whole completion when exp(mean_t log(p_learner/p_server)) is "
            "outside [1/k, k] (length-normalised, so long completions are not masked for length alone). Off by "
            "default: it throws away whole rollouts; turn it on (e.g. 1.5) when mismatch_kl per lag shows a few "
            "far-off sequences"
        ),
    )
    overlong: Literal["keep", "filter", "penalty"] = Field(
        default="keep",
        description=(
            "Completions cut at max_tokens (finish_reason 'length'): keep trains them like any other; filter "
            "leaves them out of the step and of their group's advantages (DAPO's overlong filtering), counted as "
            "dropped_overlong; penalty adds DAPO's soft overlong punishment to every completion's reward before "
            "the advantages: 0 up to max_tokens - overlong_buffer, then linear to -overlong_penalty at max_tokens "
            "(trainer/rollout_selection.py; counted as overlong_penalised). Keep by default: filtering hides a "
            "policy that rambles and a short max_tokens filters most of a batch, and a penalty changes the task's "
            "reward, which is the user's call"
        ),
    )
    overlong_buffer: int | None = Field(
        default=None,
        ge=0,
        description=(
            "overlong=penalty: the last tokens before the record's max_tokens over which the penalty ramps up. "
            "None: a fifth of max_tokens (DAPO's 4096 of 20480), wide enough that the penalty is a slope the "
            "policy can follow rather than a cliff at the limit; 0: the whole penalty at max_tokens only"
        ),
    )
    overlong_penalty: float = Field(
        default=1.0,
        ge=0,
        description=(
            "overlong=penalty: the punishment at max_tokens (subtracted from the reward). 1.0 as in DAPO, whose "
            "rewards are +-1: as large as the gap between a right and a wrong answer, so rambling cannot pay"
        ),
    )
    dynamic_sampling: bool = Field(
        default=False,
        description=(
            "DAPO's dynamic sampling at the learner: after the stale and overlong rules, drop every group whose "
            "rewards are all equal (or with one member left: zero advantage, no signal) and read on from the "
            "queue until batch_size trainable completions are in hand (files: such groups leave the pool); counted "
            "per step as dynamic_dropped_groups/_rollouts and acked with the step. Off by default because the "
            "sampler already drops groups that are uniform as sampled (drop_uniform_groups, before they use queue "
            "space), and a sync round's exact record count would leave the learner waiting for records that never "
            "come; turn it on with overlong=filter/penalty or a tight max_staleness, which make groups uniform only "
            "at the learner. Needs group_size with the queue"
        ),
    )
    temperature: float = Field(
        default=1.0,
        gt=0,
        description="Sampling temperature of the rollouts (logprobs are taken from logits / temperature)",
    )
    group_size: int = Field(
        default=0,
        ge=0,
        description="Completions per prompt; with the queue, a step waits for whole groups (0: take what arrives)",
    )

    @model_validator(mode="after")
    def _one_importance_weight(self) -> GrpoLossConfig:
        if self.tis_cap is not None and self.seq_is_cap is not None:
            raise ValueError(
                "tis_cap (token-level TIS) and seq_is_cap (sequence-level IS) are alternatives: set one to null"
            )
        return self

    @property
    def corrects(self) -> bool:
        """Whether any off-policy correction is on (then the ratio anchors at the learner's pre-step logprobs)."""
        return any(v is not None for v in (self.tis_cap, self.seq_is_cap, self.token_mask_k, self.geo_mask_k))

    def clip_range(self) -> tuple[float, float]:
        """(clip_low, clip_high) of the chosen loss."""
        if self.loss == "gspo":
            return self.gspo_clip_low, self.gspo_clip_high
        if self.loss == "cispo":
            return 0.0, self.cispo_clip_high
        return self.clip_low, self.clip_high


class DPOConfig(BaseModel):
    """DPO objective settings."""

    beta: float = Field(default=0.1, gt=0, description="DPO temperature beta on the log-ratio margin")


class TrainConfig(BaseModel):
    """Train a causal LM with CPT, SFT, DPO or GRPO on files or the rollout queue."""

    objective: Literal["cpt", "sft", "dpo", "grpo"] = Field(default="sft", description="Training objective")
    backend: Literal["transformers", "megatron"] = Field(default="transformers", description="Model implementation")
    model: str = Field(
        default="tiny-qwen3",
        description="Starting HF folder or bundled model name (tiny-qwen3, smollm2-135m-instruct, ...)",
    )
    data: list[str] = Field(
        default_factory=list, description="Training files (JSONL of the objective's shape, or .txt for cpt)"
    )
    queue: QueueConfig | None = Field(
        default=None, description="Rollout queue (grpo): set --queue.url to train from Redis instead of files"
    )
    from_feedback: str | None = Field(
        default=None,
        description="Redis URL of a server's capture: train on its user feedback (POST /v1/feedback); "
        "dpo on the preference pairs, grpo on the rated completions",
    )
    feedback_stream: str = Field(
        default="prompts",
        description="Capture stream whose feedback --from-feedback reads (the server's capture_stream)",
    )
    queue_input: QueueInput = Field(default_factory=QueueInput, description="Trainer-side queue reading settings")
    run_dir: Path = Field(
        default=Path("runs/train"), description="Where checkpoints, metrics.jsonl and TensorBoard events go"
    )
    seed: int = Field(default=0, description="Seed for data order and torch RNG")
    resume: bool = Field(default=False, description="Continue from the latest checkpoint in run_dir")

    lr: float = Field(default=1e-5, gt=0, description="Peak learning rate (AdamW)")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay")
    betas: tuple[float, float] = Field(default=(0.9, 0.95), description="AdamW betas")
    warmup_steps: int = Field(default=0, ge=0, description="Linear warmup steps from 0 to lr")
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1, description="Cosine decays to lr * min_lr_ratio at max_steps")
    max_steps: int = Field(
        default=100, gt=0, description="Optimizer steps of the whole run (the LR schedule spans them)"
    )
    stop_after: int | None = Field(
        default=None,
        gt=0,
        description=(
            "Checkpoint and stop after this many steps of this invocation (time-boxed jobs; continue with --resume)"
        ),
    )
    batch_size: int = Field(default=8, gt=0, description="Samples per optimizer step (DPO: pairs; GRPO: completions)")
    micro_batch_tokens: int = Field(
        default=4096,
        gt=0,
        description=(
            "Token budget of one forward/backward; a step accumulates gradients over as many micro-batches as its "
            "samples need"
        ),
    )
    max_seq_len: int = Field(default=1024, gt=1, description="Longer samples are truncated (CPT documents are chunked)")
    pack: bool = Field(
        default=True,
        description="Pack samples of a micro-batch into one row (document boundaries kept); False: one padded row each",
    )
    grad_clip: float = Field(default=1.0, gt=0, description="Clip the global gradient norm to this value")
    bf16: bool = Field(default=False, description="bfloat16 weights/compute (use fp32 on CPU)")
    gradient_checkpointing: bool = Field(default=False, description="Recompute activations in backward to save memory")
    compile: bool = Field(
        default=False,
        description="torch.compile every transformer layer (both backends); "
        "megatron on an H200: 1.5-1.9x faster steps (bench/results/train_speed.json)",
    )
    parallel: ParallelConfig = Field(
        default_factory=ParallelConfig, description="Model-parallel degrees (megatron backend)"
    )

    save_every: int = Field(default=50, ge=0, description="Checkpoint every N steps (0: only at the end)")
    lora_rank: int = Field(
        default=0,
        ge=0,
        le=256,
        description="Train a LoRA adapter of this rank instead of every weight (0: full fine-tune; transformers "
        "backend only). Checkpoints hold the merged weights (they serve and restore like a full model) and adapter/",
    )
    lora_alpha: float | None = Field(
        default=None, gt=0, description="LoRA scale numerator (update = alpha / rank * B @ A); default 2 x rank"
    )
    lora_targets: list[str] = Field(
        default_factory=lambda: list(LORA_TARGETS),
        min_length=1,
        description="Modules that get an adapter (attention and MLP projections by default)",
    )
    keep_checkpoints: int = Field(default=2, ge=1, description="How many step checkpoints to keep in run_dir")
    log_every: int = Field(default=1, gt=0, description="Write metrics every N steps")
    push_every: int = Field(default=0, ge=0, description="Push weights to the server every K steps (0: never)")
    push_url: str | None = Field(
        default=None, description="Server base URL for weight pushes (None: pushing is a no-op)"
    )
    push_transport: Literal["auto", "shm", "http", "ipc", "adapter"] = Field(
        default="auto",
        description=(
            "How pushed weights travel: ipc hands the server CUDA-IPC handles of the learner's own GPU tensors (no "
            "copy through the host; the learner and the server share the GPU); shm writes safetensors buckets to "
            "/dev/shm (a server on this host); http streams them. auto: ipc when the weights are on a GPU and the "
            "server (on this host) offers it, else shm on this host, else http. adapter (a --lora-rank run and a "
            "server on this host started with --max-lora-rank): only the LoRA adapter, served as its --adapter-name"
        ),
    )
    push_retries: int = Field(
        default=5,
        ge=0,
        description=(
            "A push that fails on the way (server restarting, 5xx, timeout) is retried this many times with "
            "exponential backoff, then skipped (the run goes on)"
        ),
    )
    push_backoff_s: float = Field(
        default=1.0, gt=0, description="First retry delay of a failed push, doubled each retry (at most 30 s)"
    )
    admin_token: str | None = Field(default=None, description="Admin token of the server's weight routes")
    max_staleness: int = Field(
        default=4,
        ge=0,
        description="Drop rollouts whose policy_version is more than this many versions behind the last push",
    )

    grpo: GrpoLossConfig = Field(default_factory=GrpoLossConfig, description="GRPO settings")
    dpo: DPOConfig = Field(default_factory=DPOConfig, description="DPO settings")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.queue is None and not self.data and self.from_feedback is None:
            raise ValueError("give training files (--data), a rollout queue (--queue.url) or --from-feedback")
        if self.from_feedback is not None and self.objective not in ("dpo", "grpo"):
            raise ValueError("--from-feedback feeds the dpo and grpo objectives only")
        if self.queue is not None and self.objective != "grpo":
            raise ValueError("the rollout queue feeds the grpo objective only")
        if self.queue is not None and self.grpo.dynamic_sampling and self.grpo.group_size == 0:
            raise ValueError("grpo.dynamic_sampling with the queue judges whole groups: set grpo.group_size")
        if self.micro_batch_tokens < self.max_seq_len:
            raise ValueError(
                f"micro_batch_tokens ({self.micro_batch_tokens}) must be >= max_seq_len ({self.max_seq_len})"
            )
        return self

    def policy_config(self, model: str | Path | None = None) -> PolicyConfig:
        """The policy to build: from `model` (a checkpoint to resume) or the starting model. A LoRA run
        always builds on the starting model and resumes the checkpoint's adapter/ on top of it (the
        checkpoint's own weights are the merged ones: building on them would apply the adapter twice)."""
        lora = None
        adapter = None
        if self.lora_rank:
            lora = LoraConfig(rank=self.lora_rank, alpha=self.lora_alpha, targets=self.lora_targets)
            adapter = str(Path(model) / "adapter") if model is not None else None
            model = None
        return PolicyConfig(
            lora=lora,
            adapter=adapter,
            backend=self.backend,
            model=str(model or self.model),
            bf16=self.bf16,
            gradient_checkpointing=self.gradient_checkpointing,
            compile=self.compile,
            parallel=self.parallel,
            seed=self.seed,
        )
