"""A throwaway Dovecot IMAP server (Debian's ``dovecot-imapd``): its own configuration,
maildirs and passwd-file in a temporary folder, plain IMAP and IMAPS (a certificate from a
CA made for the run) on spare loopback ports, and SASL XOAUTH2 checked against a local
OAuth2 introspection endpoint.  Stopped and removed afterwards.  The mailbox sync tests
and ``crm bench sync`` run against it."""
from __future__ import annotations

import datetime as dt
import grp
import http.server
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse

from bench.peers import free_port

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"


def available() -> bool:
    return os.path.exists(DOVECOT)


def _certificates(folder: str) -> str:
    """A CA and a server certificate for 127.0.0.1 signed by it; returns the CA's PEM."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "crm-insight test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
          .not_valid_after(now + dt.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    with open(os.path.join(folder, "cert.pem"), "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(os.path.join(folder, "key.pem"), "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return ca.public_bytes(serialization.Encoding.PEM).decode()


class _Introspection(http.server.BaseHTTPRequestHandler):
    """RFC 7662 token introspection: the tokens in ``server.tokens`` are active."""

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        form = urllib.parse.parse_qs(self.rfile.read(length).decode())
        token = (form.get("token") or [""])[0]
        user = self.server.tokens.get(token)
        body = json.dumps({"active": True, "username": user} if user else {"active": False}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Dovecot:
    """``Dovecot(users=n).start()``: users ``user1`` … ``user<n>`` with the passwords in
    ``users``; ``tokens[token] = name`` makes an OAuth2 access token valid for a user."""

    def __init__(self, users: int = 0):
        self.dir = tempfile.mkdtemp(prefix="crm-dovecot-")
        os.chmod(self.dir, 0o755)  # the auth process runs as the login user
        self.port, self.tls_port = free_port(), free_port()
        self.proc: subprocess.Popen | None = None
        self.tokens: dict[str, str] = {}
        self._http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Introspection)
        self._http.tokens = self.tokens
        self.ca_cert = _certificates(self.dir)
        self.users: dict[str, str] = {f"user{n}": f"pw-{n}-{os.urandom(6).hex()}" for n in range(1, users + 1)}

    def _config(self) -> str:
        me = pwd.getpwuid(os.getuid())
        group = grp.getgrgid(os.getgid()).gr_name
        root = os.getuid() == 0
        login_user = "dovenull" if root else me.pw_name
        internal_user = "dovecot" if root else me.pw_name
        d = self.dir
        # Mail is never accessed as root: as root, the mail processes run as dovecot's user.
        mail = pwd.getpwnam("dovecot") if root else me
        for sub in ("mail", "home"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
            os.chown(os.path.join(d, sub), mail.pw_uid, mail.pw_gid)
        return f"""
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
info_log_path = {d}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = yes
ssl_cert = <{d}/cert.pem
ssl_key = <{d}/key.pem
disable_plaintext_auth = no
auth_mechanisms = plain login xoauth2 oauthbearer
mail_location = maildir:{d}/mail/%u
first_valid_uid = 1
default_login_user = {login_user}
default_internal_user = {internal_user}
default_internal_group = {group if not root else 'dovecot'}
mail_max_userip_connections = 100
auth_failure_delay = 0
login_trusted_networks = 127.0.0.0/8
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {d}/passwd
}}
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {d}/oauth2.conf.ext
}}
userdb {{
  driver = static
  args = uid={mail.pw_uid} gid={mail.pw_gid} home={d}/home/%u
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {self.tls_port}
    ssl = yes
  }}
}}
service anvil {{
  chroot =
}}
service imap-login {{
  chroot =
}}
namespace inbox {{
  inbox = yes
  separator = /
  mailbox Sent {{
    special_use = \\Sent
    auto = subscribe
  }}
  mailbox Drafts {{
    special_use = \\Drafts
    auto = subscribe
  }}
}}
"""

    def _write_passwd(self) -> None:
        with open(os.path.join(self.dir, "passwd"), "w") as f:
            for name, password in self.users.items():
                f.write(f"{name}:{{PLAIN}}{password}::::::\n")

    def add_user(self, name: str, password: str) -> None:
        """A user, before :meth:`start` (Dovecot notices a rewritten passwd-file by its
        mtime, in whole seconds: users added while it runs could go unseen)."""
        assert self.proc is None, "add users before start()"
        self.users[name] = password

    def start(self) -> "Dovecot":
        threading.Thread(target=self._http.serve_forever, daemon=True).start()
        with open(os.path.join(self.dir, "oauth2.conf.ext"), "w") as f:
            f.write(f"introspection_mode = post\n"
                    f"introspection_url = http://127.0.0.1:{self._http.server_port}/introspect\n"
                    "username_attribute = username\nactive_attribute = active\nactive_value = true\n")
        self._write_passwd()
        with open(os.path.join(self.dir, "dovecot.conf"), "w") as f:
            f.write(self._config())
        self.proc = subprocess.Popen([DOVECOT, "-F", "-c", os.path.join(self.dir, "dovecot.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 20
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dovecot exited: {self.proc.stderr.read().decode()[-2000:]}\n{self.log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("dovecot did not listen within 20 s\n" + self.log())

    def log(self) -> str:
        try:
            with open(os.path.join(self.dir, "dovecot.log")) as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._http.shutdown()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- a client of the tests' own, for APPEND and folder changes -----------------------

    def client(self, user: str):
        from imapclient import IMAPClient
        c = IMAPClient("127.0.0.1", port=self.port, ssl=False, timeout=30)
        c.login(user, self.users[user])
        return c
