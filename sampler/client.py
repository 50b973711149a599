"""Talking to a server through the OpenAI API only: samples with token ids, logprobs and policy versions.

Chat prompts go to /v1/chat/completions, text prompts to /v1/completions, with
`extra_body={"return_token_ids": True}` and logprobs, so every record carries the exact prompt and
completion token ids and the server's (processed) logprobs. The policy version(s) come from the
`x-flywheel-policy-versions` / `x-flywheel-policy-version` headers (read with `with_raw_response`),
or the body's `policy_versions`, as server/status.py's `response_versions` reads them; a server
that sends neither (any non-Flywheel endpoint) gives [].
"""

from __future__ import annotations

import json
import os

import httpx
from openai import AsyncOpenAI

from flywheel.sampler.config import EndpointConfig, SamplingConfig
from flywheel.sampler.prompts import PromptItem
from flywheel.sampler.record import RolloutRecord
from flywheel.server.capture import OPT_OUT_HEADER
from flywheel.server.errors import UserError
from flywheel.server.status import response_versions


class Endpoint:
    """One server: `sample` a prompt n times, `teacher_logprobs` of given tokens."""

    def __init__(self, config: EndpointConfig, max_connections: int = 64):
        self.config = config
        http = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            timeout=config.timeout_s,
        )
        self.client = AsyncOpenAI(
            base_url=config.base_url,
            api_key=config.api_key or os.environ.get("OPENAI_API_KEY") or "none",
            http_client=http,
            timeout=config.timeout_s,
            max_retries=2,
            # the sampler's own requests are not production traffic: a capturing server (flywheel up
            # --production-prompts) would otherwise feed the sampler its own prompts back
            default_headers={OPT_OUT_HEADER: "off"},
        )
        self._model = config.model

    async def model(self) -> str:
        if self._model is None:
            models = await self.client.models.list()
            if not models.data:
                raise UserError(f"{self.config.base_url} serves no models")
            self._model = models.data[0].id
        return self._model

    async def close(self) -> None:
        await self.client.close()

    async def sample(self, item: PromptItem, sampling: SamplingConfig, n: int | None = None) -> list[RolloutRecord]:
        """n completions of one prompt, as unscored records sharing group_id = item.id."""
        params = {
            "model": await self.model(),
            "n": n or sampling.n,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_tokens,
        }
        if sampling.seed is not None:
            params["seed"] = sampling.seed
        if sampling.stop:
            params["stop"] = sampling.stop
        extra = {"return_token_ids": True} if self.config.vllm_extras else {}
        if item.messages is not None:
            raw = await self.client.chat.completions.with_raw_response.create(
                messages=item.messages,
                logprobs=True,
                extra_body={**extra, "return_prompt_text": True} if extra else None,
                **params,
            )
        else:
            raw = await self.client.completions.with_raw_response.create(
                prompt=item.prompt or "", logprobs=1, extra_body=extra or None, **params
            )
        body = json.loads(raw.text)
        versions = response_versions(raw.headers, body)
        return [self._record(item, body, choice, versions, params) for choice in body["choices"]]

    def _record(self, item: PromptItem, body: dict, choice: dict, versions: list[int], params: dict) -> RolloutRecord:
        chat = "message" in choice
        text = (choice["message"].get("content") or "") if chat else choice.get("text", "")
        token_ids = choice.get("token_ids") or []
        prompt_ids = body.get("prompt_token_ids") or choice.get("prompt_token_ids") or []
        logprobs = None
        lp = choice.get("logprobs")
        if lp:
            logprobs = [t["logprob"] for t in lp["content"]] if chat else lp.get("token_logprobs")
            if logprobs is not None and len(logprobs) != len(token_ids):
                logprobs = None  # no token ids from this server: keep the text, drop unmatched logprobs
        return RolloutRecord(
            group_id=item.id,
            task=item.task,
            messages=item.messages,
            prompt=body.get("prompt_text") or (item.prompt or ""),
            completion=text,
            prompt_token_ids=prompt_ids,
            completion_token_ids=token_ids,
            behavior_logprobs=logprobs,
            policy_versions=versions,
            answer=item.answer,
            finish_reason=choice.get("finish_reason"),
            sampling={k: v for k, v in params.items() if k != "model"},
        )

    async def teacher_logprobs(self, prompt_token_ids: list[int], completion_token_ids: list[int]) -> list[float]:
        """This server's logprob of each completion token after the prompt (prompt_logprobs on the joined ids)."""
        ids = list(prompt_token_ids) + list(completion_token_ids)
        raw = await self.client.completions.with_raw_response.create(
            model=await self.model(), prompt=ids, max_tokens=1, temperature=0.0, extra_body={"prompt_logprobs": 0}
        )
        body = json.loads(raw.text)
        entries = body["choices"][0].get("prompt_logprobs")
        if entries is None or len(entries) != len(ids):
            raise RuntimeError(
                f"{self.config.base_url} returned no usable prompt_logprobs (got "
                f"{None if entries is None else len(entries)} for {len(ids)} tokens)"
            )
        out = []
        for token, entry in zip(completion_token_ids, entries[len(prompt_token_ids) :]):
            found = entry.get(str(token)) if entry else None
            if found is None:
                raise RuntimeError(f"teacher did not return the logprob of token {token}")
            out.append(float(found["logprob"]))
        return out
