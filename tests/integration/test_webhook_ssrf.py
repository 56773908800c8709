"""Webhook SSRF guard: private, loopback, link-local and unique-local targets are refused at batch
creation (API) and on delivery, including through redirects. No traffic leaves the machine: the API
checks IP literals (resolved without DNS), and hostnames are resolved by a monkeypatched getaddrinfo."""

from __future__ import annotations

import http.server
import socket
import ssl
import subprocess
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from api import service
from api.problems import Problem
from api.schemas import BatchOptions
from core.settings import reset_settings_cache
from core.webhook_security import WebhookRefused, check_url
from tests.api_helpers import ApiServer, make_key, sine_wav
from worker.webhook_delivery import post_guarded

# One address per refused range, as the URL host (IPv6 in brackets).
PRIVATE_HOSTS = {
    "loopback": "127.0.0.1",
    "loopback-high": "127.254.3.9",
    "rfc1918-10": "10.1.2.3",
    "rfc1918-172": "172.20.0.5",
    "rfc1918-192": "192.168.1.10",
    "link-local-metadata": "169.254.169.254",
    "ipv6-loopback": "[::1]",
    "ipv6-unique-local": "[fd12:3456::1]",
    "ipv6-unique-local-fc": "[fc00::7]",
    "ipv4-mapped-loopback": "[::ffff:127.0.0.1]",
}
PUBLIC_ADDRESS = "93.184.216.34"


