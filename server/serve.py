"""`flywheel serve`: vLLM's own OpenAI server, with Flywheel's routes and middleware on the same app.

We do not re-implement the OpenAI API: we build vLLM's argument namespace from ServeConfig, let
vLLM's launcher build its app and engine, and hook its `build_app` to mount our middleware and
routes before it starts serving, and hook its `init_app_state` to serve the last published version
again before the first request (server/weights/restore.py). vLLM owns signals and shutdown (SIGTERM/SIGINT stop uvicorn,
then the engine-core process), so nothing is left running.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sys
import tempfile
from pathlib import Path

from flywheel.server.config import ServeConfig
from flywheel.server.errors import UserError
from flywheel.server.models import OFFLINE_ENV, resolve_model

Config = ServeConfig

WORKER_EXTENSION = "flywheel.server.weights.worker.WeightUpdateExtension"
# The vLLM release this code is written against (its OpenAI server internals, RL routes and
# weight-transfer engines change between minor releases): the `cpu` and `gpu` extras pin it.
SUPPORTED_VLLM = (0, 32)


def check_vllm_version(version: str) -> None:
    """Refuse, with what to do, a vLLM outside the supported minor release."""
    try:
        found = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        found = None
    if found != SUPPORTED_VLLM:
        want = ".".join(map(str, SUPPORTED_VLLM))
        raise UserError(
            f"vLLM {version} is installed, but Flywheel supports vLLM {want}.x only; "
            f"install it with `pip install 'flywheel[gpu]'` (GPU) or `pip install 'flywheel[cpu]'` (CPU)"
        )


def on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def admin_token_for(config: ServeConfig) -> str:
    """The configured token, or the one stored in <data_dir>/admin_token (created once, mode 600)."""
    if config.admin_token:
        return config.admin_token
    path = config.data_dir / "admin_token"
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return token


def engine_environment(config: ServeConfig, cpu: bool) -> dict[str, str]:
    """Environment for vLLM and the processes it starts: offline, caches and sockets inside data_dir."""
    data = config.data_dir.resolve()
    env = dict(OFFLINE_ENV)
    env["VLLM_CACHE_ROOT"] = str(data / "vllm-cache")
    # vLLM puts its ZMQ IPC sockets in TMPDIR, and a unix socket path must stay under ~100 bytes.
    tmp = data / "tmp"
    if len(str(tmp)) > 60:
        tmp = Path(tempfile.gettempdir()) / f"flywheel-{hashlib.sha1(str(data).encode()).hexdigest()[:10]}"
    env["TMPDIR"] = str(tmp)
    env["VLLM_NO_USAGE_STATS"] = "1"
    env["DO_NOT_TRACK"] = "1"
    if cpu:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(config.kv_cache_gib)
    if config.dev_routes:
        env["VLLM_SERVER_DEV_MODE"] = "1"
    env["FLYWHEEL_WEIGHT_APPLY"] = config.weight_apply  # read by server/weights/worker.py
    return env


def vllm_argv(config: ServeConfig, model_path: Path, served_name: str, cpu: bool) -> list[str]:
    config = config.for_device(cpu)
    if cpu and config.weight_transfer_backend() != "flywheel":
        raise ValueError(
            f"weight transports {config.weight_transports}: nccl and ipc are vLLM's GPU engines "
            f"and need a CUDA device; on CPU use shm and http"
        )
    dtype = "float32" if (config.dtype == "auto" and cpu) else config.dtype
    argv = [
        "--model",
        str(model_path),
        "--served-model-name",
        served_name,
        "--host",
        config.host,
        "--port",
        str(config.port),
        "--dtype",
        dtype,
        "--max-model-len",
        str(config.max_model_len),
        "--seed",
        str(config.seed),
        "--logprobs-mode",
        config.logprobs_mode,
        "--max-logprobs",
        str(config.max_logprobs),
        "--tensor-parallel-size",
        str(config.tensor_parallel_size),
        "--uvicorn-log-level",
        config.log_level,
        "--generation-config",
        "vllm",  # sampling defaults come from the request, not the checkpoint
        "--worker-extension-cls",
        WORKER_EXTENSION,  # importing it registers Flywheel's backends
        "--weight-transfer-config",
        json.dumps({"backend": config.weight_transfer_backend()}),
    ]
    argv.append("--enable-prefix-caching" if config.enable_prefix_caching else "--no-enable-prefix-caching")
    if config.enforce_eager:
        argv.append("--enforce-eager")
    if not config.access_log:
        argv.append("--disable-uvicorn-access-log")
    if config.max_num_seqs is not None:
        argv += ["--max-num-seqs", str(config.max_num_seqs)]
    if config.max_lora_rank:  # one adapter slot: the pushed adapter replaces itself in place
        argv += ["--enable-lora", "--max-lora-rank", str(config.max_lora_rank), "--max-loras", "1"]
    if not cpu and config.gpu_memory_utilization is not None:
        argv += ["--gpu-memory-utilization", str(config.gpu_memory_utilization)]
    return argv + list(config.vllm_args)


def feedback_on(config: ServeConfig) -> bool:
    """POST /v1/feedback rates captured completions: it needs capture and a link lifetime."""
    return bool(config.capture_redis_url) and config.feedback_ttl_s > 0


def install(app, config: ServeConfig, model_path: Path, served_name: str, admin_token: str) -> None:
    """Mount Flywheel's state, routes and middleware on vLLM's FastAPI app."""
    from flywheel.server.feedback import FeedbackStore
    from flywheel.server.feedback import router as feedback_router
    from flywheel.server.middleware import FlywheelMiddleware
    from flywheel.server.policy import PolicyState
    from flywheel.server.routes import router
    from flywheel.server.weights.adapter import router as adapter_router
    from flywheel.server.weights.routes import router as weights_router

    policy = PolicyState(model=str(model_path), served_model_name=served_name)
    app.state.flywheel_policy = policy
    app.state.flywheel_config = config
    app.state.flywheel_settings = {
        "capture": {
            "enabled": bool(config.capture_redis_url),
            "stream": config.capture_stream,
            "rate": config.capture_rate,
            "redact": config.capture_redact,
            "feedback": feedback_on(config),
            "feedback_scores": list(config.feedback_scores),
        },
        "weights": {
            "transports": list(config.weight_transports),
            "max_push_bytes": config.max_push_bytes,
            "max_bucket_bytes": config.max_bucket_bytes,
            "backend": config.weight_transfer_backend(),
            "workers": config.weight_workers(),
        },
        "api_key_required": bool(config.api_key),
    }
    app.include_router(router)
    app.include_router(weights_router)
    app.include_router(adapter_router)
    app.include_router(feedback_router)
    app.state.flywheel_feedback = (
        FeedbackStore(config.capture_redis_url, config.capture_stream, config.feedback_scores)
        if feedback_on(config)
        else None
    )
    # vLLM's SageMaker bootstrap builds the middleware stack early; Starlette rebuilds it lazily
    # on the first request if we drop it, now including ours.
    app.middleware_stack = None
    if config.capture_redis_url:
        from flywheel.server.capture import CaptureMiddleware

        app.add_middleware(
            CaptureMiddleware,
            redis_url=config.capture_redis_url,
            stream=config.capture_stream,
            rate=config.capture_rate,
            redact=config.capture_redact,
            policy=policy,
            link_ttl_s=config.feedback_ttl_s,
        )
    # added last = outermost: auth runs before anything else, stamping sees the final response
    app.add_middleware(
        FlywheelMiddleware,
        policy=policy,
        admin_token=admin_token,
        api_key=config.api_key,
        max_request_bytes=config.max_request_bytes,
    )


def run(config: ServeConfig) -> int:
    try:
        model_path = resolve_model(config.model)
    except FileNotFoundError as exc:
        raise UserError(f"{exc}") from None
    served_name = config.served_model_name or (config.model if "/" not in config.model else model_path.name)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    cpu = on_cpu()
    config = config.for_device(cpu)  # what runs (and what /flywheel/status reports)
    env = engine_environment(config, cpu)
    for key in ("VLLM_CACHE_ROOT", "TMPDIR"):
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    os.environ.update(env)
    admin_token = admin_token_for(config)

    import uvloop
    import vllm

    check_vllm_version(vllm.__version__)
    import vllm.entrypoints.launchers.api_server.entry as entry
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = make_arg_parser(FlexibleArgumentParser(prog="flywheel serve (vLLM)"))
    try:
        argv = vllm_argv(config, model_path, served_name, cpu)
    except ValueError as exc:
        raise UserError(f"{exc}") from None
    args = parser.parse_args(argv)
    configure_logging_from_args(args)
    validate_parsed_serve_args(args)

    vllm_build_app = entry.build_app

    def build_app(args, supported_tasks=None, model_config=None):
        app = vllm_build_app(args, supported_tasks, model_config)
        install(app, config, model_path, served_name, admin_token)
        return app

    entry.build_app = build_app
    vllm_init_app_state = entry.init_app_state

    async def init_app_state(engine_client, state, args, supported_tasks=None):
        await vllm_init_app_state(engine_client, state, args, supported_tasks)
        from flywheel.server.weights.restore import restore_served_version

        # before uvicorn serves the socket: nothing is answered on the base weights after a restart
        await restore_served_version(state)

    entry.init_app_state = init_app_state
    print(
        f"[flywheel serve] {served_name} on http://{config.host}:{config.port}/v1 "
        f"(admin token: {'given' if config.admin_token else config.data_dir / 'admin_token'})",
        file=sys.stderr,
        flush=True,
    )
    try:
        uvloop.run(entry.run_server(args))
    except KeyboardInterrupt:
        pass
    return 0
