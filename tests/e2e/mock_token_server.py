#!/usr/bin/env python3
"""A local stand-in for the OAuth token endpoint and the profile endpoint
that the real Claude Code CLI talks to, for the end-to-end tests.

It serves HTTPS for platform.claude.com and api.anthropic.com (the test
points both names at 127.0.0.1 inside a private network namespace), with a
throw-away CA it makes at start. Refresh tokens are single-use, as the real
ones are: each refresh rotates the pair, and a refresh token used a second
time (or never issued) gets `invalid_grant`.

Nothing secret leaves it: the request log (`requests.jsonl`) records what
was asked and the outcome, and names issued tokens by the first 12 hex
digits of the SHA-256 of the access token only.

Files in --dir:
  ca.pem             the CA to trust (NODE_EXTRA_CA_CERTS)
  seed.json          credentials for a fresh chain (rewritten on SIGUSR1)
  requests.jsonl     one line per request
  ready              written once the server listens
"""
import argparse
import hashlib
import http.server
import json
import os
import secrets
import signal
import ssl
import subprocess
import threading
import time

NAMES = ["platform.claude.com", "api.anthropic.com"]
SCOPES = "user:inference user:profile user:sessions:claude_code"


def sha12(token):
    return hashlib.sha256(token.encode()).hexdigest()[:12]


