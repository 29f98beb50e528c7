"""A stand-in identity provider for the tests: real keys generated per run, served as a JWKS
over real HTTP on 127.0.0.1, and tokens signed with them."""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm, get_default_algorithms

ISSUER = "https://idp.test/"
AUDIENCE = "realtime-api"


@dataclass
class SigningKey:
    """A private key, its `kid` and algorithm, and its public JWK."""

    alg: str
    private: Any
    kid: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    @classmethod
    def generate(cls, alg: str) -> SigningKey:
        if alg.startswith(("RS", "PS")):
            return cls(alg, rsa.generate_private_key(public_exponent=65537, key_size=2048))
        if alg == "ES256":
            return cls(alg, ec.generate_private_key(ec.SECP256R1()))
        if alg == "EdDSA":
            return cls(alg, ed25519.Ed25519PrivateKey.generate())
        raise ValueError(alg)

    def public_jwk(self) -> dict[str, Any]:
        public = self.private.public_key()
        algorithm = {"RS": RSAAlgorithm, "PS": RSAAlgorithm, "ES": ECAlgorithm}.get(
            self.alg[:2], OKPAlgorithm
        )
        jwk: dict[str, Any] = algorithm.to_jwk(public, as_dict=True)
        return {**jwk, "kid": self.kid, "alg": self.alg, "use": "sig"}

    def public_pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, claims: dict[str, Any], **headers: Any) -> str:
        return jwt.encode(
            claims, self.private, algorithm=self.alg, headers={"kid": self.kid, **headers}
        )


def sign_raw(key: SigningKey, header: dict[str, Any], claims: dict[str, Any]) -> str:
    """A token with exactly this header, signed by `key` (PyJWT refuses odd headers)."""
    import base64

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    algorithm = get_default_algorithms()[key.alg]
    signature = algorithm.sign(signing_input.encode(), algorithm.prepare_key(key.private))
    return f"{signing_input}.{b64(signature)}"


def provider_claims(user: str, ttl: int = 600, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": user,
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + ttl,
    }
    claims.update(extra)
    return {k: v for k, v in claims.items() if v is not None}


def provider_env(server: JwksServer, min_refetch_seconds: float = 1.0) -> dict[str, str]:
    """Engine settings that trust `server` as the identity provider."""
    return {
        "MDB_REALTIME_JWKS_URL": server.url,
        "MDB_REALTIME_JWT_ISSUER": ISSUER,
        "MDB_REALTIME_JWT_AUDIENCE": AUDIENCE,
        "MDB_REALTIME_JWKS_MIN_REFETCH_SECONDS": str(min_refetch_seconds),
    }


class JwksServer:
    """Serves `/jwks` (the current keys) and counts the requests."""

    def __init__(self, keys: list[SigningKey]) -> None:
        self.keys = list(keys)
        self.requests = 0
        self.delay = 0.0  # seconds each answer waits (a slow provider)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/jwks"

    def document(self) -> bytes:
        with self._lock:
            return json.dumps({"keys": [key.public_jwk() for key in self.keys]}).encode()

    def rotate(self, keys: list[SigningKey]) -> None:
        with self._lock:
            self.keys = list(keys)

    def start(self) -> JwksServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with owner._lock:
                    owner.requests += 1
                time.sleep(owner.delay)
                if self.path != "/jwks":
                    self.send_error(404)
                    return
                body = owner.document()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
