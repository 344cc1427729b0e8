"""The rules for URLs in a spec: storage and tracking URLs, and the secrets they carry (never shown)."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import quote, quote_plus, unquote, unquote_plus

from hpsearch.errors import SpecError

_STORAGE_SCHEMES = ("sqlite", "postgresql", "mysql")
_TRACKING_SCHEMES = ("sqlite", "postgresql", "mysql", "file", "http", "https")

# A URL in a message runs to the next whitespace; its user info ends at its last "@" (so a password
# with "@", ":" or "/" in it is masked whole, and a user name such as "user@server" stays readable).
_URL_IN_TEXT = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*)://(\S+)")
_QUERY_PARAM = re.compile(r"([?&;])([^=&;#\s]+)=([^&;#\s]*)")
# Query parameters whose value is a secret, whatever a driver or a server calls it (password,
# sslpassword, passwd, pwd, token, access_key, api_key, secret, auth, credentials, signature, sig).
_SECRET_PARAM = re.compile(r"pass|pwd|secret|token|key|auth|credential|signature|^sig$", re.IGNORECASE)
_MASK = "***"


def mask_password(text: str) -> str:
    """Return ``text`` (a URL, or a message quoting URLs) with every secret a URL can carry replaced by ``***``.

    The password of the user info, however it is written (``user:pw@``, ``:pw@``, percent-escaped
    or not, with ``@``, ``:`` or ``/`` in it), a bare http(s) user info (a token), and the values of
    query parameters that look secret (``?password=...``, ``token=``, ``sslpassword=``...).
    """
    return _URL_IN_TEXT.sub(lambda m: f"{m[1]}://{_mask_url_rest(m[1], m[2])}", text)


def _mask_url_rest(scheme: str, rest: str) -> str:
    userinfo, at, host = rest.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        if colon:
            rest = f"{user}:{_MASK}@{host}"
        elif scheme.lower() in ("http", "https"):  # https://TOKEN@host: the user name is the secret
            rest = f"{_MASK}@{host}"
    return _QUERY_PARAM.sub(
        lambda m: f"{m[1]}{m[2]}={_MASK}" if _SECRET_PARAM.search(unquote_plus(m[2])) else m[0], rest)


def url_secrets(url: str) -> set[str]:
    """Return the secrets ``url`` carries (see :func:`mask_password`), each as written, decoded and re-escaped."""
    found = set()
    for m in _URL_IN_TEXT.finditer(url):
        userinfo, at, _ = m[2].rpartition("@")
        if at:
            user, colon, password = userinfo.partition(":")
            found.add(password if colon else user if m[1].lower() in ("http", "https") else "")
        found.update(q[3] for q in _QUERY_PARAM.finditer(m[2]) if _SECRET_PARAM.search(unquote_plus(q[2])))
    forms = set()
    for secret in found:
        forms |= {secret, unquote(secret), unquote_plus(secret), quote(unquote(secret), safe=""),
                  quote_plus(unquote_plus(secret), safe="")}
    return {f for f in forms if f}


def hide_secrets(text: str, url: str) -> str:
    """Return ``text`` (e.g. a driver's error about ``url``) with ``url``'s secrets masked wherever they appear."""
    text = mask_password(text)
    for secret in sorted(url_secrets(url), key=len, reverse=True):  # longest first: no half-masked form
        text = text.replace(secret, _MASK)
    return text


def without_credentials(url: str) -> str:
    """Return ``url`` without user info or query, for a link a person opens (a browser needs neither)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    rest = rest.split("?", 1)[0].split("#", 1)[0]
    return f"{scheme}://{rest.rpartition('@')[2]}"


def check_storage_url(url: str, *, where: str = "storage") -> str:
    """Return the Optuna storage URL with relative SQLite paths made absolute; refuse others."""
    scheme = url.split(":", 1)[0].split("+", 1)[0] if "://" in url else ""
    if scheme not in _STORAGE_SCHEMES:
        raise SpecError(f"{where}: {mask_password(url)!r} is not a storage URL this tool accepts. Expected "
                        "sqlite:///path/to/file.db, postgresql://user@host:5432/db (password from an "
                        "environment variable via ${VAR}) or mysql://...")
    if scheme == "sqlite":
        path = url.split(":///", 1)[1] if ":///" in url else ""
        if not path:
            raise SpecError(f"{where}: {mask_password(url)!r} names no database file. Expected "
                            "sqlite:///path/to/file.db.")
        return "sqlite:///" + str(Path(path).resolve())
    _check_userinfo(url, where)
    return url


def _check_userinfo(url: str, where: str) -> None:
    """Refuse a password with a raw "@": drivers end it at its first "@" and take the rest for the host."""
    userinfo = url.split("://", 1)[1].rpartition("@")[0]
    if "@" in userinfo.partition(":")[2]:
        raise SpecError(f"{where}: the password in {mask_password(url)!r} contains a raw '@', which a database "
                        "driver reads as the end of the password. Percent-escape it: '@' as %40 (and ':' as "
                        "%3A, '/' as %2F).")


_TRACKING_RULE = ("an MLflow tracking URI must be sqlite:///path/mlflow.db, file:///dir, http(s)://host[:port], "
                  "postgresql://..., mysql://... or a directory path")


def check_tracking_uri(uri: str, *, where: str = "tracking.uri") -> str:
    """Return the MLflow tracking URI with relative local paths made absolute; refuse others.

    The one rule for a tracking URI, wherever it comes from (a spec, a flag, the environment, a
    stored spec, a Tracker built directly): SpecError naming ``where``, the rule and the URI (its
    secrets masked).
    """
    bad = SpecError(f"{where}: {_TRACKING_RULE}, but got {mask_password(uri) if isinstance(uri, str) else uri!r}.")
    if not isinstance(uri, str) or not uri.strip() or uri != uri.strip() or any(ord(c) < 32 for c in uri):
        raise bad  # stray blanks or control characters are a typo, not part of a directory name
    if "://" not in uri:
        if ":" in uri:  # "localhost:5000", "sqlite:x.db": a scheme or a host without the "//" of a URI
            raise bad
        return Path(uri).resolve().as_uri()  # a directory path: MLflow's file store
    scheme, rest = uri.split("://", 1)
    scheme = scheme.split("+", 1)[0].lower()  # postgresql+psycopg2 -> postgresql
    if scheme not in _TRACKING_SCHEMES or not rest.strip("/"):
        raise bad
    if scheme == "sqlite":
        if not rest.startswith("/"):  # sqlite://x is an in-memory database (nothing to share) or a typo
            raise bad
        return "sqlite:///" + str(Path(rest[1:]).resolve())
    if scheme in ("http", "https") and not re.match(r"^([^/@\s]+@)?[^/:@\s]+(:\d+)?(/\S*)?$", rest):
        raise bad
    if scheme in ("postgresql", "mysql"):
        _check_userinfo(uri, where)
    return uri
