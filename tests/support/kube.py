"""A real Kubernetes API server on loopback, envtest-style: etcd and kube-apiserver (scripts/kube.sh builds
them from their Go modules), no kubelet and no controllers — so a namespace's `default` ServiceAccount is
created by whoever needs it. RBAC is on: an admin token (system:masters) for the test, and tokens of any
ServiceAccount through the TokenRequest API, so a Role is tested as what it lets through."""

from __future__ import annotations

import os
import secrets
import subprocess
import tempfile
from pathlib import Path

from tests.support.net import free_port
from tests.support.tools import start_process, stop_process


def binaries() -> Path:
    d = os.environ.get("RESILIENCE_PROXY_KUBE")
    if not d or not (Path(d) / "kube-apiserver").exists():
        raise RuntimeError("kube-apiserver not built: run `make test` (scripts/kube.sh builds etcd and "
                           "kube-apiserver once) or set RESILIENCE_PROXY_KUBE to its folder")
    return Path(d)


class ApiServer:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="kube-"))
        self.admin_token = secrets.token_hex(16)
        self.procs: list[subprocess.Popen] = []
        self.port = 0

    def start(self) -> ApiServer:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        bins = binaries()
        client, peer = free_port(), free_port()
        etcd = [str(bins / "etcd"), "--data-dir", str(self.dir / "etcd"), "--listen-client-urls",
                f"http://127.0.0.1:{client}", "--advertise-client-urls", f"http://127.0.0.1:{client}",
                "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{peer}", "--initial-cluster", f"default=http://127.0.0.1:{peer}",
                "--log-level", "error"]
        self.procs.append(start_process(etcd, lambda: _http_ok(f"http://127.0.0.1:{client}/health"), "etcd"))
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        (self.dir / "sa.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                            serialization.PrivateFormat.PKCS8,
                                                            serialization.NoEncryption()))
        (self.dir / "sa.pub").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        (self.dir / "tokens.csv").write_text(f"{self.admin_token},admin,admin,system:masters\n")
        self.port = free_port()
        api = [str(bins / "kube-apiserver"), "--etcd-servers", f"http://127.0.0.1:{client}",
               "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1", "--secure-port", str(self.port),
               "--cert-dir", str(self.dir / "certs"), "--token-auth-file", str(self.dir / "tokens.csv"),
               "--authorization-mode", "RBAC", "--service-account-issuer", "https://kubernetes.default.svc",
               "--service-account-key-file", str(self.dir / "sa.pub"),
               "--service-account-signing-key-file", str(self.dir / "sa.key"),
               "--service-cluster-ip-range", "10.96.0.0/24", "--endpoint-reconciler-type", "none",
               "--enable-priority-and-fairness=false", "--disable-admission-plugins", "ServiceAccount"]
        self.procs.append(start_process(api, self._ready, "kube-apiserver"))
        return self

    def _ready(self) -> bool:
        import ssl
        import urllib.request

        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        req = urllib.request.Request(f"https://127.0.0.1:{self.port}/readyz",
                                     headers={"Authorization": f"Bearer {self.admin_token}"})
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def client(self, token: str | None = None):
        """The official client's ApiClient, as `token` (default: the admin)."""
        import urllib3
        from kubernetes import client

        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)  # self-signed on loopback, on purpose

        cfg = client.Configuration()
        cfg.host = f"https://127.0.0.1:{self.port}"
        cfg.verify_ssl = False  # the API server's self-signed serving certificate
        cfg.api_key = {"authorization": f"Bearer {token or self.admin_token}"}
        return client.ApiClient(cfg)

    def kubeconfig(self) -> Path:
        """A kubeconfig for tools that take one (helm), as the admin."""
        import yaml

        path = self.dir / "kubeconfig"
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": f"https://127.0.0.1:{self.port}",
                                                      "insecure-skip-tls-verify": True}}],
            "users": [{"name": "admin", "user": {"token": self.admin_token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "admin"}}]}))
        path.chmod(0o600)
        return path

    @staticmethod
    def client_for_token(admin, token: str):
        """Another ApiClient to the same server as `admin`, as `token` (a ServiceAccount's)."""
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host, cfg.verify_ssl = admin.configuration.host, False
        cfg.api_key = {"authorization": f"Bearer {token}"}
        return client.ApiClient(cfg)

    def stop(self) -> None:
        for p in reversed(self.procs):
            stop_process(p)


def _http_ok(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False
