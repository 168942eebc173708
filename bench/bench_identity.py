"""Token verification cost per request: verified-token cache hit vs miss (no network).

Measured with the gateway's own code (addons.identity.jwt.TokenVerifier, keys already loaded
from a JWKS document, as after the first fetch):
- miss: strict parse + claim checks + signature verification (RS256 2048-bit, ES256 P-256),
  i.e. the first request with a new token;
- hit: sha256 of the token + cache look-up (every later request with the same token);
- through the addon: `Identity.requestheaders` on a mitmproxy test flow carrying
  `Authorization: Bearer <token>` (header parsing, verification, metadata, header strip).
Each figure is the median of several rounds, in microseconds per request.

Run alone: `python -m bench.bench_identity [--quick]`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from addons.identity.config import IdentityConfig, IssuerConfig
from addons.identity.jwt import TokenVerifier, parse_jwks, parse_token, select_key

ISSUER = "https://idp.bench.example"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _int_b64(n: int, size: int | None = None) -> str:
    size = size or (n.bit_length() + 7) // 8
    return _b64(n.to_bytes(size, "big"))


def _keys() -> tuple[dict[str, Any], dict[str, Any]]:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    rn = rsa_key.public_key().public_numbers()
    en = ec_key.public_key().public_numbers()
    jwks = {"keys": [
        {"kty": "RSA", "kid": "rsa1", "use": "sig", "alg": "RS256",
         "n": _int_b64(rn.n), "e": _int_b64(rn.e)},
        {"kty": "EC", "kid": "ec1", "use": "sig", "alg": "ES256", "crv": "P-256",
         "x": _int_b64(en.x, 32), "y": _int_b64(en.y, 32)},
    ]}
    return {"rsa1": rsa_key, "ec1": ec_key}, jwks


def _sign(kid: str, key: Any, claims: dict[str, Any]) -> str:
    alg = "RS256" if kid.startswith("rsa") else "ES256"
    header = {"alg": alg, "kid": kid, "typ": "JWT"}
    si = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}".encode()
    if alg == "RS256":
        sig = key.sign(si, padding.PKCS1v15(), hashes.SHA256())
    else:
        r, s = decode_dss_signature(key.sign(si, ec.ECDSA(hashes.SHA256())))
        sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return f"{si.decode()}.{_b64(sig)}"


def _claims(i: int) -> dict[str, Any]:
    now = int(time.time())
    # a realistic Kubernetes/Keycloak-sized token (~900 bytes)
    return {"iss": ISSUER, "sub": f"system:serviceaccount:agents:bot-{i}", "aud": ["agentgate"],
            "iat": now, "exp": now + 3600, "nbf": now, "jti": f"{i:032x}",
            "groups": ["support-bots", "agents", "tier-2"], "roles": ["caller"],
            "kubernetes.io": {"namespace": "agents", "pod": {"name": f"bot-{i}-7d9f",
                                                             "uid": "0" * 36}}}


def _config(cache_size: int) -> IdentityConfig:
    return IdentityConfig(issuers=(IssuerConfig(issuer=ISSUER, audiences=("agentgate",)),),
                          cache_size=cache_size)


def _median_us(fn: Any, n: int, rounds: int) -> float:
    per = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn(n)
        per.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(per)


def run(quick: bool = False) -> dict[str, Any]:
    n = 200 if quick else 2000
    rounds = 3 if quick else 5
    keys, jwks = _keys()
    table = parse_jwks(jwks)

    async def lookup(cfg: IssuerConfig, kid: str | None) -> Any:
        return select_key(table, kid)

    tokens = {kid: [_sign(kid, key, _claims(i)) for i in range(64)]
              for kid, key in keys.items()}
    loop = asyncio.new_event_loop()
    results: dict[str, Any] = {"iterations": n, "rounds": rounds,
                               "token_bytes": len(tokens["rsa1"][0])}

    def verify_loop(verifier: TokenVerifier, toks: list[str]) -> Any:
        async def go(k: int) -> None:
            for i in range(k):
                await verifier.verify(toks[i % len(toks)])
        return lambda k: loop.run_until_complete(go(k))

    for kid, label in (("rsa1", "rs256"), ("ec1", "es256")):
        miss = TokenVerifier(_config(0), lookup)       # cache off: every call verifies
        hit = TokenVerifier(_config(10000), lookup)
        loop.run_until_complete(hit.verify(tokens[kid][0]))
        results[f"{label}_miss_us"] = _median_us(verify_loop(miss, tokens[kid]), n, rounds)
        results[f"{label}_hit_us"] = _median_us(verify_loop(hit, tokens[kid][:1]), n * 5,
                                                rounds)
        results[f"{label}_hit_ratio"] = results[f"{label}_miss_us"] / results[f"{label}_hit_us"]

    # breakdown of a miss: parsing and claim checks vs the signature itself
    tok = tokens["rsa1"][0]
    results["parse_us"] = _median_us(lambda k: [parse_token(tok) for _ in range(k)], n, rounds)
    parsed = parse_token(tok)
    key = table["rsa1"]
    results["rs256_signature_us"] = _median_us(
        lambda k: [key.verifier("RS256").verify(parsed.signing_input, parsed.signature)
                   for _ in range(k)], n, rounds)

    results.update(_addon(loop, tokens["rsa1"], table, n, rounds))
    loop.close()
    return results


def _addon(loop: asyncio.AbstractEventLoop, toks: list[str], table: Any, n: int,
           rounds: int) -> dict[str, Any]:
    """Identity.requestheaders per request on a test flow (verifier cache hit and miss)."""
    from mitmproxy.test import taddons, tflow

    import addons.identity.addon as identity_mod
    from addons.config.holder import RulesHolder
    from addons.config.loader import load_rules
    from addons.identity.addon import Identity

    out: dict[str, Any] = {}
    for label, cache in (("addon_hit_us", 10000), ("addon_miss_us", 0)):
        with tempfile.TemporaryDirectory() as d:
            Path(d, "r.yaml").write_text(
                "upstreams:\n  - {name: openai, hosts: [api.openai.com], dialect: openai}\n"
                f"identity:\n  cache_size: {cache}\n  issuers:\n"
                f"    - {{issuer: '{ISSUER}', audience: agentgate}}\n")
            holder = RulesHolder(load_rules(d))
        addon = Identity(holder)

        async def lookup(cfg: IssuerConfig, kid: str | None) -> Any:
            return select_key(table, kid)
        state = identity_mod.state_for(holder)
        verifier = state.verifier_for(holder.rules)
        verifier.key_lookup = lookup
        flows = []
        for _ in range(n):
            f = tflow.tflow()
            f.request.host = "api.openai.com"
            f.metadata["upstream"] = {"name": "openai", "dialect": "openai"}
            flows.append(f)

        pick = (lambda i: toks[i % len(toks)]) if cache == 0 else (lambda i: toks[0])

        async def go(k: int, flows: list[Any] = flows, addon: Identity = addon,
                     pick: Any = pick) -> None:
            for i in range(k):
                f = flows[i]
                f.request.headers["authorization"] = f"Bearer {pick(i)}"
                f.response = None
                await addon.requestheaders(f)
                assert f.response is None
        with taddons.context(addon):
            out[label] = _median_us(lambda k: loop.run_until_complete(go(k)), n, rounds)
    return out


def markdown(results: dict[str, Any]) -> str:
    r = results
    lines = [
        "### Identity: token verification per request",
        "",
        f"Gateway code (`TokenVerifier`, keys already loaded), a {r['token_bytes']}-byte "
        f"token, median of {r['rounds']} rounds of {r['iterations']} requests.",
        "",
        "| case | µs / request |",
        "|---|---:|",
        f"| RS256 2048, cache miss (parse + claims + signature) | {r['rs256_miss_us']:.1f} |",
        f"| RS256, verified-token cache hit | {r['rs256_hit_us']:.2f} |",
        f"| ES256 P-256, cache miss | {r['es256_miss_us']:.1f} |",
        f"| ES256, cache hit | {r['es256_hit_us']:.2f} |",
        f"| of a miss: strict parse only | {r['parse_us']:.1f} |",
        f"| of a miss: RS256 signature only | {r['rs256_signature_us']:.1f} |",
        f"| addon `requestheaders`, cache hit | {r['addon_hit_us']:.1f} |",
        f"| addon `requestheaders`, cache miss (RS256) | {r['addon_miss_us']:.1f} |",
        "",
        f"A cache hit is {r['rs256_hit_ratio']:.0f}x cheaper than an RS256 verification "
        f"({r['es256_hit_ratio']:.0f}x for ES256). Tokens are cached by sha256 until their "
        "`exp` at most; JWKS fetches are not in these numbers (they happen once per issuer "
        "and at most once per `jwks_refresh_interval` on an unknown `kid`).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    res = run(quick="--quick" in sys.argv)
    print(json.dumps(res, indent=2))
    print(markdown(res))
