"""Credentials come from the environment or a `.env` file, never from parameters.

Nothing here prints or returns a secret into a notebook's output: callers get the value to
hand to a client, and :func:`redact` masks any secret that might end up in a message.
"""
from __future__ import annotations

import base64
import json
import os
import re
import urllib.parse
import urllib.request
from functools import lru_cache

from .config import REPO_ROOT

SECRET_NAMES = ("OPENAI_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


@lru_cache(maxsize=1)
def load_env() -> None:
    """Load `.env` from the repository root (existing environment variables win)."""
    from dotenv import load_dotenv  # only when secrets are read

    load_dotenv(REPO_ROOT / ".env", override=False)


def get_secret(name: str) -> str | None:
    load_env()
    value = os.environ.get(name, "").strip()
    return value or None


def hf_token() -> str | None:
    return get_secret("HF_TOKEN") or get_secret("HUGGING_FACE_HUB_TOKEN")


# user:password@ (or token@) in a URL, and credentials passed in a query string
_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#@\s'\"]+)@")
_URL_QUERY_SECRET = re.compile(r"(?P<key>[?&](?:api[_-]?key|access[_-]?token|token|key|password|passwd|pwd|"
                               r"secret|sig|signature|auth)=)[^&#\s'\"]+", re.IGNORECASE)
MASK = "***"


def mask_url_credentials(text: str) -> str:
    """Text with every URL's password (``user:password@``), bare token (``token@``) and
    credential-like query value (``?api_key=...``) replaced by ``***``; a user name stays, so
    a reader can still tell which account a URL uses.

    >>> mask_url_credentials("https://bob:s3cret@host/v1?api_key=abc&x=1")
    'https://bob:***@host/v1?api_key=***&x=1'
    """
    def userinfo(m: re.Match) -> str:
        user, sep, _ = m.group("userinfo").partition(":")
        return f"{m.group('scheme')}{user}:{MASK}@" if sep else f"{m.group('scheme')}{MASK}@"

    return _URL_QUERY_SECRET.sub(lambda m: m.group("key") + MASK, _URL_USERINFO.sub(userinfo, text))


def has_url_credentials(text: str) -> bool:
    return mask_url_credentials(text) != text


# A grid runner hands notebooks their parameters with URL credentials masked (the injected
# parameters cell is part of the rendered notebook) and the real URLs through this variable,
# which the kernel inherits: {masked URL: real URL}.
ENV_URL_SECRETS = "EM_LAB_URL_SECRETS"


def mask_parameters(params: dict) -> tuple[dict, dict[str, str]]:
    """(params with every URL credential masked, {masked: real} for the values that changed)."""
    secrets: dict[str, str] = {}

    def mask(v):
        if isinstance(v, str):
            m = mask_url_credentials(v)
            if m != v:
                secrets[m] = v
            return m
        if isinstance(v, (list, tuple)):
            return [mask(x) for x in v]
        return v

    return {k: mask(v) for k, v in params.items()}, secrets


def authorized_request(url: str):
    """A urllib GET request for ``url`` whose ``user:password@`` becomes a Basic auth header
    (urllib ignores credentials in the URL)."""
    p = urllib.parse.urlsplit(url)
    if p.username is None:
        return urllib.request.Request(url)
    netloc = (p.hostname or "") + (f":{p.port}" if p.port else "")
    req = urllib.request.Request(urllib.parse.urlunsplit((p.scheme, netloc, p.path, p.query, p.fragment)))
    cred = f"{urllib.parse.unquote(p.username)}:{urllib.parse.unquote(p.password or '')}"
    req.add_header("Authorization", "Basic " + base64.b64encode(cred.encode()).decode())
    return req


def unmask_url(url: str) -> str:
    """The real URL behind a masked one (see :data:`ENV_URL_SECRETS`); other URLs as they are."""
    if MASK not in url:
        return url
    try:
        mapping = json.loads(os.environ.get(ENV_URL_SECRETS) or "{}")
    except ValueError:
        return url
    return mapping.get(url, url) if isinstance(mapping, dict) else url


def redact(text: str, names: tuple[str, ...] = SECRET_NAMES) -> str:
    """Replace any secret value found in text by a placeholder, and mask URL credentials."""
    for n in names:
        v = get_secret(n)
        if v and len(v) >= 6:
            text = text.replace(v, f"<{n}>")
    return mask_url_credentials(text)


def safe_base_url(url: str) -> str:
    """A base URL without any user:password part (it goes into run.json and cache keys)."""
    if not url:
        return ""
    p = urllib.parse.urlsplit(url)
    host = p.hostname or ""
    netloc = host + (f":{p.port}" if p.port else "")
    return urllib.parse.urlunsplit((p.scheme, netloc, p.path.rstrip("/"), "", ""))
