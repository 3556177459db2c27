"""Where a ``RagPipeline`` runs: an in-process ``Engine`` or a ``prefixcache serve`` URL.

Both backends offer the same three calls (pre-warm a message list, unpin a handle,
stream a chat reply), so the pipeline's code is the same against either.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple

from prefixcache.cache.pins import PinHandle
from prefixcache.sampling_params import SamplingParams

if TYPE_CHECKING:
    from prefixcache.sdk import Engine


class Piece(NamedTuple):
    """One streamed piece of a reply; ``num_cached_tokens`` is None until it is known."""

    text: str
    num_cached_tokens: int | None = None


class LocalBackend:
    """Drives an in-process ``Engine`` on the caller's thread.

    The engine must not be serving other requests meanwhile: stepping it here would
    consume their outputs. (A served engine is reached through ``HttpBackend``.)
    """

    def __init__(self, engine: Engine, salt: str | None = None) -> None:
        self.engine = engine
        self.salt = salt

    def prewarm(self, messages: Sequence[dict], pin: bool, ttl: float | None) -> PinHandle:
        """Prefill ``messages`` (no assistant header) into the cache, optionally pinned."""
        return self.engine.prewarm(messages, pin=pin, ttl=ttl, salt=self.salt)

    def unpin(self, handle: str) -> bool:
        """Release a pin; False if it is unknown or already expired."""
        return self.engine.unpin(handle)

    def stream(self, messages: Sequence[dict], params: SamplingParams) -> Iterator[Piece]:
        """Reply to ``messages``; leaving the iteration early aborts the request."""
        engine = self.engine
        request_id = engine.add_request(engine.inputs.chat_tokens(messages), params, salt=self.salt)
        finished = False
        try:
            while not finished:
                if not engine.has_unfinished_requests():
                    raise RuntimeError(f"request {request_id} vanished from the engine")
                for delta in engine.step():
                    if delta.request_id == request_id:
                        finished = delta.finish_reason is not None
                        yield Piece(delta.text, delta.num_cached_tokens)
        finally:
            if not finished:
                engine.abort(request_id)

    def close(self) -> None:
        """Nothing to release: the caller owns the engine."""


class HttpBackend:
    """Talks to a running ``prefixcache serve`` through its cache and chat endpoints."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        model: str | None = None,
        cache_salt: str | None = None,
        timeout: float = 600.0,
    ) -> None:
        try:
            import httpx
        except ImportError as exc:  # pragma: no cover - httpx is a dependency
            raise ImportError("RagPipeline over HTTP needs httpx: pip install httpx") from exc
        base = url.rstrip("/").removesuffix("/v1")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base, headers=headers, timeout=timeout)
        self.model = model
        self.cache_salt = cache_salt

    def prewarm(self, messages: Sequence[dict], pin: bool, ttl: float | None) -> PinHandle:
        """``POST /v1/cache/prewarm``."""
        body = {"messages": list(messages), "pin": pin, "ttl_s": ttl, **self._common()}
        data = _checked(self.http.post("/v1/cache/prewarm", json=body)).json()
        return PinHandle(
            data["handle"],
            data["num_tokens"],
            data["num_cached_tokens"],
            data["pinned"],
            data.get("expires_at"),
        )

    def unpin(self, handle: str) -> bool:
        """``DELETE /v1/cache/pins/{handle}``; False on 404."""
        response = self.http.delete(f"/v1/cache/pins/{handle}")
        if response.status_code == 404:
            return False
        _checked(response)
        return True

    def stream(self, messages: Sequence[dict], params: SamplingParams) -> Iterator[Piece]:
        """``POST /v1/chat/completions`` with ``stream: true``; the last piece has usage."""
        body = {
            "messages": list(messages),
            "stream": True,
            "stream_options": {"include_usage": True},
            **_sampling_fields(params),
            **self._common(),
        }
        with self.http.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                response.read()
                _checked(response)
            for line in response.iter_lines():
                piece = _parse_event(line)
                if piece is not None:
                    yield piece

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self.http.close()

    def _common(self) -> dict:
        common = {"cache_salt": self.cache_salt} if self.cache_salt else {}
        if self.model:
            common["model"] = self.model
        return common


def _sampling_fields(params: SamplingParams) -> dict:
    if params.stop_token_ids:
        raise ValueError("stop_token_ids are not supported over HTTP")
    fields = {
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "ignore_eos": params.ignore_eos,
    }
    if params.seed is not None:
        fields["seed"] = params.seed
    if params.stop:
        fields["stop"] = params.stop if isinstance(params.stop, str) else list(params.stop)
    return fields


def _parse_event(line: str) -> Piece | None:
    """The piece one SSE line carries, or None (blank lines, ``[DONE]``)."""
    if not line.startswith("data:"):
        return None
    data = line.removeprefix("data:").strip()
    if data == "[DONE]":
        return None
    chunk = json.loads(data)
    if "error" in chunk:
        raise RuntimeError(f"the server failed mid-stream: {chunk['error'].get('message')}")
    text = "".join(c.get("delta", {}).get("content") or "" for c in chunk.get("choices") or [])
    usage = chunk.get("usage")
    cached = usage["prompt_tokens_details"]["cached_tokens"] if usage else None
    return Piece(text, cached) if text or cached is not None else None


def _checked(response):
    """``response`` if it succeeded; ValueError with the server's message on a 4xx."""
    if response.status_code < 400:
        return response
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text
    if response.status_code < 500:
        raise ValueError(f"HTTP {response.status_code}: {message}")
    raise RuntimeError(f"HTTP {response.status_code}: {message}")
