"""On start: serve the last published version again, before the first request (issue 16 defect 5).

`flywheel serve` calls `restore_served_version` once vLLM's engine and app state exist and before
uvicorn serves the socket (server/serve.py), so no request, health check or /v1/models call sees
the base weights under any version. It reads <data_dir>/served/record.json
(server/weights/served_record.py) and:
  - no record: nothing was ever pushed to this data dir; the starting checkpoint is version 0;
  - weights: checks the pinned files like a push (names, shapes, dtypes, complete, finite), applies
    them through the push's own path and publishes the recorded version;
  - adapter: applies the base weights it was pushed on (if a full push came before it), loads the
    server's copy of the adapter under --adapter-name and publishes the version;
  - unrecoverable (pushed without a checkpoint), or a restore that fails: the server keeps the
    recorded version number (a later push must be newer, so versions never go back) and refuses
    generation with a 503 saying why, until the next push. It never serves other weights under it.
Whatever restarts the server (by hand, `flywheel up`, compose `restart:`), this is the path, as long
as it starts on the same data dir.
"""

from __future__ import annotations

import sys
from pathlib import Path

from flywheel.server.weights.protocol import PushError, checkpoint_weight_files, validate_buckets
from flywheel.server.weights.served_record import ServedRecord, read_record, record_path


def say(message: str) -> None:
    print(f"[flywheel serve] {message}", file=sys.stderr, flush=True)


async def restore_served_version(state) -> None:
    """Bring back the recorded version on `state` (vLLM's app.state with Flywheel's installed)."""
    policy, config = state.flywheel_policy, state.flywheel_config
    try:
        record = read_record(config.data_dir)
    except (OSError, ValueError) as exc:
        policy.broken = (
            f"the served-version record {record_path(config.data_dir)} is unreadable ({type(exc).__name__}); the "
            "version served before the restart is unknown"
        )
        say(f"NOT SERVING: {policy.broken}; push weights to serve again")
        return
    if record is None:
        say("no pushed version recorded in the data dir: serving the starting checkpoint as version 0")
        return
    try:
        how = await _reload(state, record)
    except PushError as exc:
        policy.version = record.version
        policy.broken = f"version {record.version} could not be restored after a restart: {exc.message}"
        say(f"NOT SERVING: {policy.broken}; push a version newer than {record.version} to serve again")
        return
    policy.publish(record.version, source=f"restored at start-up ({record.source})", transport="restore", how=how)
    say(f"restored version {record.version} ({how})")


async def _reload(state, record: ServedRecord) -> str:
    from flywheel.server.weights.adapter import load_adapter

    config, policy = state.flywheel_config, state.flywheel_policy
    if record.kind == "unrecoverable":
        raise PushError(409, "it was pushed without a `checkpoint`, so the server kept no copy of its weights")
    if record.kind == "adapter":
        if not config.max_lora_rank:
            raise PushError(400, "it is a LoRA adapter and this server serves none (start it with --max-lora-rank)")
        if record.base is not None:  # the full push the adapter was pushed on
            await _reload_weights(state, record.version, record.base)
        await load_adapter(state, policy, config.adapter_name, Path(record.folder), "keep")
        return f"adapter {record.folder}" + (f" on the weights pinned in {record.base}" if record.base else "")
    await _reload_weights(state, record.version, record.folder)
    return f"weights pinned in {record.folder}, from checkpoint {record.checkpoint}"


async def _reload_weights(state, version: int, folder: str) -> None:
    """Check the pinned files like a push (they may have changed on disk), then apply them."""
    from flywheel.server.weights.routes import apply_weights, manifest_of

    files = checkpoint_weight_files(folder)
    manifest, tied = manifest_of(state)
    validate_buckets(files, manifest, tied)
    await apply_weights(state.engine_client, state.flywheel_policy, version, "keep", {"files": files})
