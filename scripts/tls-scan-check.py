#!/usr/bin/env python3
"""Reads sslyze's JSON (scripts/tls-scan) and fails on findings of medium severity or worse.

Usage: tls-scan-check.py SSLYZE_JSON PKI_DIR PORT

Prints one line per check (ok / ACCEPTED / FAIL) and exits 1 if any check fails. Accepted
deviations are listed in docs/TLS-SCAN.md. It also checks, outside sslyze, that the listener
really requires a client certificate and that the scanner's certificate reaches the backend, so
the scan is known to have hit the mTLS path it claims to describe.
"""
import json
import socket
import ssl
import sys

AEAD = ("_GCM_", "CHACHA20_POLY1305", "_CCM")
WEAK = ("NULL", "EXPORT", "RC4", "DES", "anon", "MD5", "IDEA", "SEED")

failures = []


def report(ok, what, accepted=False):
    tag = "ok" if ok else ("ACCEPTED" if accepted else "FAIL")
    print(f"  {tag:8} {what}")
    if not ok and not accepted:
        failures.append(what)


def result(scan, name):
    entry = scan[name]
    if entry["status"] != "COMPLETED":
        report(False, f"{name}: scan did not complete ({entry.get('error_reason')})")
        return None
    return entry["result"]


def main():
    path, pki, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with open(path) as f:
        doc = json.load(f)
    servers = doc["server_scan_results"]
    if len(servers) != 1 or servers[0]["connectivity_status"] != "COMPLETED":
        print("FAIL: sslyze could not connect", file=sys.stderr)
        sys.exit(1)
    scan = servers[0]["scan_result"]

    print("protocols")
    for name, label in [
        ("ssl_2_0_cipher_suites", "SSL 2.0"),
        ("ssl_3_0_cipher_suites", "SSL 3.0"),
        ("tls_1_0_cipher_suites", "TLS 1.0"),
        ("tls_1_1_cipher_suites", "TLS 1.1"),
    ]:
        r = result(scan, name)
        if r is not None:
            report(not r["accepted_cipher_suites"], f"{label} refused")
    for name, label in [("tls_1_2_cipher_suites", "TLS 1.2"), ("tls_1_3_cipher_suites", "TLS 1.3")]:
        r = result(scan, name)
        if r is None:
            continue
        suites = r["accepted_cipher_suites"]
        print(f"  {'info':8} {label}: {len(suites)} suite(s) accepted")
        for accepted in suites:
            suite = accepted["cipher_suite"]["name"]
            key = accepted.get("ephemeral_key") or {}
            kind, size = key.get("type_name"), key.get("size") or 0
            problems = [w for w in WEAK if w in suite]
            if not any(a in suite for a in AEAD):
                problems.append("not AEAD (CBC or stream)")
            if label == "TLS 1.2" and "DHE_" not in suite:
                problems.append("no forward secrecy")
            if accepted["cipher_suite"]["key_size"] < 128:
                problems.append("key under 128 bits")
            if kind == "DH" and size < 2048:
                problems.append(f"weak DH group ({size} bits)")
            if kind == "ECDH" and size < 224:  # X25519 reports 253
                problems.append(f"weak ECDH group ({size} bits)")
            if not kind:
                problems.append("no ephemeral key exchange")
            group = key.get("curve_name") or f"{kind} {size}"
            report(not problems, f"{label} {suite} ({group})" + (f": {', '.join(problems)}" if problems else ""))

    print("vulnerabilities")
    r = result(scan, "heartbleed")
    if r is not None:
        report(not r["is_vulnerable_to_heartbleed"], "not vulnerable to Heartbleed")
    r = result(scan, "openssl_ccs_injection")
    if r is not None:
        report(not r["is_vulnerable_to_ccs_injection"], "not vulnerable to OpenSSL CCS injection")
    r = result(scan, "robot")
    if r is not None:
        report(r["robot_result"].startswith("NOT_VULNERABLE"), f"ROBOT: {r['robot_result']}")
    r = result(scan, "tls_compression")
    if r is not None:
        report(not r["supports_compression"], "no TLS compression (CRIME)")
    r = result(scan, "session_renegotiation")
    if r is not None:
        report(r["supports_secure_renegotiation"], "secure renegotiation indication (RFC 5746)")
        report(not r["is_vulnerable_to_client_renegotiation_dos"], "client-initiated renegotiation refused")
    r = result(scan, "tls_1_3_early_data")
    if r is not None:
        report(not r["supports_early_data"], "no TLS 1.3 early data (0-RTT replay)")
    r = result(scan, "tls_extended_master_secret")
    if r is not None:
        report(r["supports_ems_extension"], "extended master secret (RFC 7627)")
    r = result(scan, "tls_fallback_scsv")
    if r is not None:
        report(r["supports_fallback_scsv"], "TLS_FALLBACK_SCSV honoured", accepted=True)
    r = result(scan, "elliptic_curves")
    if r is not None:
        curves = [c["name"] for c in r["supported_curves"]]
        print(f"  {'info':8} groups: {', '.join(curves)}")
    r = result(scan, "session_resumption")
    if r is not None:
        print(
            f"  {'info':8} resumption: session IDs {r['session_id_resumption_result']}, "
            f"tickets {r['tls_ticket_resumption_result']}"
        )

    print("certificate")
    r = result(scan, "certificate_info")
    if r is not None:
        for deployment in r["certificate_deployments"]:
            leaf = deployment["received_certificate_chain"][0]
            print(f"  {'info':8} leaf {leaf['subject']['rfc4514_string']}, "
                  f"{leaf['signature_algorithm_oid']['name']}, until {leaf['not_valid_after']}")
            report(deployment["received_chain_has_valid_order"], "chain in valid order")
            report(not deployment["verified_chain_has_sha1_signature"], "no SHA-1 signature in the chain")
            report(leaf["signature_hash_algorithm"]["name"] not in ("md5", "sha1"), "leaf not signed with MD5/SHA-1")
            names = leaf["subject_alternative_name"]["dns_names"]
            report("localhost" in names, "leaf names the scanned host (localhost)")
            for validation in deployment["path_validation_results"]:
                store = validation["trust_store"]["name"]
                ok = validation["was_validation_successful"]
                if store == "Supplied CA file":
                    report(ok, "chain validates against the dev CA")
                else:
                    report(ok, f"chain validates against the {store} store (dev CA is private)", accepted=True)
            report(deployment["ocsp_response"] is not None, "OCSP response stapled", accepted=True)

    print("mTLS (outside sslyze)")
    report(refuses_without_client_cert(pki, port), "a handshake without a client certificate is refused")
    report(serves_scanner(pki, port), "the scanner's certificate reaches the backend")

    if failures:
        print(f"FAIL: {len(failures)} finding(s) of medium severity or worse:", file=sys.stderr)
        for f in failures:
            print(f"  - {f}", file=sys.stderr)
        sys.exit(1)
    print("no finding of medium severity or worse")


def exchange(pki, port, client_cert):
    ctx = ssl.create_default_context(cafile=f"{pki}/ca.pem")
    if client_cert:
        ctx.load_cert_chain(f"{pki}/scanner.pem", f"{pki}/scanner.key")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := tls.recv(4096):
                data += chunk
            return data


def refuses_without_client_cert(pki, port):
    try:
        return b"Hello world" not in exchange(pki, port, client_cert=False)
    except (ssl.SSLError, ConnectionError):
        return True


def serves_scanner(pki, port):
    try:
        return b"Hello world from server 1" in exchange(pki, port, client_cert=True)
    except (ssl.SSLError, OSError) as e:
        print(f"  {'info':8} scanner connection failed: {e}")
        return False


if __name__ == "__main__":
    main()
