"""Who is calling: the API key in `authorization: Bearer <key>` metadata, looked up by its
SHA-256 among the configured keys (config_file.ApiKey). Keys are long random strings, so a
plain hash is enough to keep them out of the configuration (no salt or slow hash needed, as
for passwords), and a dict lookup of the hash leaks nothing useful about a key by timing."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from server.config_file import ApiKey
from server.model.errors import PermissionDeniedError, UnauthenticatedError

_BEARER = "bearer "


@dataclass(frozen=True, slots=True)
class Caller:
    """The client a call comes from; admins may also manage the ring and see every client."""

    client_id: str
    admin: bool = False


# Without configured keys (the loopback default), every caller is this one client, and the
# operator of the machine: an admin.
ANONYMOUS = Caller("anonymous", admin=True)


def hash_key(key: str) -> str:
    """The SHA-256 (hex) of an API key, as `[[api_keys]] sha256` holds it."""
    return hashlib.sha256(key.encode()).hexdigest()


class Authenticator:
    """Maps a call's metadata to its Caller. With no keys configured, every call is
    ANONYMOUS (`open`)."""

    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self._callers = {key.sha256: Caller(key.client_id, key.admin) for key in keys}

    @property
    def open(self) -> bool:
        return not self._callers

    def caller(self, metadata: Iterable[tuple[str, Any]] | None) -> Caller:
        """The caller whose key the metadata carries; UnauthenticatedError without one, or
        with a key nobody configured. The error never repeats the key."""
        if not self._callers:
            return ANONYMOUS
        for name, value in metadata or ():
            if name == "authorization":
                if not (isinstance(value, str) and value[:7].lower() == _BEARER):
                    raise UnauthenticatedError(
                        "the authorization metadata must be 'Bearer <API key>'"
                    )
                caller = self._callers.get(hash_key(value[7:].strip()))
                if caller is None:
                    raise UnauthenticatedError("the API key is not valid for this server")
                return caller
        raise UnauthenticatedError("an API key is required: send 'authorization: Bearer <key>'")


def require_admin(caller: Caller) -> None:
    if not caller.admin:
        raise PermissionDeniedError(
            f"client {caller.client_id!r} is not an admin: this call needs an admin's API key"
        )
