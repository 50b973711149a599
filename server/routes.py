"""Flywheel's own routes, mounted on vLLM's app: status, and admin pause/resume.

Thin HTTP over the engine client that vLLM's app state already holds. The weight-update routes
live with their protocol in server/weights/.
"""

from __future__ import annotations

import time
from typing import Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from flywheel.server.errors import openai_error_body
from flywheel.server.policy import PolicyState
from flywheel.server.status import STATUS_PATH, ServerStatus

router = APIRouter()

PauseMode = Literal["keep", "wait", "abort"]


def policy_of(request: Request) -> PolicyState:
    return request.app.state.flywheel_policy


@router.get(STATUS_PATH)
async def status(request: Request) -> JSONResponse:
    """Model, policy version, uptime, capture and weight-push settings (server/status.py's ServerStatus)."""
    policy = policy_of(request)
    settings = request.app.state.flywheel_settings
    engine = request.app.state.engine_client
    body = ServerStatus(
        model=policy.model,
        served_model_name=policy.served_model_name,
        policy_version=policy.version,
        started_at=policy.started_at,
        uptime_s=round(time.time() - policy.started_at, 3),
        last_update_at=policy.updated_at,
        updates=policy.history[-10:],
        failed_pushes=policy.failed_pushes,
        not_serving=policy.broken,
        paused=await engine.is_paused(),
        **settings,
    )
    return JSONResponse(body.model_dump(mode="json"))


def error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None) -> JSONResponse:
    """The OpenAI error envelope (server/errors.py) as a route's answer."""
    return JSONResponse(openai_error_body(status, message, type_, param=param), status_code=status)


@router.post("/flywheel/admin/pause")
async def pause(
    request: Request,
    mode: PauseMode = Query("keep", description="keep: freeze in-flight requests; wait: drain them; abort: abort them"),
) -> JSONResponse:
    await request.app.state.engine_client.pause_generation(mode=mode)
    policy_of(request).admin_paused = True  # until an admin resumes: a weight push keeps it paused
    return JSONResponse({"status": "paused", "mode": mode})


@router.post("/flywheel/admin/resume")
async def resume(request: Request) -> JSONResponse:
    policy_of(request).admin_paused = False
    await request.app.state.engine_client.resume_generation()
    return JSONResponse({"status": "resumed"})
