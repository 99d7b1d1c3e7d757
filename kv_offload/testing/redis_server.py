# SPDX-License-Identifier: Apache-2.0
"""A real, private ``redis-server`` for tests, the demo and benchmarks.

The remote tier's Redis adapter is tested against the real server, with the setups a
deployment has (a password, an ACL user, TLS with its own CA, ``maxmemory`` with
``noeviction``) and the faults it meets (a crash, a stall, a restart that lost the data).
:class:`RedisServer` starts one on 127.0.0.1 on a free port, in a private temporary directory
(mode 0700) that holds its config file (0600: the passwords are not on the command line, where
``ps`` would show them), its log and its TLS files, and removes everything when stopped or at
exit. Nothing is persisted (``save ""``, ``appendonly no``): a restart loses all values, as a
store that lost a node does.

``python -m kv_offload.testing.redis_server`` runs one in the foreground and prints its URL.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

from kv_offload.testing.store_process import ManagedProcess, StoreServer, StoreStartError, free_port, launch
from kv_offload.tiers.remote.url import redact

__all__ = ["RedisServer", "StoreStartError"]

_INSTALL_HINT = "redis-server is not installed (on Debian/Ubuntu: apt-get install redis-server)"


def _conf_string(value: str, what: str) -> str:
    """``value`` as one double-quoted redis.conf token."""
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"{what} must not contain control characters")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class RedisServer(StoreServer):
    """One ``redis-server`` child process (see the module docstring).

    Args:
        port: the port to listen on (None: a free one, kept across :meth:`restart`).
        password: the default user's password (``requirepass``); None: a random one;
            ``""``: no password at all.
        user, user_password: an extra ACL user with all rights, and the URL then names it
            (``user_password`` None: a random one).
        tls: serve TLS only (``rediss://``), with a CA and server certificate (for 127.0.0.1
            and ``localhost``) made with the ``openssl`` CLI; see :attr:`ca_file`.
        tls_client_certs: with ``tls``, also require a client certificate signed by that CA
            (:attr:`client_cert_file`, :attr:`client_key_file`).
        maxmemory: e.g. ``"2mb"`` (None: no limit); with ``maxmemory_policy``.
        start_timeout_s: how long :meth:`start` waits for the server to answer.
        executable: the server program (``valkey-server`` speaks the same protocol).
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        password: str | None = None,
        user: str | None = None,
        user_password: str | None = None,
        tls: bool = False,
        tls_client_certs: bool = False,
        maxmemory: str | None = None,
        maxmemory_policy: str = "noeviction",
        start_timeout_s: float = 10.0,
        executable: str = "redis-server",
    ) -> None:
        super().__init__()
        self.password = secrets.token_hex(16) if password is None else password
        self.user = user
        self.user_password = (secrets.token_hex(16) if user_password is None else user_password) if user else None
        self.tls = tls
        self.tls_client_certs = tls and tls_client_certs
        self.maxmemory = maxmemory
        self.maxmemory_policy = maxmemory_policy
        self.start_timeout_s = start_timeout_s
        self.executable = executable
        self._port = port
        self._proc: ManagedProcess | None = None

    # -- what a client needs ------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the server has no port yet: call start() first")
        return self._port

    @property
    def url(self) -> str:
        """``redis://`` (``rediss://`` with TLS) URL with the credentials: never log it, show
        :attr:`shown_url`."""
        if self.user:
            auth = f"{quote(self.user, safe='')}:{quote(self.user_password or '', safe='')}@"
        elif self.password:
            auth = f":{quote(self.password, safe='')}@"
        else:
            auth = ""
        return f"{'rediss' if self.tls else 'redis'}://{auth}127.0.0.1:{self.port}/0"

    @property
    def shown_url(self) -> str:
        return redact(self.url)

    @property
    def directory(self) -> Path:
        if self._dir is None:
            raise RuntimeError("the server has no directory yet: call start() first")
        return self._dir

    @property
    def ca_file(self) -> Path | None:
        return self.directory / "ca.crt" if self.tls else None

    @property
    def client_cert_file(self) -> Path | None:
        return self.directory / "client.crt" if self.tls_client_certs else None

    @property
    def client_key_file(self) -> Path | None:
        return self.directory / "client.key" if self.tls_client_certs else None

    @property
    def log_file(self) -> Path:
        return self.directory / "redis.log"

    def running(self) -> bool:
        return self._proc is not None and self._proc.running()

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> RedisServer:
        """Start the server and wait until it answers; :class:`StoreStartError` (with the
        log's tail) when it cannot."""
        if self.running():
            return self
        binary = shutil.which(self.executable)
        if binary is None:
            raise StoreStartError(_INSTALL_HINT if self.executable == "redis-server" else f"{self.executable!r} is not installed")
        if self._dir is None:
            self._make_directory("kvo-redis-")
            if self._port is None:
                self._port = free_port()
            if self.tls:
                self._make_certificates()
            self._write_config()
        self._proc = launch(
            f"redis-server on port {self.port}", [binary, str(self.directory / "redis.conf")], log=self.log_file,
            cwd=self.directory, ready=self._answers, timeout_s=self.start_timeout_s,
        )  # fmt: skip
        return self

    def _processes(self) -> list[ManagedProcess]:
        return [self._proc] if self._proc is not None else []

    def __repr__(self) -> str:
        state = "running" if self.running() else "stopped"
        return f"RedisServer({self.shown_url if self._port is not None else 'no port yet'}, {state})"

    # -- internals ----------------------------------------------------------------------

    def _answers(self) -> bool:
        """Whether the server answers an inline PING (any reply, NOAUTH included)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as raw:
            sock: socket.socket = raw
            if self.tls:
                ctx = ssl.create_default_context(cafile=str(self.ca_file))
                if self.tls_client_certs:
                    ctx.load_cert_chain(str(self.client_cert_file), str(self.client_key_file))
                sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
            sock.sendall(b"PING\r\n")
            return sock.recv(64)[:1] in (b"+", b"-")

    def _write_config(self) -> None:
        d = self.directory
        lines = [
            "bind 127.0.0.1",
            f"dir {_conf_string(str(d), 'directory')}",
            'logfile ""',  # stdout, which is the log file
            "daemonize no",
            'save ""',
            "appendonly no",
        ]
        if self.tls:
            lines += [
                "port 0",
                f"tls-port {self.port}",
                f"tls-cert-file {d / 'server.crt'}",
                f"tls-key-file {d / 'server.key'}",
                f"tls-ca-cert-file {d / 'ca.crt'}",
                f"tls-auth-clients {'yes' if self.tls_client_certs else 'no'}",
            ]
        else:
            lines.append(f"port {self.port}")
        if self.password:
            lines.append(f"requirepass {_conf_string(self.password, 'password')}")
        if self.user:
            pw = _conf_string(">" + (self.user_password or ""), "user_password")
            lines.append(f"user {_conf_string(self.user, 'user')} on {pw} ~* &* +@all")
        if self.maxmemory is not None:
            lines += [f"maxmemory {_conf_string(self.maxmemory, 'maxmemory')}", f"maxmemory-policy {self.maxmemory_policy}"]
        conf = d / "redis.conf"
        conf.touch(mode=0o600)
        conf.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def _make_certificates(self) -> None:
        """A throwaway CA, and a server (and client) certificate it signed, P-256 keys."""
        d = self.directory
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        self._openssl(["req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=kv-offload test CA",
                       "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"])  # fmt: skip
        names = [("server", "serverAuth", "subjectAltName=IP:127.0.0.1,DNS:localhost\n")]
        if self.tls_client_certs:
            names.append(("client", "clientAuth", ""))
        for name, usage, san in names:
            (d / f"{name}.ext").write_text(
                f"basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage={usage}\n"
                f"authorityKeyIdentifier=keyid,issuer\nsubjectKeyIdentifier=hash\n{san}"
            )  # fmt: skip
            self._openssl(["req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=kv-offload test {name}"])
            self._openssl(["x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                           "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext"])  # fmt: skip

    def _openssl(self, args: list[str]) -> None:
        binary = shutil.which("openssl")
        if binary is None:
            raise StoreStartError("the openssl command is needed to make TLS certificates (apt-get install openssl)")
        done = subprocess.run([binary, *args], cwd=self.directory, capture_output=True, timeout=30, check=False)
        if done.returncode != 0:
            raise StoreStartError(f"openssl {args[0]} failed: {done.stderr.decode('utf-8', 'replace')[-1000:]}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kv_offload.testing.redis_server",
                                     description="Run a private redis-server in the foreground (Ctrl-C stops it).")  # fmt: skip
    parser.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    parser.add_argument("--password", default=None, help='password (default: a random one; "" for none)')
    parser.add_argument("--user", default=None, help="also create this ACL user (random password)")
    parser.add_argument("--tls", action="store_true", help="serve TLS only, with a throwaway CA")
    parser.add_argument("--maxmemory", default=None, help='e.g. "1gb" (policy noeviction)')
    parser.add_argument("--show-password", action="store_true", help="print the URL with its credentials")
    args = parser.parse_args(argv)
    server = RedisServer(port=args.port, password=args.password, user=args.user, tls=args.tls, maxmemory=args.maxmemory)
    try:
        server.start()
    except StoreStartError as exc:
        raise SystemExit(f"error: {exc}") from None
    try:
        print(server.url if args.show_password else server.shown_url, flush=True)
        if server.ca_file is not None:
            print(f"CA certificate: {server.ca_file}", flush=True)
        print(f"log: {server.log_file}", flush=True)
        signal.signal(signal.SIGTERM, _interrupt)
        while server.running():
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
