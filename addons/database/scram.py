"""SCRAM-SHA-256 client (RFC 5802 / 7677) for the gateway's own login to the database.

Pure: the relay feeds it the server's SASL messages. No channel binding (gs2 header `n,,`):
the server's identity is already proved by TLS verification where the rules ask for it, and
the gateway never offers SCRAM-SHA-256-PLUS, so a server that requires it refuses the login
rather than the gateway downgrading silently. The server's final signature is verified: a
server that does not know the password cannot complete the login.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import unicodedata

MECHANISM = "SCRAM-SHA-256"
MAX_ITERATIONS = 1_000_000  # bounds the PBKDF2 work a hostile server can ask for


class ScramError(Exception):
    pass


def _saslprep(password: str) -> str:
    # PostgreSQL applies SASLprep and falls back to the raw bytes when it fails; NFKC with
    # the mapped spaces removed covers what real passwords contain.
    return unicodedata.normalize("NFKC", password.replace("\u00ad", ""))


class ScramClient:
    def __init__(self, password: str, nonce: str | None = None, user: str = "") -> None:
        self.password = _saslprep(password).encode("utf-8")
        self.nonce = nonce or base64.b64encode(secrets.token_bytes(18)).decode()
        # PostgreSQL takes the user from the startup packet and ignores this one
        self.first_bare = f"n={user},r={self.nonce}"
        self._server_signature = b""

    def first(self) -> bytes:
        """client-first-message (PostgreSQL ignores the user name in it)."""
        return ("n,," + self.first_bare).encode()

    def final(self, server_first: bytes) -> bytes:
        try:
            text = server_first.decode("ascii")
            attrs = dict(p.split("=", 1) for p in text.split(","))
            nonce, salt, iters = attrs["r"], base64.b64decode(attrs["s"], validate=True), \
                int(attrs["i"])
        except (ValueError, KeyError, UnicodeDecodeError) as e:
            raise ScramError(f"bad server-first-message ({type(e).__name__})") from None
        if not nonce.startswith(self.nonce) or len(nonce) <= len(self.nonce):
            raise ScramError("server nonce does not extend ours")
        if not 1 <= iters <= MAX_ITERATIONS:
            raise ScramError(f"iteration count {iters} out of range")
        salted = hashlib.pbkdf2_hmac("sha256", self.password, salt, iters)
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        stored_key = hashlib.sha256(client_key).digest()
        without_proof = f"c=biws,r={nonce}"
        auth_message = f"{self.first_bare},{text},{without_proof}".encode()
        signature = hmac.digest(stored_key, auth_message, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        server_key = hmac.digest(salted, b"Server Key", "sha256")
        self._server_signature = hmac.digest(server_key, auth_message, "sha256")
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def verify(self, server_final: bytes) -> None:
        try:
            text = server_final.decode("ascii")
        except UnicodeDecodeError:
            raise ScramError("bad server-final-message") from None
        if text.startswith("e="):
            raise ScramError(f"server refused: {text[2:80]}")
        if not text.startswith("v="):
            raise ScramError("bad server-final-message")
        try:
            got = base64.b64decode(text[2:].split(",", 1)[0], validate=True)
        except ValueError:
            raise ScramError("bad server signature encoding") from None
        if not self._server_signature or not hmac.compare_digest(got, self._server_signature):
            raise ScramError("server signature does not match: not the real server")


def md5_password(user: str, password: str, salt: bytes) -> bytes:
    """PostgreSQL's md5 scheme: 'md5' + md5(md5(password + user) + salt)."""
    inner = hashlib.md5((password + user).encode()).hexdigest().encode()  # noqa: S324
    return b"md5" + hashlib.md5(inner + salt).hexdigest().encode()  # noqa: S324
