"""Chat backends: one tiny protocol for "send conversations, get replies", local or over HTTP.

LLM-driven attacks (PAIR) and LLM judges need a chat model that may not be the model under
attack: a local refat :class:`~refat.models.Model` rendered with its own chat template, or any
OpenAI-compatible ``/v1/chat/completions`` server (vLLM, llama.cpp, Ollama, hosted APIs). The HTTP
client uses only the standard library, retries transient failures with exponential backoff, and
fails with an error that names the URL; the API key is read from the environment at request time
and never stored, printed or put into an error. Credentials written into a URL (``http://user:pass@host``)
are sent as HTTP basic auth and stripped, by :func:`redact_url`, from every URL refat prints or records.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from .configs import ConfigError, at_least, require
from .errors import RefatError
from .generation import batched, eos_ids, generate
from .models import Model

__all__ = ["ChatBackend", "LocalChat", "HTTPChat", "ChatEndpointError", "render", "from_spec", "redact_url", "redact"]

Messages = list[dict]


@runtime_checkable
class ChatBackend(Protocol):
    """Anything that answers a batch of conversations (``[{"role": ..., "content": ...}, ...]``)."""

    name: str
    continues_prefill: bool  # True: a trailing assistant message is continued (the reply excludes it)

    def complete(self, messages_batch: list[Messages], max_new_tokens: int, temperature: float = 0.0) -> list[str]:
        ...


class ChatEndpointError(RefatError, RuntimeError):
    """An HTTP chat endpoint did not answer usably (after retries, where retrying made sense)."""


_SECRET_PARAM = re.compile(r"key|token|secret|password|passwd|signature|sig|auth", re.IGNORECASE)


def redact_url(url: str) -> str:
    """``url`` as it may be printed or written: without ``user:password@``, and with the values of query
    parameters that look like credentials (``api-key``, ``token``, ``sig``, ...) replaced by ``***``."""
    parts = urllib.parse.urlsplit(url)
    if not parts.netloc:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    query = "&".join(f"{k}=***" if _SECRET_PARAM.search(k) else (f"{k}={v}" if v or "=" in pair else k)
                     for pair in parts.query.split("&") if pair
                     for k, _, v in [pair.partition("=")])
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))


_URL = re.compile(r"https?://[^\s'\"]+")


def redact(obj):
    """``obj`` (a string, or JSON-like data) with every URL in it passed through :func:`redact_url`: for
    configs, argv and anything else a run writes down."""
    if isinstance(obj, str):
        return _URL.sub(lambda m: redact_url(m.group(0)), obj)
    if isinstance(obj, dict):
        return {k: redact(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    return obj


def render(tokenizer, messages: Messages) -> str:
    """``messages`` in the tokenizer's chat template, ready for the assistant's (continued) answer.

    A trailing assistant message is continued rather than closed (prefill). Templates that reject a
    system role (Gemma, Mistral v1) get the system text prepended to the first user message instead.
    """
    prefill = bool(messages) and messages[-1]["role"] == "assistant"
    kwargs = {"continue_final_message": True} if prefill else {"add_generation_prompt": True}
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except Exception:  # jinja raises TemplateError (or anything the template's raise_exception does)
        if not messages or messages[0]["role"] != "system":
            raise
        system, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
        if not rest or rest[0]["role"] != "user":
            rest.insert(0, {"role": "user", "content": ""})
        rest[0]["content"] = f"{system}\n\n{rest[0]['content']}".rstrip()
        return tokenizer.apply_chat_template(rest, tokenize=False, **kwargs)


@dataclass
class LocalChat:
    """A refat :class:`Model` as a chat backend (works under any refat hook, like :func:`generate`).

    ``temperature == 0`` is refat's batched greedy decoding. ``temperature > 0`` samples with
    transformers' ``generate`` (nucleus ``top_p``) under a private RNG seeded from ``seed`` and the
    call number, so the same sequence of calls gives the same replies without touching global RNG.
    """

    model: Model
    seed: int = 0
    top_p: float = 1.0
    batch_size: int = 16
    continues_prefill: bool = True
    _calls: int = field(default=0, init=False, repr=False)

    @property
    def name(self) -> str:
        return f"local:{self.model.name}"

    def reseed(self, seed: int) -> None:
        """Restart the sampling sequence from ``seed`` (PAIR does this per behaviour, so resumes agree)."""
        self.seed, self._calls = seed, 0

    def complete(self, messages_batch: list[Messages], max_new_tokens: int, temperature: float = 0.0) -> list[str]:
        if not messages_batch:
            return []
        texts = [render(self.model.tokenizer, m) for m in messages_batch]
        self._calls += 1
        if temperature <= 0:
            return generate(self.model, texts, max_new_tokens=max_new_tokens, batch_size=self.batch_size,
                            formatted=True, progress=False)
        seed = self.seed * 1_000_003 + self._calls
        return batched(lambda chunk: self._sample(chunk, max_new_tokens, temperature, seed), texts, self.batch_size,
                       progress=False)

    @torch.no_grad()
    def _sample(self, texts: list[str], max_new_tokens: int, temperature: float, seed: int) -> list[str]:
        m = self.model
        enc = m.tokenize(texts, formatted=True)
        eos = eos_ids(m).tolist()
        devices = [m.device] if m.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = m.hf.generate(**enc, do_sample=True, temperature=temperature, top_p=self.top_p,
                                max_new_tokens=max_new_tokens, eos_token_id=eos,
                                pad_token_id=m.tokenizer.pad_token_id)
        replies = []
        for row in out[:, enc["input_ids"].shape[1]:].tolist():
            cut = next((i for i, t in enumerate(row) if t in eos), len(row))
            replies.append(m.tokenizer.decode(row[:cut], skip_special_tokens=True))
        return replies


_LOOPBACK = {"localhost", "127.0.0.1", "::1"}


@dataclass
class HTTPChat:
    """An OpenAI-compatible chat completions endpoint, standard library only.

    ``base_url`` is the server root (``http://host:8000``), its ``/v1``, or the full
    ``.../chat/completions`` URL. A request that gets no answer within ``timeout`` seconds, a connection
    error, HTTP 429 and 5xx are retried ``retries`` times, waiting ``backoff``, ``2 * backoff``, ``4 *
    backoff``, ... seconds (capped at 30 s); other HTTP errors fail at once. ``api_key_env`` names the
    environment variable holding the key; ``user:password@`` in the URL is sent as basic auth instead.
    """

    base_url: str = field(repr=False)  # may hold credentials: shown only through redact_url
    model: str
    api_key_env: str | None = None
    timeout: float = 120.0
    retries: int = 4
    backoff: float = 1.0
    concurrency: int = 8  # conversations in flight at once
    seed: int | None = None  # sent as the request's "seed" (honoured by OpenAI and vLLM)
    continues_prefill: bool = False

    def __post_init__(self):
        parsed = urllib.parse.urlparse(self.base_url)
        require(parsed.scheme in ("http", "https") and bool(parsed.hostname), "base_url",
                f"{redact_url(self.base_url)!r} is not an http(s) URL")
        at_least(self, 0, "retries", "backoff")
        at_least(self, 0, "timeout", strict=True)
        at_least(self, 1, "concurrency")

    @property
    def name(self) -> str:
        return f"{self.shown_url}#{self.model}"

    @property
    def shown_url(self) -> str:
        """:attr:`url` as printed and recorded (no credentials)."""
        return redact_url(self.url)

    def reseed(self, seed: int) -> None:
        """Send ``seed`` from now on; a backend made with ``seed=None`` never sends one."""
        if self.seed is not None:
            self.seed = seed

    @property
    def url(self) -> str:
        """The request URL: the completions path added, ``user:password@`` left out (it is sent as a header)."""
        parts = urllib.parse.urlsplit(self.base_url)
        parts = parts._replace(netloc=parts.netloc.rpartition("@")[2], path=parts.path.rstrip("/"))
        if not parts.path.endswith("/chat/completions"):
            parts = parts._replace(path=parts.path + ("/chat/completions" if parts.path.endswith("/v1")
                                                      else "/v1/chat/completions"))
        return urllib.parse.urlunsplit(parts)

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json"}
        parsed = urllib.parse.urlsplit(self.base_url)
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise ChatEndpointError(f"environment variable {self.api_key_env} (the API key for "
                                        f"{self.shown_url}) is not set")
            headers["Authorization"] = f"Bearer {key}"
        elif parsed.username is not None:
            user_pass = f"{urllib.parse.unquote(parsed.username)}:{urllib.parse.unquote(parsed.password or '')}"
            headers["Authorization"] = "Basic " + base64.b64encode(user_pass.encode()).decode()
        return headers

    def _opener(self):
        host = urllib.parse.urlparse(self.url).hostname
        # a loopback server is never behind the user's HTTP proxy
        return urllib.request.build_opener(urllib.request.ProxyHandler({})) if host in _LOOPBACK \
            else urllib.request.build_opener()

    def complete(self, messages_batch: list[Messages], max_new_tokens: int, temperature: float = 0.0) -> list[str]:
        if not messages_batch:
            return []
        headers, opener = self._headers(), self._opener()
        one = lambda msgs: self._post(opener, headers, msgs, max_new_tokens, temperature)
        if len(messages_batch) == 1 or self.concurrency <= 1:
            return [one(m) for m in messages_batch]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(messages_batch))) as pool:
            return list(pool.map(one, messages_batch))

    def _post(self, opener, headers: dict, messages: Messages, max_new_tokens: int, temperature: float) -> str:
        body = {"model": self.model, "messages": messages, "max_tokens": max_new_tokens, "temperature": temperature}
        if self.seed is not None:
            body["seed"] = self.seed
        data = json.dumps(body).encode()
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), 30.0))
            req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with opener.open(req, timeout=self.timeout) as resp:
                    payload = resp.read()
            except urllib.error.HTTPError as e:
                try:
                    detail = e.read()[:300].decode("utf-8", "replace")
                except (OSError, http.client.HTTPException):
                    detail = str(e.reason)
                if e.code == 429 or e.code >= 500:
                    last = f"HTTP {e.code}: {detail}"
                    continue
                raise ChatEndpointError(f"{self.shown_url} answered HTTP {e.code} for model {self.model!r}: "
                                        f"{detail}") from None
            except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, cut short
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
                continue
            return self._content(payload)
        raise ChatEndpointError(f"no answer from {self.shown_url} after {self.retries + 1} attempt(s) (timeout "
                                f"{self.timeout:g} s each); last error: {last}")

    def _content(self, payload: bytes) -> str:
        try:
            content = json.loads(payload)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ChatEndpointError(f"{self.shown_url} did not return an OpenAI chat completion: "
                                    f"{payload[:200].decode('utf-8', 'replace')!r}") from None
        return content or ""


def from_spec(spec: str, *, model_name: str | None = None, api_key_env: str | None = None, seed: int = 0,
              timeout: float = HTTPChat.timeout, retries: int = HTTPChat.retries, **load_kwargs) -> ChatBackend:
    """A backend from a CLI-style spec: an ``http(s)://`` URL (``model_name`` is the served model's
    name, required; ``timeout`` and ``retries`` per request) or anything :func:`refat.models.load` takes
    (catalog name, directory, .gguf, hub id)."""
    if spec.startswith(("http://", "https://")):
        if not model_name:
            raise ConfigError(f"chat endpoint {redact_url(spec)} needs the served model's name (e.g. --attacker-model)")
        return HTTPChat(spec, model_name, api_key_env=api_key_env, seed=seed, timeout=timeout, retries=retries)
    from .models import load

    return LocalChat(load(spec, **load_kwargs), seed=seed)