def peer_uid(port, server_port):
    """The uid owning the client end of a loopback connection from `port`
    (the mock runs in the container's network namespace: /proc/net/tcp*
    lists the container's sockets), or None."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    local, remote, uid = fields[1], fields[2], fields[7]
                    if (int(local.rsplit(":", 1)[1], 16) == port
                            and int(remote.rsplit(":", 1)[1], 16) == server_port):
                        return int(uid)
        except OSError:
            pass
    return None


def make_certs(d):
    """A CA and a server certificate for NAMES, made with openssl."""
    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", "/CN=cred-watch e2e CA", "-keyout", f"{d}/ca.key", "-out", f"{d}/ca.pem")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={NAMES[0]}",
        "-keyout", f"{d}/server.key", "-out", f"{d}/server.csr")
    with open(f"{d}/san.ext", "w") as f:
        f.write("subjectAltName=" + ",".join(f"DNS:{n}" for n in NAMES) + "\n")
    run("x509", "-req", "-in", f"{d}/server.csr", "-CA", f"{d}/ca.pem", "-CAkey", f"{d}/ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", f"{d}/san.ext", "-out", f"{d}/server.pem")


class Chain:
    """The issued refresh tokens: live ones may be used once."""

    def __init__(self, expires_in):
        self.lock = threading.Lock()
        self.live = set()
        self.used = set()
        self.expires_in = expires_in

    def issue(self):
        access = "sk-ant-oat01-" + secrets.token_urlsafe(64)
        refresh = "sk-ant-ort01-" + secrets.token_urlsafe(64)
        self.live.add(refresh)
        return access, refresh

    def refresh(self, token):
        """New (access, refresh) for a live refresh token, else None."""
        with self.lock:
            if token not in self.live:
                return None
            self.live.discard(token)
            self.used.add(token)
            return self.issue()

    def seed(self, path, expires_in):
        """Writes credentials for a new chain, as the CLI would after /login."""
        with self.lock:
            access, refresh = self.issue()
        creds = {"claudeAiOauth": {
            "accessToken": access, "refreshToken": refresh,
            "expiresAt": int(time.time() * 1000) + expires_in * 1000,
            "scopes": SCOPES.split(), "subscriptionType": "max",
        }}
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(creds, f)
        os.rename(tmp, path)
        return sha12(access)


def handler(chain, log, port):
    log_lock = threading.Lock()

    def record(entry, client):
        entry["t_ms"] = int(time.time() * 1000)
        entry["uid"] = peer_uid(client[1], port)
        with log_lock, open(log, "a") as f:
            f.write(json.dumps(entry) + "\n")

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def reply(self, code, body):
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("request-id", "req_" + secrets.token_hex(8))
            self.end_headers()
            self.wfile.write(data)

        def body(self):
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n) if n else b""
            try:
                return json.loads(raw or b"{}")
            except ValueError:
                return dict(p.split("=", 1) for p in raw.decode().split("&") if "=" in p)

        def do_POST(self):
            host = (self.headers.get("Host") or "").split(":")[0]
            path = self.path.split("?")[0]
            if path != "/v1/oauth/token":
                record({"host": host, "method": "POST", "path": path, "kind": "other"}, self.client_address)
                return self.reply(404, {"error": "not_found"})
            req = self.body()
            if req.get("grant_type") != "refresh_token":
                record({"host": host, "path": path, "kind": "token", "result": "unsupported_grant"}, self.client_address)
                return self.reply(400, {"error": "unsupported_grant_type"})
            pair = chain.refresh(req.get("refresh_token", ""))
            if pair is None:
                record({"host": host, "path": path, "kind": "refresh", "result": "invalid_grant"}, self.client_address)
                return self.reply(400, {"error": "invalid_grant",
                                        "error_description": "Refresh token not found or invalid"})
            access, refresh = pair
            record({"host": host, "path": path, "kind": "refresh", "result": "ok",
                    "issued": sha12(access), "expires_in": chain.expires_in}, self.client_address)
            self.reply(200, {
                "token_type": "Bearer", "access_token": access, "refresh_token": refresh,
                "expires_in": chain.expires_in, "scope": req.get("scope") or SCOPES,
                "account": {"uuid": "00000000-0000-4000-8000-000000000001",
                            "email_address": "e2e@example.invalid"},
                "organization": {"uuid": "00000000-0000-4000-8000-000000000002",
                                 "name": "cred-watch e2e"},
            })

        def do_GET(self):
            host = (self.headers.get("Host") or "").split(":")[0]
            path = self.path.split("?")[0]
            if path != "/api/oauth/profile":
                record({"host": host, "method": "GET", "path": path, "kind": "other"}, self.client_address)
                return self.reply(404, {"error": "not_found"})
            record({"host": host, "path": path, "kind": "profile"}, self.client_address)
            self.reply(200, {
                "account": {"uuid": "00000000-0000-4000-8000-000000000001",
                            "email": "e2e@example.invalid", "email_address": "e2e@example.invalid",
                            "full_name": "cred-watch e2e", "display_name": "e2e",
                            "has_claude_max": True, "has_claude_pro": False,
                            "created_at": "2025-01-01T00:00:00Z"},
                "organization": {"uuid": "00000000-0000-4000-8000-000000000002",
                                 "name": "cred-watch e2e", "organization_type": "claude_max",
                                 "billing_type": "stripe_subscription",
                                 "rate_limit_tier": "default_claude_max_20x",
                                 "has_extra_usage_enabled": False},
            })

    return Handler


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--port", type=int, default=443)
    ap.add_argument("--expires-in", type=int, default=250, help="seconds, for refreshed tokens")
    ap.add_argument("--seed-expires-in", type=int, default=240, help="seconds, for seed.json")
    args = ap.parse_args()
    d = args.dir
    make_certs(d)
    chain = Chain(args.expires_in)
    seed = os.path.join(d, "seed.json")
    chain.seed(seed, args.seed_expires_in)
    # SIGUSR1: a new chain, as after a fresh /login.
    signal.signal(signal.SIGUSR1, lambda *_: chain.seed(seed, args.seed_expires_in))

    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port),
                                             handler(chain, os.path.join(d, "requests.jsonl"), args.port))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(f"{d}/server.pem", f"{d}/server.key")
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    with open(os.path.join(d, "ready"), "w") as f:
        f.write(str(os.getpid()))
    server.serve_forever()


if __name__ == "__main__":
    main()
