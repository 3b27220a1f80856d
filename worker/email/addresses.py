"""Addresses and domains as the links compare them.

An address compares lower-cased, its domain in IDNA form; a domain is its registrable
domain under the public suffix list (``a.Acme.co.uk`` and ``acme.co.uk`` are one).
"""
from __future__ import annotations

import functools
import os
import re
import unicodedata

from publicsuffixlist import PublicSuffixList

_PSL = PublicSuffixList()
_ADDRESS = re.compile(r"^[^\s@<>()\[\],;:\"]{1,64}@[^\s@<>()\[\],;:\"]{1,253}\Z")


def _load_freemail() -> frozenset:
    with open(os.path.join(os.path.dirname(__file__), "freemail.txt")) as f:
        return frozenset(line.strip() for line in f if line.strip() and not line.startswith("#"))


FREEMAIL = _load_freemail()


def canonical_address(text: str) -> str | None:
    """``Local@Domain`` -> ``local@domain`` (the domain in IDNA form), or None when it is
    not an address."""
    text = text.strip().strip("<>").strip()
    if not _ADDRESS.match(text):
        return None
    local, _, domain = text.rpartition("@")
    domain = _ascii_domain(domain)
    if domain is None or "." not in domain:
        return None
    return f"{local.lower()}@{domain}"


def _ascii_domain(domain: str) -> str | None:
    """``domain`` lower-cased in IDNA form; as it is when already ASCII but not valid
    IDNA (an over-long label); None when it cannot be made ASCII."""
    domain = domain.strip().rstrip(".").lower()
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain if domain.isascii() else None


@functools.lru_cache(maxsize=65536)
def registrable_domain(domain: str) -> str:
    """The registrable domain of ``domain`` (lower-cased); the domain itself when the
    public suffix list knows no registrable part (a bare suffix, a local name)."""
    domain = _ascii_domain(domain) or domain.strip().rstrip(".").lower()
    return _PSL.privatesuffix(domain) or domain


def domain_of(address: str) -> str:
    return registrable_domain(address.rpartition("@")[2])


def is_freemail(domain: str) -> bool:
    return registrable_domain(domain) in FREEMAIL


def fold(text: str) -> str:
    """Case- and accent-insensitive form of ``text`` (search terms, sort names)."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def name_terms(name: str) -> set[str]:
    """The folded words of a name: what a search prefix may start."""
    return {w for w in re.split(r"[\s,.;:()\[\]\"'/\\|-]+", fold(name)) if w}