def _problem(resp: httpx.Response, status: int, code: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    assert resp.json()["code"] == code


@pytest.mark.parametrize("host", list(PRIVATE_HOSTS.values()), ids=list(PRIVATE_HOSTS))
def test_batch_creation_refuses_webhooks_to_private_addresses(api: ApiServer, host: str) -> None:
    with api.client(make_key("acme")) as c:
        url = f"http://{host}:8080/hook"
        _problem(c.post("/v1/batches", json={"webhook_url": url}), 422, "webhook_url_forbidden")
        # the one-file endpoint takes batch options as form fields: refused before anything is stored
        single = c.post(
            "/v1/jobs",
            files=[("file", ("a.wav", sine_wav(0.5), "audio/wav"))],
            data={"webhook_url": f"https://{host}/x"},
        )
        _problem(single, 422, "webhook_url_forbidden")
        assert c.get("/v1/batches").json()["items"] == []


def test_public_and_unresolvable_hosts_are_accepted_at_creation(api: ApiServer) -> None:
    with api.client(make_key("acme")) as c:
        public = c.post("/v1/batches", json={"webhook_url": f"https://{PUBLIC_ADDRESS}/hook"})
        assert public.status_code == 201, public.text
        assert public.json()["webhook_url"] == f"https://{PUBLIC_ADDRESS}/hook"
        # DNS may be down right now; every delivery checks the URL again before sending
        later = c.post("/v1/batches", json={"webhook_url": "https://hooks.voxq-test.invalid/x"})
        assert later.status_code == 201, later.text


def _named(request: httpx.Request) -> str:
    """The URL a request was for: it is addressed to the checked IP, and names its host in `Host`."""
    return f"{request.url.scheme}://{request.headers['host']}{request.url.raw_path.decode()}"


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Hostnames resolved by a fake getaddrinfo (unknown names fail as DNS would)."""
    table: dict[str, str] = {}
    real = socket.getaddrinfo

    def fake(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name in table:
            addr = table[name]
            family = socket.AF_INET6 if ":" in addr else socket.AF_INET
            sockaddr: tuple[Any, ...] = (addr, port or 0, 0, 0) if family == socket.AF_INET6 else (addr, port)
            return [(family, socket.SOCK_STREAM, 6, "", sockaddr)]
        if name.endswith(".example"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return table


@pytest.mark.parametrize(
    "address",
    [
        *("127.0.0.1", "127.8.8.8", "10.0.0.1", "172.16.0.1", "172.31.255.254", "192.168.0.1"),
        *("169.254.1.1", "::1", "fc00::1", "fdff:ffff::1", "fe80::1", "::ffff:10.0.0.1", "0.0.0.0"),
        "100.64.0.1",
    ],
)
def test_hostnames_resolving_to_private_ranges_are_refused(resolver: dict[str, str], address: str) -> None:
    resolver["hook.example"] = address
    with pytest.raises(WebhookRefused, match="non-public"):
        check_url("https://hook.example/x", allow_private=False)
    # and the API's creation check turns it into the stable problem code
    with pytest.raises(Problem) as info:
        service.check_webhook(BatchOptions(webhook_url="https://hook.example/x"))  # type: ignore[arg-type]
    assert info.value.code == "webhook_url_forbidden" and info.value.status == 422
    check_url("https://hook.example/x", allow_private=True)  # development switch


def test_a_host_with_one_private_address_among_public_ones_is_refused(
    resolver: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = socket.getaddrinfo

    def mixed(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "rebind.example":
            return [
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", (PUBLIC_ADDRESS, port)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.9.9.9", port)),
            ]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", mixed)
    with pytest.raises(WebhookRefused, match="non-public"):
        check_url("http://rebind.example/", allow_private=False)


def test_settings_switch_allows_private_addresses_at_creation(
    resolver: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    resolver["dev.example"] = "127.0.0.1"
    monkeypatch.setenv("VOXQ_WEBHOOK_ALLOW_PRIVATE", "true")
    reset_settings_cache()
    try:
        service.check_webhook(BatchOptions(webhook_url="http://dev.example/x"))  # type: ignore[arg-type]
    finally:
        monkeypatch.delenv("VOXQ_WEBHOOK_ALLOW_PRIVATE")
        reset_settings_cache()
    with pytest.raises(Problem):
        service.check_webhook(BatchOptions(webhook_url="http://dev.example/x"))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "target",
    ["http://internal.example/admin", "http://169.254.169.254/latest/meta-data/", "http://[::1]:6379/"],
)
def test_redirects_to_private_addresses_are_refused_before_the_second_request(
    resolver: dict[str, str], target: str
) -> None:
    resolver["hooks.example"] = PUBLIC_ADDRESS
    resolver["internal.example"] = "192.168.10.20"
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        # a transport in process: nothing is sent over the network
        seen.append(_named(request))
        return httpx.Response(302, headers={"Location": target})

    with pytest.raises(WebhookRefused, match="non-public"):
        post_guarded(
            "https://hooks.example/in",
            b"{}",
            {},
            allow_private=False,
            transport=httpx.MockTransport(handler),
        )
    assert seen == ["https://hooks.example/in"]


def test_redirect_to_a_public_host_is_followed(resolver: dict[str, str]) -> None:
    resolver["hooks.example"] = PUBLIC_ADDRESS
    resolver["next.example"] = "93.184.216.35"
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(_named(request))
        if request.headers["host"] == "hooks.example":
            return httpx.Response(307, headers={"Location": "https://next.example/final"})
        return httpx.Response(204)

    resp = post_guarded(
        "https://hooks.example/in", b"{}", {}, allow_private=False, transport=httpx.MockTransport(handler)
    )
    assert resp.status_code == 204
    assert seen == ["https://hooks.example/in", "https://next.example/final"]


def _tls_server(tmp_path: Path, name: str) -> tuple[Path, http.server.HTTPServer]:
    """An HTTPS server on 127.0.0.1 with a self-signed certificate for `name` (answers 204, records Host)."""
    cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name}",
         "-addext", f"subjectAltName=DNS:{name}", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip

    class Handler(http.server.BaseHTTPRequestHandler):
        hosts: list[str] = []

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            type(self).hosts.append(self.headers["Host"])
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return cert, server


def test_a_pinned_tls_connection_verifies_the_certificate_for_the_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sent to the checked address over a real socket, the TLS handshake names the host and its
    certificate is verified for that name: a certificate for another name is refused."""
    cert, server = _tls_server(tmp_path, "hooks.test")
    port = server.server_address[1]
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    try:
        response = post_guarded(
            f"https://hooks.test:{port}/in",
            b"{}",
            {},
            allow_private=True,
            resolver=lambda h, p: ["127.0.0.1"],
        )
        assert response.status_code == 204
        assert server.RequestHandlerClass.hosts == [f"hooks.test:{port}"]  # type: ignore[attr-defined]
        with pytest.raises(httpx.ConnectError, match=r"CERTIFICATE_VERIFY_FAILED|match"):
            post_guarded(
                f"https://other.test:{port}/in",
                b"{}",
                {},
                allow_private=True,
                resolver=lambda h, p: ["127.0.0.1"],
            )
    finally:
        server.shutdown()
        server.server_close()
