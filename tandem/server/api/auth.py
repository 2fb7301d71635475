"""Bearer-token authorization with two roles.

The tokens file has one "<role> <token>" per line; '#' at the start of a line or after
whitespace starts a comment, so a token may contain '#'. role is
`inference` (generation, tokenization, listing) or `admin` (everything, including adapter
mutations). Only SHA-256 digests of the tokens are kept, so a token can never reach a log.
"""

import hashlib
import re
from enum import IntEnum
from pathlib import Path

from tandem.server.errors import TandemError


class Unauthenticated(TandemError):
    """No token, or one the server does not know (UNAUTHENTICATED)."""


class PermissionDenied(TandemError):
    """A known token whose role is too weak for the method (PERMISSION_DENIED)."""


class Role(IntEnum):
    INFERENCE = 1
    ADMIN = 2


# Methods not listed (and outside ADMIN_SERVICES) need the inference role.
ADMIN_METHODS = frozenset(
    f"/tandem.v1.AdaptersService/{m}" for m in ("LoadAdapter", "UnloadAdapter", "MergeAdapters", "CompressAdapter")
)
# Every method of these services needs the admin role.
ADMIN_SERVICES = ("/tandem.v1.FineTuningService/",)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


# A '#' inside a token (hash#tail) is part of it; one at the start or after a space is not.
_COMMENT = re.compile(r"(?:^|\s)#.*")


class TokenTable:
    """Maps token digests to roles and decides whether a call may proceed."""

    def __init__(self, roles_by_digest: dict[bytes, Role]):
        self._roles = roles_by_digest

    @classmethod
    def from_file(cls, path: str | Path) -> "TokenTable":
        """Parses the tokens file; errors name the line, never the token, and a file that
        cannot be read its flag (OSError said only "[Errno 2] No such file or directory")."""
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ValueError(f"--auth-tokens-file {path} cannot be read: {exc.strerror or exc}") from exc
        roles: dict[bytes, Role] = {}
        for number, line in enumerate(text.splitlines(), start=1):
            line = _COMMENT.sub("", line, count=1).strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2 or parts[0].upper() not in Role.__members__:
                raise ValueError(f"{path}:{number}: expected '<inference|admin> <token>'")
            roles[_digest(parts[1])] = Role[parts[0].upper()]
        if not roles:
            raise ValueError(f"{path} holds no tokens; remove --auth-tokens-file to turn auth off")
        return cls(roles)

    def authorize(self, method: str, metadata: dict[str, str]) -> Role:
        """Returns the caller's role or raises Unauthenticated / PermissionDenied."""
        header = metadata.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("missing bearer token: send metadata 'authorization: Bearer <token>'")
        role = self._roles.get(_digest(token.strip()))
        if role is None:
            raise Unauthenticated("unknown bearer token")
        needed = Role.ADMIN if method in ADMIN_METHODS or method.startswith(ADMIN_SERVICES) else Role.INFERENCE
        if role < needed:
            raise PermissionDenied(f"{method} needs the {needed.name.lower()} role; this token has {role.name.lower()}")
        return role
