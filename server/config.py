"""ServeConfig: every setting of `flywheel serve`, typed and described (it is also the --help)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator


def default_data_dir() -> Path:
    return Path(os.environ.get("FLYWHEEL_HOME", Path.home() / ".cache" / "flywheel")) / "serve"


class ServeConfig(BaseModel):
    """Serve a model with vLLM's OpenAI server plus Flywheel's routes (status, policy version, weight push, capture)."""

    model: str = Field(
        default="smollm2-135m-instruct",
        description="Bundled model name (see `flywheel models`) or a path to an HF-format folder",
    )
    served_model_name: str | None = Field(
        default=None, description="Model name clients use in requests (default: the bundled name or the folder name)"
    )
    host: str = Field(default="127.0.0.1", description="Address to bind; loopback unless you mean to expose it")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port")
    data_dir: Path = Field(
        default_factory=default_data_dir,
        description=(
            "Folder for vLLM's compile cache, temp files, weight staging, the admin token and the last pushed "
            "version (a server restarted on the same folder serves it again)"
        ),
    )
    admin_token: str | None = Field(
        default=None,
        description="Bearer token for admin routes (weights, pause). Default: read or create <data-dir>/admin_token",
    )
    api_key: str | None = Field(
        default=None, description="If set, the OpenAI routes require `Authorization: Bearer <api-key>`"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description=(
            "Weights/activations dtype; auto = float32 on CPU (bf16 is ~5x slower there), the checkpoint's on GPU"
        ),
    )
    enforce_eager: bool | None = Field(
        default=None,
        description=(
            "Skip torch.compile and CUDA graphs. Default: on for CPU (starts in ~40 s instead of ~90 s), off on a "
            "GPU (eager decoding there measured ~0.15x of the compiled engine's throughput)"
        ),
    )
    kv_cache_gib: int = Field(
        default=1, ge=1, description="KV cache size on CPU in whole GiB (VLLM_CPU_KVCACHE_SPACE takes integers)"
    )
    gpu_memory_utilization: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description=(
            "Fraction of the GPU's memory this server may take for weights, activations and KV cache (GPU only). "
            "Default: vLLM's own (0.9), for a server alone on its GPU; with a learner on the same GPU set it (e.g. "
            "0.35) and the learner gets the rest"
        ),
    )
    max_model_len: int = Field(default=2048, gt=0, description="Maximum prompt + completion tokens per request")
    max_num_seqs: int | None = Field(
        default=None,
        gt=0,
        description=(
            "Maximum concurrently scheduled sequences. Default: 64 on CPU; vLLM's own on a GPU (a 256-way load "
            "otherwise queues)"
        ),
    )
    tensor_parallel_size: int = Field(default=1, ge=1, description="vLLM tensor parallel degree (GPU)")
    seed: int = Field(default=0, description="Engine seed (per-request `seed` still gives reproducible samples)")
    logprobs_mode: Literal["processed_logprobs", "raw_logprobs"] = Field(
        default="processed_logprobs",
        description=(
            "Logprobs returned to clients: processed = after temperature/top-p, what GRPO's importance ratio needs"
        ),
    )
    max_logprobs: int = Field(default=20, ge=0, description="Largest `top_logprobs` a request may ask for")
    enable_prefix_caching: bool = Field(
        default=True, description="Reuse KV of shared prompt prefixes (reset on every weight update)"
    )
    max_lora_rank: Literal[0, 1, 8, 16, 32, 64, 128, 256] = Field(
        default=0,
        description="Serve LoRA adapters up to this rank (vLLM --enable-lora; 0: off). A trainer with --lora-rank "
        "then pushes only its adapter (POST /flywheel/admin/adapter), served as --adapter-name beside the base model",
    )
    adapter_name: str = Field(
        default="policy",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="The OpenAI `model` name of the pushed adapter (one stable name; its version advances per push)",
    )
    weight_transports: list[Literal["shm", "http", "nccl", "ipc"]] | None = Field(
        default=None,
        description=(
            "Weight-push transports this server accepts: shm/http buckets (any device), and at most one of vLLM's "
            "GPU engines, nccl (a learner on other GPUs) or ipc (a learner on the same GPU). Default: shm and http "
            "on CPU; shm, http and ipc on a GPU"
        ),
    )
    weight_apply: Literal["staged", "layerwise"] = Field(
        default="staged",
        description=(
            "How a CPU server applies a push: staged = into staging tensors kept between pushes, one re-pack per "
            "layer (about 2x faster; costs one extra copy of the weights in RAM); layerwise = vLLM's in-place "
            "layerwise reload (one layer at a time). GPUs always use layerwise"
        ),
    )
    max_push_bytes: int = Field(default=64 * 2**30, gt=0, description="Largest total size of one weight push")
    max_bucket_bytes: int = Field(
        default=2 * 2**30, gt=0, description="Largest single bucket of a weight push over HTTP"
    )
    push_lock_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description=(
            "A weight push waits at most this long for the one before it to finish (503 after; nothing applied)"
        ),
    )
    max_request_bytes: int = Field(
        default=4 * 2**20,
        gt=0,
        description=(
            "Largest request body on the OpenAI routes (413 above it): bounds what one request can make the "
            "tokenizer chew (a 20 MB /tokenize string took 30 s of CPU). Weight buckets have their own limit"
        ),
    )
    capture_redis_url: str | None = Field(
        default=None, description="Capture production requests into this Redis (opt-in; off when unset)"
    )
    capture_stream: str = Field(default="prompts", description="Redis stream that captured prompts go to")
    capture_rate: float = Field(default=1.0, ge=0, le=1, description="Fraction of production requests captured")
    capture_redact: str | None = Field(
        default=None, description="Dotted path of a function(record) -> record | None that redacts or drops a capture"
    )
    feedback_ttl_s: int = Field(
        default=7 * 24 * 3600,
        ge=0,
        description=(
            "Seconds a captured completion can be rated through POST /v1/feedback (0: no feedback; needs capture)"
        ),
    )
    feedback_scores: tuple[float, float] = Field(
        default=(1.0, 5.0),
        description="The declared range (min, max) of numeric ratings on /v1/feedback; thumbs down/up are its ends",
    )
    dev_routes: bool = Field(
        default=False, description="Also expose vLLM's own dev/RL routes (collective_rpc, sleep, ...), admin-only"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="Uvicorn log level")
    access_log: bool = Field(default=False, description="Log every HTTP request")
    vllm_args: list[str] = Field(
        default_factory=list,
        description="Extra raw vLLM engine/server flags, e.g. --vllm-args=--swap-space=0 (advanced)",
    )

    @field_validator("feedback_scores")
    @classmethod
    def _score_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not value[0] < value[1]:
            raise ValueError(f"feedback_scores needs min < max, got {value}")
        return value

    @field_validator("weight_transports")
    @classmethod
    def _one_gpu_engine(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None  # the device's default, filled in by for_device()
        if not value:
            raise ValueError("at least one weight transport is needed")
        if {"nccl", "ipc"} <= set(value):
            raise ValueError("choose nccl or ipc, not both: vLLM holds one weight-transfer engine per worker")
        return list(dict.fromkeys(value))

    def for_device(self, cpu: bool) -> ServeConfig:
        """These settings with the device-dependent defaults filled in: what the server runs with."""
        defaults = {
            "enforce_eager": cpu,
            "max_num_seqs": 64 if cpu else None,
            "weight_transports": ["shm", "http"] if cpu else ["shm", "http", "ipc"],
        }
        return self.model_copy(update={k: v for k, v in defaults.items() if getattr(self, k) is None})

    def weight_transfer_backend(self) -> str:
        """The vLLM weight-transfer backend (--weight-transfer-config) that serves these transports.

        "flywheel" reads shm/http buckets; "flywheel_nccl" / "flywheel_ipc" are vLLM's NCCL / CUDA-IPC
        engines with Flywheel's bucket path and post-load fix-ups added (server/weights/worker_gpu.py).
        """
        gpu = [t for t in self.weight_transports or [] if t in ("nccl", "ipc")]
        return f"flywheel_{gpu[0]}" if gpu else "flywheel"

    def weight_workers(self) -> int:
        """Inference workers that receive a push: the NCCL group is 1 trainer rank + these."""
        return self.tensor_parallel_size
