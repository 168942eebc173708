"""SCRAM-SHA-256 client: RFC 7677's exchange, and a server that cannot prove it knows the
password is refused."""

from __future__ import annotations

import base64

import pytest

from addons.database.scram import ScramClient, ScramError, md5_password

SERVER_FIRST = (b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")


def test_rfc7677_exchange() -> None:
    c = ScramClient("pencil", nonce="rOprNGfwEbeRWgbNEkqO", user="user")
    assert c.first() == b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    assert c.final(SERVER_FIRST) == (
        b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
        b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
    c.verify(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")


def test_wrong_server_signature_is_refused() -> None:
    c = ScramClient("pencil", nonce="rOprNGfwEbeRWgbNEkqO", user="user")
    c.final(SERVER_FIRST)
    with pytest.raises(ScramError, match="not the real server"):
        c.verify(b"v=" + base64.b64encode(b"\0" * 32))
    with pytest.raises(ScramError, match="refused"):
        c.verify(b"e=invalid-proof")


@pytest.mark.parametrize("server_first", [
    b"r=someoneelse,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",          # nonce not extended
    b"r=rOprNGfwEbeRWgbNEkqO,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",  # nonce not extended
    b"r=rOprNGfwEbeRWgbNEkqOx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=999999999",  # PBKDF2 DoS
    b"r=rOprNGfwEbeRWgbNEkqOx,s=!!,i=4096",
    b"garbage",
])
def test_bad_server_first(server_first: bytes) -> None:
    c = ScramClient("pencil", nonce="rOprNGfwEbeRWgbNEkqO")
    with pytest.raises(ScramError):
        c.final(server_first)


def test_verify_before_final_is_refused() -> None:
    with pytest.raises(ScramError):
        ScramClient("x").verify(b"v=" + base64.b64encode(b"\0" * 32))


def test_md5() -> None:
    # md5(md5("secret" + "bob") + salt), as libpq computes it
    assert md5_password("bob", "secret", b"\x01\x02\x03\x04").startswith(b"md5")
    assert len(md5_password("bob", "secret", b"\x01\x02\x03\x04")) == 35
