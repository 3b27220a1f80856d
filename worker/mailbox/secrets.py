"""Mailbox passwords and tokens, encrypted at rest with Fernet (AES-128-CBC + HMAC-SHA256)
under the keys of ``CRM_SECRET_KEY``: the first key encrypts, every key decrypts.

Rotating the key: put the new key first and keep the old one after it
(``CRM_SECRET_KEY=new,old``), restart the workers, run ``crm mailboxes --rotate-key``
(every secret re-encrypted under the new key), then drop the old key.
"""
from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken, MultiFernet


class SecretKeyError(RuntimeError):
    """The service cannot encrypt or decrypt a mailbox secret: an operator's matter (the
    key is missing or not the one the secret was encrypted with), not the caller's."""


MISSING = ("CRM_SECRET_KEY is not set: mailbox passwords and tokens are kept encrypted under it. "
           "Set it to a Fernet key (`crm mailboxes --new-key` prints one) on every worker")


def new_key() -> str:
    return Fernet.generate_key().decode()


def _fernet(keys) -> MultiFernet:
    if not keys:
        raise SecretKeyError(MISSING)
    return MultiFernet([Fernet(k.encode() if isinstance(k, str) else k) for k in keys])


def encrypt(keys, secret: str) -> str:
    return _fernet(keys).encrypt(secret.encode()).decode()


def decrypt(keys, token: str) -> str:
    try:
        return _fernet(keys).decrypt(token.encode()).decode()
    except InvalidToken:
        raise SecretKeyError("a mailbox secret does not decrypt under CRM_SECRET_KEY: the key that "
                             "encrypted it is missing (keep old keys after the new one while rotating)") from None


def rotate(keys, token: str) -> str:
    """``token`` encrypted again under the first key."""
    try:
        return _fernet(keys).rotate(token.encode()).decode()
    except InvalidToken:
        raise SecretKeyError("a mailbox secret does not decrypt under CRM_SECRET_KEY") from None


#: The arguments and fields that carry a secret, wherever they appear in a task's call.
SECRET_FIELDS = frozenset({"password", "oauth2_access_token"})
REDACTED = "***"


def redact(value):
    """``value`` with every ``SECRET_FIELDS`` entry of every object in it replaced."""
    if isinstance(value, dict):
        return {k: (REDACTED if k in SECRET_FIELDS and v is not None else redact(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value


def redact_call(signature, args, kwargs) -> tuple[list, dict]:
    """A task call's arguments with the secrets replaced: parameters named in
    ``SECRET_FIELDS`` (bound by name or by position) and those fields inside objects."""
    names = list(signature.parameters)
    args = [REDACTED if i < len(names) and names[i] in SECRET_FIELDS and a is not None else redact(a)
            for i, a in enumerate(args or ())]
    return args, redact(dict(kwargs or {}))
