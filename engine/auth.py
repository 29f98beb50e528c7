"""Access tokens (kept as the import path of `engine.identity.tokens`)."""

from engine.identity.tokens import (
    ANONYMOUS,
    DEFAULT_ALGORITHMS,
    SECRET_FILE_NAME,
    TOKEN_COOKIES,
    AuthError,
    Principal,
    TokenVerifier,
    extract_token,
    issue_token,
    resolve_secret,
)

__all__ = [
    "ANONYMOUS",
    "DEFAULT_ALGORITHMS",
    "SECRET_FILE_NAME",
    "TOKEN_COOKIES",
    "AuthError",
    "Principal",
    "TokenVerifier",
    "extract_token",
    "issue_token",
    "resolve_secret",
]
