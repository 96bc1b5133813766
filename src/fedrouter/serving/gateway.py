"""Gateway mode (``fedrouter serve --backend vllm``): FedRouter embeds and routes, a vLLM server generates.

vLLM serves the artifact's adapters under their cluster names, on the exact base they were trained on (the one
``router.json``'s ``base`` records): ``fedrouter export RUN OUT --format vllm`` writes the ``vllm serve BASE
--enable-lora --lora-modules cluster_0=... ...`` command and the gateway line that fronts it. For every request the gateway picks the adapter as the local engine would (``Router.choose``), puts its
name in the request's ``model`` field (the base model's name for ``base``) and forwards the request, streaming or
not; the answer comes back with ``model`` set to what the caller asked for and FedRouter's routing added.

Not exercised against a real vLLM on this machine (no GPU): the tests check the forwarded requests against a stub.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
from fastapi.responses import JSONResponse, Response, StreamingResponse

from fedrouter.serving.router import Choice, Prompt, Route, Router


class VllmGateway:
    def __init__(self, router: Router, url: str, base_model: str, *, timeout_s: float = 600.0) -> None:
        self.router = router
        self.url = url.rstrip("/")
        self.base_model = base_model
        self.client = httpx.AsyncClient(timeout=timeout_s)
        self._lock = asyncio.Lock()  # one embedding at a time on the model

    async def close(self) -> None:
        await self.client.aclose()

    async def choose(self, prompt: Prompt, route: Route) -> Choice:
        async with self._lock:
            return (await asyncio.to_thread(self.router.choose, [prompt], [route]))[0]

    def target(self, choice: Choice) -> str:
        return self.base_model if choice.adapter is None else f"cluster_{choice.adapter}"

    async def forward(
        self, path: str, body: dict, requested_model: str, choice: Choice, info: dict, headers: dict
    ) -> Response:
        """Send ``body`` (already validated) to vLLM's ``path`` with the chosen adapter as its model."""
        body = {**body, "model": self.target(choice)}
        if not body.get("stream"):
            upstream = await self.client.post(self.url + path, json=body)
            if upstream.status_code != 200:
                return _upstream_error(upstream.status_code, upstream.text)
            answer = upstream.json()
            answer["model"] = requested_model
            answer["fedrouter"] = info
            return JSONResponse(answer, headers=headers)
        request = self.client.build_request("POST", self.url + path, json=body)
        upstream = await self.client.send(request, stream=True)
        if upstream.status_code != 200:
            text = (await upstream.aread()).decode(errors="replace")
            await upstream.aclose()
            return _upstream_error(upstream.status_code, text)

        async def events() -> AsyncIterator[str]:
            try:
                async for line in upstream.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        if line:
                            yield line + "\n\n"
                        continue
                    chunk = json.loads(line[6:])
                    chunk["model"] = requested_model
                    if any(c.get("finish_reason") for c in chunk.get("choices", [])):
                        chunk["fedrouter"] = info
                    yield f"data: {json.dumps(chunk)}\n\n"
            finally:
                await upstream.aclose()

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


def _upstream_error(status: int, text: str) -> JSONResponse:
    message = f"the vLLM backend answered {status}: {text[:500]}"
    return JSONResponse(
        {"error": {"message": message, "type": "upstream_error", "param": None, "code": "backend_error"}},
        status_code=502 if status >= 500 else status,
    )
