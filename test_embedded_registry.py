"""Tests for embedded_registry.py and download_system_images.py.

Fixture images are built here with tarfile/gzip/json, independently of the code under
test. Servers run on free loopback ports (port 0). Real clients (skopeo, containerd's
ctr, podman) are used where installed; with REQUIRE_REAL_CLIENTS=1 a missing one fails.
"""

import base64
import calendar
import collections
import contextlib
import copy
import gzip
import hashlib
import http.client
import io
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import stat
import ssl
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

import download_system_images as dsi
import embedded_registry as er

HERE = os.path.dirname(os.path.abspath(__file__))
REQUIRE_REAL_CLIENTS = os.environ.get("REQUIRE_REAL_CLIENTS") == "1"
MIRROR = "bootstrap-registry.airgap"
ACCEPT_CONTAINERD = ", ".join([er.DOCKER_MANIFEST, er.DOCKER_LIST, er.OCI_MANIFEST,
                               er.OCI_INDEX, "*/*"])


def need(tool):
    """The path of a real tool; skip (or fail, where CI requires them) when it is missing."""
    path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin")
    if path:
        return path
    message = "%s is not installed (apt-get install it, see .ci/run)" % tool
    if REQUIRE_REAL_CLIENTS:
        pytest.fail(message)
    pytest.skip(message)


def run(argv, **kwargs):
    """Run a command; on failure the assertion shows its output."""
    kwargs.setdefault("timeout", 300)
    result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, **kwargs)
    assert result.returncode == 0, "%s failed (%d):\n%s\n%s" % (
        " ".join(argv), result.returncode, result.stdout[-3000:], result.stderr[-3000:])
    return result


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --- Fixture images -------------------------------------------------------------------

def make_layer(files):
    """A reproducible gzipped tar of {path: bytes}; returns (compressed, uncompressed)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, data in sorted(files.items()):
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(data), 0o755, 0
            tar.addfile(info, io.BytesIO(data))
    packed = io.BytesIO()
    with gzip.GzipFile(fileobj=packed, mode="wb", mtime=0) as gz:
        gz.write(raw.getvalue())
    return packed.getvalue(), raw.getvalue()


class TreeBuilder:
    """Writes images in the tree layout: one shared ROOT/blobs, a symlink chain per repo."""

    def __init__(self, root):
        self.root = str(root)
        os.makedirs(os.path.join(self.root, "blobs"), exist_ok=True)

    def link_blobs(self, repo):
        parts = repo.split("/")
        for depth in range(len(parts), 0, -1):
            link = os.path.join(self.root, *parts[:depth], "blobs")
            os.makedirs(os.path.dirname(link), exist_ok=True)
            if not os.path.lexists(link):
                os.symlink("../blobs", link)

    def blob(self, data, media_type):
        digest = sha256(data)
        with open(os.path.join(self.root, "blobs", digest), "wb") as f:
            f.write(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def manifest(self, repo, body, tag=None):
        directory = os.path.join(self.root, repo, "manifests")
        os.makedirs(directory, exist_ok=True)
        self.link_blobs(repo)
        digest = sha256(body)
        with open(os.path.join(directory, digest), "wb") as f:
            f.write(body)
        if tag:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(directory, tag))
            os.symlink(digest, os.path.join(directory, tag))
        return digest

    def image(self, repo, arch, docker=False, with_media_type=True, extra=b"", tag=None):
        """One runnable single-platform image; returns (manifest bytes, digest)."""
        base, base_raw = make_layer({"etc/os-release": b"ID=fixture\n"})
        entry = b"%s %s %s" % (repo.encode(), arch.encode(), extra)
        top, top_raw = make_layer({"app/" + arch: entry})
        config = json.dumps({
            "architecture": arch, "os": "linux",
            "config": {"Entrypoint": ["/app/" + arch]},
            "rootfs": {"type": "layers", "diff_ids": [sha256(base_raw), sha256(top_raw)]},
        }, sort_keys=True).encode()
        if docker:
            types = (er.DOCKER_MANIFEST, "application/vnd.docker.container.image.v1+json",
                     "application/vnd.docker.image.rootfs.diff.tar.gzip")
        else:
            types = (er.OCI_MANIFEST, "application/vnd.oci.image.config.v1+json",
                     "application/vnd.oci.image.layer.v1.tar+gzip")
        document = {"schemaVersion": 2, "mediaType": types[0],
                    "config": self.blob(config, types[1]),
                    "layers": [self.blob(base, types[2]), self.blob(top, types[2])]}
        if not with_media_type:
            del document["mediaType"]
        body = json.dumps(document, indent=3).encode()
        return body, self.manifest(repo, body, tag)

    def index(self, repo, tag, arches, docker=False):
        """A multi-platform index (OCI) or manifest list (Docker) with its children."""
        children = []
        for arch in arches:
            body, digest = self.image(repo, arch, docker=docker)
            children.append({"mediaType": er.DOCKER_MANIFEST if docker else er.OCI_MANIFEST,
                             "digest": digest, "size": len(body),
                             "platform": {"architecture": arch, "os": "linux"}})
        document = {"schemaVersion": 2, "mediaType": er.DOCKER_LIST if docker else er.OCI_INDEX,
                    "manifests": children}
        body = json.dumps(document).encode()
        return body, self.manifest(repo, body, tag), [c["digest"] for c in children]


class Fixture:
    """The images every client test pulls, and what each should resolve to."""

    def __init__(self, root):
        self.root = str(root)
        builder = TreeBuilder(root)
        self.builder = builder
        self.images = {}  # "repo:tag" -> (digest, media type, child digests)
        body, digest, children = builder.index("library/multi", "v1", ["amd64", "arm64"])
        self.images["library/multi:v1"] = (digest, er.OCI_INDEX, children)
        body, digest, children = builder.index("rancher/docker-list", "v2", ["amd64", "arm64"],
                                               docker=True)
        self.images["rancher/docker-list:v2"] = (digest, er.DOCKER_LIST, children)
        body, digest = builder.image("plain/no-media-type", "amd64", with_media_type=False,
                                     tag="latest")
        self.images["plain/no-media-type:latest"] = (digest, er.OCI_MANIFEST, [])
        body, digest = builder.image("a/b/c/d", "amd64", docker=True, tag="1.0")
        self.images["a/b/c/d:1.0"] = (digest, er.DOCKER_MANIFEST, [])

    def file(self, *parts):
        return os.path.join(self.root, *parts)


# --- Certificates and servers ---------------------------------------------------------

# ECDSA P-256, the kind of key k3s issues and the README's recipe makes: every client
# test (containerd, skopeo, podman) runs against it.
EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]


def make_ca_and_cert(directory, name="server"):
    """A CA and a server certificate for 127.0.0.1/::1/localhost, made with openssl."""
    openssl = need("openssl")
    d = str(directory)
    ca_key, ca_crt = os.path.join(d, "ca.key"), os.path.join(d, "ca.crt")
    if not os.path.exists(ca_crt):
        run([openssl, "req", "-x509"] + EC_KEY + ["-nodes", "-days", "2",
             "-subj", "/CN=embedded-registry test CA", "-keyout", ca_key, "-out", ca_crt])
    key, csr, crt = (os.path.join(d, name + ext) for ext in (".key", ".csr", ".crt"))
    ext = os.path.join(d, name + ".ext")
    with open(ext, "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost\n"
                "extendedKeyUsage=serverAuth,clientAuth\n")
    run([openssl, "req"] + EC_KEY + ["-nodes", "-subj", "/CN=" + name,
         "-keyout", key, "-out", csr])
    run([openssl, "x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key,
         "-CAcreateserial", "-days", "2", "-extfile", ext, "-out", crt])
    return {"ca": ca_crt, "cert": crt, "key": key, "dir": d}


@contextlib.contextmanager
def serving(root, tls=None, **kwargs):
    """The real server, in this process, on a free loopback port."""
    credentials = er.TlsCredentials(tls["cert"], tls["key"], tls.get("client_ca")) if tls else None
    server = er.RegistryServer(("127.0.0.1", 0), er.Tree(str(root)), credentials, **kwargs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def host_port(server):
    return "127.0.0.1:%d" % server.server_address[1]


def connect(server, tls=None):
    if server.tls is None:
        return http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    context = ssl.create_default_context(cafile=tls["ca"])
    if tls.get("client_cert"):
        context.load_cert_chain(tls["client_cert"], tls["client_key"])
    return http.client.HTTPSConnection("127.0.0.1", server.server_address[1], timeout=30,
                                       context=context)


def fetch(conn, method, path, headers=None):
    conn.request(method, path, headers=headers or {})
    response = conn.getresponse()
    return response.status, response.headers, response.read()


def raw_exchange(server, data, timeout=10):
    """Send raw bytes to a plain-HTTP server; return all it answers before closing."""
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout) as sock:
        sock.sendall(data)
        with contextlib.suppress(OSError):  # the server may have reset it already
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except (socket.timeout, ConnectionResetError):
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture(scope="session")
def tls(tmp_path_factory):
    return make_ca_and_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def fixture(tmp_path_factory):
    return Fixture(tmp_path_factory.mktemp("registry"))


@pytest.fixture(scope="session")
def tls_server(fixture, tls):
    with serving(fixture.root, tls) as server:
        yield server


@pytest.fixture()
def plain_server(fixture):
    with serving(fixture.root) as server:
        yield server


# --- Pure functions -------------------------------------------------------------------

@pytest.mark.parametrize("path, expected", [
    ("/v2/", ("base", None, None, None)),
    ("/v2", ("base", None, None, None)),
    ("/v2/_catalog?n=5", ("catalog", None, None, None)),
    ("/v2/a/b/tags/list", ("tags", "a/b", None, None)),
    ("/v2/rancher/pause/manifests/3.6", ("manifest", "rancher/pause", "3.6", None)),
    ("/v2/x/manifests/t?ns=docker.io", ("manifest", "x", "t", "docker.io")),
    ("/v2/x/manifests/t?ns=localhost:5000", ("manifest", "x", "t", "localhost:5000")),
    ("/v2/x/manifests/t?ns=../../etc", ("manifest", "x", "t", None)),
    ("/v2/x/manifests/t?ns=a/b", ("manifest", "x", "t", None)),
    ("/v2/a/manifests/b/manifests/c", ("manifest", "a/manifests/b", "c", None)),
    ("/v2/x/blobs/sha256:" + "a" * 64, ("blob", "x", "sha256:" + "a" * 64, None)),
    ("/v2/x/blobs/sha512:" + "b" * 128, ("blob", "x", "sha512:" + "b" * 128, None)),
])
def test_parse_route(path, expected):
    route = er.parse_route(path)
    assert (route.kind, route.name, route.reference, route.ns) == expected


@pytest.mark.parametrize("path, status, code", [
    ("/", 404, "NOT_FOUND"),
    ("/v1/x", 404, "NOT_FOUND"),
    ("/v2/UPPER/manifests/t", 400, "NAME_INVALID"),
    ("/v2/%2e%2e/manifests/t", 400, "NAME_INVALID"),
    ("/v2/a/../b/manifests/t", 400, "NAME_INVALID"),
    ("/v2/a%2fb/manifests/t", 400, "NAME_INVALID"),
    ("/v2/a%00/manifests/t", 400, "NAME_INVALID"),
    ("/v2/" + "a" * 300 + "/manifests/t", 400, "NAME_INVALID"),
    ("/v2/x/manifests/.INVALID_MANIFEST_NAME", 404, "MANIFEST_UNKNOWN"),
    ("/v2/x/manifests/..", 404, "MANIFEST_UNKNOWN"),
    ("/v2/x/manifests/" + "t" * 129, 404, "MANIFEST_UNKNOWN"),
    ("/v2/x/manifests/sha256:totallywrong", 400, "DIGEST_INVALID"),
    ("/v2/x/blobs/sha256:abc", 400, "DIGEST_INVALID"),
    ("/v2/x/blobs/md5:" + "a" * 32, 400, "DIGEST_INVALID"),
    ("/v2/x/blobs/sha256:" + "A" * 64, 400, "DIGEST_INVALID"),
    ("/v2/x/blobs/latest", 400, "DIGEST_INVALID"),
])
def test_parse_route_rejects(path, status, code):
    with pytest.raises(er.RegistryError) as caught:
        er.parse_route(path)
    assert (caught.value.status, caught.value.code) == (status, code)


@pytest.mark.parametrize("document, expected", [
    ({"mediaType": er.DOCKER_LIST, "manifests": []}, er.DOCKER_LIST),
    ({"schemaVersion": 2, "manifests": []}, er.OCI_INDEX),
    ({"schemaVersion": 2, "config": {}, "layers": []}, er.OCI_MANIFEST),
    ({"schemaVersion": 1, "fsLayers": []}, er.DOCKER_SCHEMA1),
    ({"schemaVersion": 1, "fsLayers": [], "signatures": []}, er.DOCKER_SCHEMA1_SIGNED),
    ({"schemaVersion": 2}, None),
])
def test_media_type_of(document, expected):
    assert er.media_type_of(document) == expected


@pytest.mark.parametrize("header, size, expected", [
    (None, 10, None),
    ("bytes=0-0", 10, (0, 0)),
    ("bytes=3-", 10, (3, 9)),
    ("bytes=3-100", 10, (3, 9)),
    ("bytes=-4", 10, (6, 9)),
    ("bytes=-40", 10, (0, 9)),
    ("bytes=9-9", 10, (9, 9)),
    ("bytes=0-1,4-5", 10, None),
    ("items=0-1", 10, None),
    ("bytes=5-2", 10, None),
    ("bytes=x-", 10, None),
    ("bytes=-", 10, None),
    # Only ASCII digits, of any length: never an exception.
    ("bytes=\u00b2-", 10, None),
    ("bytes=\u0661-", 10, None),
    ("bytes=0-" + "9" * 5000, 10, (0, 9)),
    ("bytes=-" + "9" * 5000, 10, (0, 9)),
])
def test_parse_range(header, size, expected):
    assert er.parse_range(header, size) == expected


@pytest.mark.parametrize("header, size", [("bytes=10-", 10), ("bytes=-0", 10), ("bytes=0-", 0),
                                          ("bytes=%s-" % ("9" * 5000), 10)])
def test_parse_range_unsatisfiable(header, size):
    with pytest.raises(er.RegistryError) as caught:
        er.parse_range(header, size)
    assert caught.value.status == 416


def test_is_loopback():
    assert all(er.is_loopback(h) for h in ("127.0.0.1", "127.9.9.9", "::1", "localhost"))
    assert not any(er.is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "node1"))


def test_parse_listen():
    assert er.parse_listen("127.0.0.1:5443") == ("127.0.0.1", 5443)
    assert er.parse_listen("[::1]:80") == ("::1", 80)
    assert er.parse_listen(":5443") == ("0.0.0.0", 5443)
    for bad in ("5443", "host:", "host:99999", "host:http"):
        with pytest.raises(er.ConfigError):
            er.parse_listen(bad)


# --- The protocol over real TLS -------------------------------------------------------

def test_base_endpoint(tls_server, tls):
    conn = connect(tls_server, tls)
    for method in ("GET", "HEAD"):
        status, headers, body = fetch(conn, method, "/v2/")
        assert status == 200
        assert headers["Docker-Distribution-API-Version"] == "registry/2.0"
        assert body == (b"{}" if method == "GET" else b"")
        assert headers["Content-Length"] == "2"


def test_manifests_by_tag_and_digest(tls_server, tls, fixture):
    conn = connect(tls_server, tls)
    for image, (digest, media_type, children) in fixture.images.items():
        repo, tag = image.rsplit(":", 1)
        with open(fixture.file(repo, "manifests", digest), "rb") as f:
            expected = f.read()
        for reference in (tag, digest):
            path = "/v2/%s/manifests/%s" % (repo, reference)
            status, headers, body = fetch(conn, "GET", path, {"Accept": ACCEPT_CONTAINERD})
            assert status == 200, path
            assert body == expected
            assert headers["Content-Type"] == media_type
            assert headers["Docker-Content-Digest"] == digest
            assert headers["Content-Length"] == str(len(expected))
            assert headers["ETag"] == '"%s"' % digest
            status, head_headers, head_body = fetch(conn, "HEAD", path,
                                                    {"Accept": er.OCI_MANIFEST})
            assert (status, head_body) == (200, b"")
            assert head_headers["Docker-Content-Digest"] == digest
            assert head_headers["Content-Length"] == str(len(expected))
            assert head_headers["Content-Type"] == media_type


def test_blobs_and_ranges(tls_server, tls, fixture):
    conn = connect(tls_server, tls)
    digest = fixture.images["library/multi:v1"][2][0]
    with open(fixture.file("library/multi", "manifests", digest), "rb") as f:
        layer = json.load(f)["layers"][1]
    with open(fixture.file("blobs", layer["digest"]), "rb") as f:
        data = f.read()
    path = "/v2/library/multi/blobs/" + layer["digest"]
    status, headers, body = fetch(conn, "GET", path, {"Accept-Encoding": "zstd, gzip, deflate"})
    assert (status, body) == (200, data)
    assert headers["Content-Type"] == "application/octet-stream"
    assert headers["Docker-Content-Digest"] == layer["digest"]
    assert headers["Accept-Ranges"] == "bytes"
    assert "Content-Encoding" not in headers
    status, headers, body = fetch(conn, "HEAD", path)
    assert (status, body, headers["Content-Length"]) == (200, b"", str(len(data)))
    size = len(data)
    for header, first, last in [("bytes=0-0", 0, 0), ("bytes=7-", 7, size - 1),
                                ("bytes=-5", size - 5, size - 1), ("bytes=3-9", 3, 9)]:
        status, headers, body = fetch(conn, "GET", path, {"Range": header})
        assert status == 206, header
        assert body == data[first:last + 1]
        assert headers["Content-Range"] == "bytes %d-%d/%d" % (first, last, size)
    status, headers, body = fetch(conn, "GET", path, {"Range": "bytes=%d-" % size})
    assert status == 416
    assert headers["Content-Range"] == "bytes */%d" % size
    status, headers, body = fetch(conn, "GET", path, {"Range": "bytes=0-1,4-5"})
    assert (status, body) == (200, data)
    # The nested repository reaches the same shared store through its symlink chain.
    status, _, body = fetch(conn, "GET", "/v2/a/b/c/d/blobs/" + layer["digest"])
    assert (status, body) == (200, data)


@pytest.mark.parametrize("method, path, status, code", [
    ("GET", "/v2/nothing/here/manifests/latest", 404, "NAME_UNKNOWN"),
    ("GET", "/v2/library/multi/manifests/v9", 404, "MANIFEST_UNKNOWN"),
    ("GET", "/v2/library/multi/manifests/sha256:" + "0" * 64, 404, "MANIFEST_UNKNOWN"),
    ("HEAD", "/v2/library/multi/manifests/.INVALID_MANIFEST_NAME", 404, None),
    ("GET", "/v2/library/multi/manifests/sha256:totallywrong", 400, "DIGEST_INVALID"),
    ("GET", "/v2/library/multi/blobs/sha256:" + "0" * 64, 404, "BLOB_UNKNOWN"),
    ("GET", "/v2/library/multi/blobs/sha256:nothex", 400, "DIGEST_INVALID"),
    ("GET", "/v2/Library/multi/manifests/v1", 400, "NAME_INVALID"),
    ("GET", "/v2/library/multi/blobs/uploads/", 404, "NOT_FOUND"),
    ("PUT", "/v2/library/multi/manifests/v1", 405, "UNSUPPORTED"),
    ("POST", "/v2/library/multi/blobs/uploads/", 405, "UNSUPPORTED"),
    ("PATCH", "/v2/library/multi/blobs/uploads/x", 405, "UNSUPPORTED"),
    ("DELETE", "/v2/library/multi/manifests/v1", 405, "UNSUPPORTED"),
    ("GET", "/favicon.ico", 404, "NOT_FOUND"),
    ("GET", "/v2/library/", 404, "NOT_FOUND"),
])
def test_errors_are_oci_json(tls_server, tls, method, path, status, code):
    conn = connect(tls_server, tls)
    got, headers, body = fetch(conn, method, path, {"Content-Length": "0"})
    assert got == status
    assert headers["Content-Length"] == str(len(body)) or method == "HEAD"
    if code:
        assert headers["Content-Type"] == "application/json"
        assert json.loads(body)["errors"][0]["code"] == code
    if status == 405:
        assert headers["Allow"] == "GET, HEAD"
    # The connection stays usable after an error.
    assert fetch(conn, "GET", "/v2/")[0] == 200


def test_ns_prefers_the_namespaced_tree(tmp_path, tls):
    builder = TreeBuilder(tmp_path)
    _, trimmed = builder.image("library/app", "amd64", tag="1")
    _, namespaced = builder.image("docker.io/library/app", "amd64", extra=b"ns", tag="1")
    _, ported = builder.image("localhost:5000/team/app", "amd64", extra=b"port", tag="1")
    with serving(tmp_path, tls) as server:
        conn = connect(server, tls)
        cases = [("", trimmed), ("?ns=docker.io", namespaced), ("?ns=quay.io", trimmed),
                 ("?ns=localhost:5000", None), ("?ns=..", trimmed),
                 ("?x=1&ns=docker.io", namespaced)]
        for query, expected in cases:
            status, headers, _ = fetch(conn, "HEAD", "/v2/library/app/manifests/1" + query)
            assert status == 200
            assert headers["Docker-Content-Digest"] == expected or expected is None
        status, headers, _ = fetch(conn, "HEAD", "/v2/team/app/manifests/1?ns=localhost:5000")
        assert (status, headers["Docker-Content-Digest"]) == (200, ported)


def test_keep_alive_across_many_requests(tls_server, tls, fixture):
    conn = connect(tls_server, tls)
    digest = fixture.images["library/multi:v1"][0]
    fetch(conn, "GET", "/v2/")
    first_socket = conn.sock
    for i in range(200):
        method = ("GET", "HEAD")[i % 2]
        path = ["/v2/library/multi/manifests/v1", "/v2/missing/manifests/v1",
                "/v2/library/multi/manifests/" + digest][i % 3]
        status, headers, body = fetch(conn, method, path)
        assert status in (200, 404)
        assert "Content-Length" in headers
    assert conn.sock is first_socket


def test_listings(tls_server, tls, fixture):
    conn = connect(tls_server, tls)
    status, _, body = fetch(conn, "GET", "/v2/_catalog")
    assert json.loads(body)["repositories"] == sorted(
        image.rsplit(":", 1)[0] for image in fixture.images)
    status, headers, body = fetch(conn, "GET", "/v2/_catalog?n=2")
    page = json.loads(body)["repositories"]
    assert len(page) == 2
    next_page = "/v2/_catalog?n=2&last=" + page[-1].replace("/", "%2F")
    assert headers["Link"] == '<%s>; rel="next"' % next_page
    status, _, body = fetch(conn, "GET", "/v2/library/multi/tags/list")
    assert json.loads(body) == {"name": "library/multi", "tags": ["v1"]}


# --- Safety ---------------------------------------------------------------------------

@pytest.fixture()
def hostile_tree(tmp_path):
    """A tree with links pointing out of the root, and a canary file outside it."""
    root = tmp_path / "root"
    builder = TreeBuilder(root)
    builder.image("good/app", "amd64", tag="1")
    outside = tmp_path / "outside"
    outside.mkdir()
    canary = b'{"schemaVersion": 2, "manifests": [], "canary": true}'
    canary_digest = sha256(canary)
    for name in ("canary.json", canary_digest):
        (outside / name).write_bytes(canary)
    os.makedirs(root / "evil" / "manifests")
    os.symlink(str(outside / "canary.json"), str(root / "evil" / "manifests" / "latest"))
    os.symlink(str(outside), str(root / "evil" / "blobs"))
    os.symlink("../../outside", str(root / "escape"))
    return {"root": root, "canary": canary, "digest": canary_digest}


def test_nothing_outside_the_root_is_served(hostile_tree, caplog):
    attacks = [
        b"GET /v2/../canary.json HTTP/1.1\r\n\r\n",
        b"GET /v2/%2e%2e/%2e%2e/outside/manifests/canary.json HTTP/1.1\r\n\r\n",
        b"GET /v2/evil/manifests/latest HTTP/1.1\r\n\r\n",
        b"GET /v2/evil/blobs/" + hostile_tree["digest"].encode() + b" HTTP/1.1\r\n\r\n",
        b"GET /v2/escape/manifests/canary.json HTTP/1.1\r\n\r\n",
        b"GET /v2/good/app/blobs/..%2f..%2fescape%2fcanary.json HTTP/1.1\r\n\r\n",
        b"GET /v2/good\x00/manifests/1 HTTP/1.1\r\n\r\n",
        b"GET /v2/" + b"a/" * 5000 + b"manifests/1 HTTP/1.1\r\n\r\n",
    ]
    # Malformed requests, with the status each must get before the connection closes.
    malformed = [
        (b"GET /" + b"x" * 70000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64) + b"\r\n\r\n", 400),
        (b"GET /v2/ HTTP/1.1\r\n" + b"X-Long: " + b"y" * 70000 + b"\r\n\r\n", 431),
        (b"GET /v2/ HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(150)) + b"\r\n",
         431),
        (b"garbage\r\n\r\n", 400),
    ]
    with caplog.at_level(logging.INFO, logger="embedded_registry"):
        with serving(hostile_tree["root"], idle_timeout=2) as server:
            for attack in attacks:
                answer = raw_exchange(server, attack)
                assert b'"canary": true' not in answer
                status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else None
                assert status is None or 400 <= status < 500, attack[:80]
            for attack, expected in malformed:
                answer = raw_exchange(server, attack)
                assert answer.startswith(b"HTTP/1.1 %d " % expected), (attack[:40], answer[:80])
                assert b"Connection: close" in answer and b'{"errors": [' in answer
            conn = connect(server)
            assert fetch(conn, "GET", "/v2/good/app/manifests/1")[0] == 200
            # A malformed ns is only ignored: the plain tree answers.
            assert fetch(conn, "GET", "/v2/good/app/manifests/1?ns=../../outside")[0] == 200
    assert "Traceback" not in caplog.text
    assert max(len(line) for line in caplog.text.splitlines()) < 1000
    assert "resolves outside the root" in caplog.text


def test_corrupt_manifest_is_not_served(tmp_path, caplog):
    builder = TreeBuilder(tmp_path)
    body, digest = builder.image("app", "amd64", tag="good")
    path = os.path.join(str(tmp_path), "app", "manifests", digest)
    with open(path, "wb") as f:
        f.write(body.replace(b"amd64", b"arm64") if b"amd64" in body else body + b" ")
    with open(os.path.join(str(tmp_path), "app", "manifests", "broken"), "wb") as f:
        f.write(b"{not json")
    with caplog.at_level(logging.ERROR, logger="embedded_registry"):
        with serving(tmp_path) as server:
            conn = connect(server)
            for reference in (digest, "good", "broken"):
                status, _, body = fetch(conn, "GET", "/v2/app/manifests/" + reference)
                assert status == 404, reference
                assert json.loads(body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert path in caplog.text
    assert "broken" in caplog.text


def test_manifest_changes_are_seen(tmp_path):
    builder = TreeBuilder(tmp_path)
    _, first = builder.image("app", "amd64", tag="1")
    with serving(tmp_path) as server:
        conn = connect(server)
        assert fetch(conn, "HEAD", "/v2/app/manifests/1")[1]["Docker-Content-Digest"] == first
        _, second = builder.image("app", "amd64", extra=b"v2", tag="1")
        assert fetch(conn, "HEAD", "/v2/app/manifests/1")[1]["Docker-Content-Digest"] == second


# --- The command line, as a subprocess ------------------------------------------------

@contextlib.contextmanager
def server_process(*args, drain=False):
    """embedded_registry.py as a subprocess on port 0; yields (process, base URL).

    With drain, a thread reads its log as it comes (into process.log_lines), so a
    test that makes thousands of requests never blocks the server on a full pipe.
    """
    argv = [sys.executable, os.path.join(HERE, "embedded_registry.py"),
            "--listen", "127.0.0.1:0"] + list(args)
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, universal_newlines=True)
    reader = None
    try:
        line = process.stderr.readline()
        match = re.search(r"serving (\S+)/v2/", line)
        assert match, "no start-up line: %r" % line
        if drain:
            process.log_lines = []
            reader = threading.Thread(target=lambda: process.log_lines.extend(process.stderr),
                                      daemon=True)
            reader.start()
        yield process, match.group(1)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(10)
        if reader:
            reader.join(10)
        process.stderr.close()


def cpus_allowed(pid):
    with open("/proc/%d/status" % pid) as f:
        return re.search(r"Cpus_allowed_list:\s*(\S+)", f.read()).group(1)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated")
def test_cli_serves_tls_and_logs_access(fixture, tls):
    with server_process("--root", fixture.root, "--cert", tls["cert"], "--key", tls["key"]) as (
            process, url):
        assert url.startswith("https://127.0.0.1:")
        port = int(url.rsplit(":", 1)[1])
        context = ssl.create_default_context(cafile=tls["ca"])
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
        assert fetch(conn, "GET", "/v2/library/multi/manifests/v1")[0] == 200
        with pytest.raises(ssl.SSLError):
            weak = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            weak.load_verify_locations(tls["ca"])
            weak.maximum_version = ssl.TLSVersion.TLSv1_1
            http.client.HTTPSConnection("127.0.0.1", port, context=weak, timeout=10).request(
                "GET", "/v2/")
        conn.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
        log_text = process.stderr.read()
    assert re.search(r"127\.0\.0\.1 GET /v2/library/multi/manifests/v1 200 \d+ [\d.]+s", log_text)


@pytest.mark.parametrize("args, message", [
    (["--root", "/nonexistent/registry"], "root directory /nonexistent/registry does not exist"),
    (["--root", ".", "--cert", "/nonexistent.crt", "--key", "/nonexistent.key"],
     "/nonexistent.crt"),
    (["--root", ".", "--cert", __file__, "--key", __file__], "cannot load certificate"),
    (["--root", ".", "--listen", "localhost"], "--listen"),
])
def test_cli_errors_are_one_line(args, message):
    result = subprocess.run([sys.executable, os.path.join(HERE, "embedded_registry.py")] + args,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, timeout=30)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_cli_port_in_use(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, os.path.join(HERE, "embedded_registry.py"), "--root", str(tmp_path),
             "--listen", "127.0.0.1:%d" % port],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=30)
    assert result.returncode == 2
    assert "cannot listen on 127.0.0.1:%d" % port in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_help_names_every_flag():
    result = run([sys.executable, os.path.join(HERE, "embedded_registry.py"), "--help"])
    for flag in ("--root", "--listen", "--cert", "--key", "--max-connections",
                 "--handshake-timeout", "--header-timeout", "--idle-timeout", "--send-timeout",
                 "--shutdown-timeout", "--client-ca", "--check", "--quiet"):
        assert flag in result.stdout


def test_silent_tls_client_does_not_stall_others(fixture, tls):
    with serving(fixture.root, tls, handshake_timeout=30) as server:
        silent = socket.create_connection(("127.0.0.1", server.server_address[1]))
        try:
            started = time.monotonic()
            conn = connect(server, tls)
            assert fetch(conn, "GET", "/v2/")[0] == 200
            assert time.monotonic() - started < 10
        finally:
            silent.close()


def test_plain_http_on_the_tls_port_is_closed_and_logged_once(fixture, tls, caplog):
    with caplog.at_level(logging.INFO, logger="embedded_registry"):
        with serving(fixture.root, tls) as server:
            answer = raw_exchange(server, b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
            assert fetch(connect(server, tls), "GET", "/v2/")[0] == 200
    assert b"HTTP/1.1 200" not in answer and b"errors" not in answer
    assert caplog.text.count("TLS handshake failed") == 1
    assert "Traceback" not in caplog.text


# --- Real clients: skopeo, containerd, podman -----------------------------------------

def cert_dir_for(tls):
    """containers/image reads every *.crt of a directory as a CA."""
    directory = os.path.join(tls["dir"], "certs.d")
    os.makedirs(directory, exist_ok=True)
    shutil.copy(tls["ca"], os.path.join(directory, "ca.crt"))
    return directory


def test_skopeo_copies_every_image(tls_server, tls, fixture, tmp_path):
    skopeo = need("skopeo")
    certs = cert_dir_for(tls)
    for image, (digest, media_type, children) in fixture.images.items():
        source = "docker://%s/%s" % (host_port(tls_server), image)
        raw = run([skopeo, "inspect", "--raw", "--cert-dir", certs, source]).stdout
        assert sha256(raw.encode()) == digest, image
        if media_type.startswith("application/vnd.oci."):
            layout = str(tmp_path / "oci")
            run([skopeo, "copy", "--all", "--preserve-digests", "--src-cert-dir", certs,
                 source, "oci:%s:%s" % (layout, image.replace("/", "-").replace(":", "-"))])
            with open(os.path.join(layout, "index.json")) as f:
                assert digest in [m["digest"] for m in json.load(f)["manifests"]], image
        # dir: keeps every manifest as it came (Docker lists too): the digests held.
        copy = tmp_path / image.replace("/", "_").replace(":", "_")
        run([skopeo, "copy", "--all", "--preserve-digests", "--src-cert-dir", certs,
             source, "dir:%s" % copy])
        assert sha256((copy / "manifest.json").read_bytes()) == digest, image
        for child in children:
            child_manifest = copy / (child.split(":")[1] + ".manifest.json")
            assert sha256(child_manifest.read_bytes()) == child
            for layer in json.loads(child_manifest.read_bytes())["layers"]:
                blob = copy / layer["digest"].split(":")[1]
                assert sha256(blob.read_bytes()) == layer["digest"]
        by_digest = "docker://%s/%s@%s" % (host_port(tls_server), image.rsplit(":", 1)[0], digest)
        assert sha256(run([skopeo, "inspect", "--raw", "--cert-dir", certs,
                           by_digest]).stdout.encode()) == digest


@pytest.fixture()
def containerd(tmp_path):
    """A private containerd with its own root, state and socket; yields a ctr runner."""
    binary = need("containerd")
    ctr = need("ctr")
    base = tmp_path / "ctd"
    base.mkdir()
    socket_path = str(base / "containerd.sock")
    config = base / "config.toml"
    config.write_text('version = 2\nroot = "%s"\nstate = "%s"\n'
                      'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
                      '[grpc]\n  address = "%s"\n' % (base / "root", base / "state", socket_path))
    log_file = open(str(base / "containerd.log"), "w")
    process = subprocess.Popen([binary, "--config", str(config)], stdout=log_file,
                               stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while subprocess.run([ctr, "--address", socket_path, "version"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL).returncode != 0:
        assert process.poll() is None, "containerd exited: see %s" % log_file.name
        assert time.monotonic() < deadline, "containerd did not start"
        time.sleep(0.2)

    def ctr_run(*args):
        return run([ctr, "--address", socket_path, "--namespace", "test"] + list(args))

    ctr_run.hosts_dir = str(base / "hosts")
    ctr_run.socket = socket_path
    try:
        yield ctr_run
    finally:
        process.terminate()
        process.wait(30)
        log_file.close()


def write_hosts_toml(hosts_dir, registry, endpoints, ca):
    """hosts.toml as k3s writes it; server is a local registry too, so nothing leaves."""
    directory = os.path.join(hosts_dir, registry)
    os.makedirs(directory, exist_ok=True)
    lines = ['server = "%s"' % endpoints[-1]]
    for endpoint in endpoints:
        lines += ['', '[host."%s"]' % endpoint, '  capabilities = ["pull", "resolve"]',
                  '  ca = "%s"' % ca]
    with open(os.path.join(directory, "hosts.toml"), "w") as f:
        f.write("\n".join(lines) + "\n")


def ctr_image_digests(ctr):
    """{ref: digest} from `ctr images ls`."""
    rows = ctr("images", "ls").stdout.splitlines()[1:]
    return {row.split()[0]: row.split()[2] for row in rows if row.strip()}


def test_containerd_pulls_through_mirror_and_hijack(fixture, tls, containerd, caplog):
    with caplog.at_level(logging.INFO, logger="embedded_registry"):
        with serving(fixture.root, tls) as server:
            endpoint = "https://" + host_port(server)
            for registry in (MIRROR, "docker.io"):
                write_hosts_toml(containerd.hosts_dir, registry, [endpoint], tls["ca"])
            pulled = {}
            for image, (digest, _, children) in fixture.images.items():
                ref = "%s/%s" % (MIRROR, image)
                containerd("images", "pull", "--hosts-dir", containerd.hosts_dir,
                           "--snapshotter", "native", "--platform", "linux/amd64", ref)
                pulled[ref] = digest
            multi_digest, _, multi_children = fixture.images["library/multi:v1"]
            by_digest = "%s/library/multi@%s" % (MIRROR, multi_digest)
            containerd("images", "pull", "--hosts-dir", containerd.hosts_dir,
                       "--snapshotter", "native", "--platform", "linux/arm64", by_digest)
            pulled[by_digest] = multi_digest
            hijacked = "docker.io/rancher/docker-list:v2"
            containerd("images", "pull", "--hosts-dir", containerd.hosts_dir,
                       "--snapshotter", "native", "--platform", "linux/arm64", hijacked)
            pulled[hijacked] = fixture.images["rancher/docker-list:v2"][0]
    assert ctr_image_digests(containerd) == pulled
    assert "?ns=bootstrap-registry.airgap" in caplog.text
    assert "?ns=docker.io" in caplog.text
    # The arm64 child was fetched for the pulls that asked for linux/arm64.
    assert "/manifests/%s?ns=" % multi_children[1] in caplog.text
    # containerd unpacked the arm64 image: its layer holds the arm64 entry point.
    content = containerd("content", "ls").stdout
    assert multi_children[1] in content


def test_containerd_falls_back_past_a_corrupt_blob(fixture, tls, containerd, tmp_path, caplog):
    damaged = tmp_path / "damaged"
    shutil.copytree(fixture.root, str(damaged), symlinks=True)
    digest = fixture.images["a/b/c/d:1.0"][0]
    manifest = json.loads((damaged / "a/b/c/d/manifests" / digest).read_bytes())
    layer = damaged / "blobs" / manifest["layers"][1]["digest"]
    flip_a_bit(layer)
    with caplog.at_level(logging.INFO, logger="embedded_registry"):
        with serving(damaged, tls) as first, serving(fixture.root, tls) as second:
            write_hosts_toml(containerd.hosts_dir, MIRROR, [
                "https://" + host_port(first), "https://" + host_port(second)], tls["ca"])
            containerd("images", "pull", "--hosts-dir", containerd.hosts_dir,
                       "--snapshotter", "native", MIRROR + "/a/b/c/d:1.0")
    assert ctr_image_digests(containerd) == {MIRROR + "/a/b/c/d:1.0": digest}
    assert "blob %s hashes to" % layer in caplog.text


def test_podman_pulls(tls_server, tls, fixture, tmp_path, request):
    podman = need("podman")
    certs = cert_dir_for(tls)
    runroot = tempfile.mkdtemp(prefix="podman-")  # podman wants a runroot under 50 chars
    storage = ["--root", str(tmp_path / "storage"), "--runroot", runroot,
               "--storage-driver", "vfs", "--events-backend", "none"]
    request.addfinalizer(lambda: shutil.rmtree(runroot, ignore_errors=True))
    for image in ("library/multi:v1", "plain/no-media-type:latest", "a/b/c/d:1.0"):
        ref = "%s/%s" % (host_port(tls_server), image)
        run([podman] + storage + ["pull", "--cert-dir", certs, ref])
        digest = run([podman] + storage + ["image", "inspect", "--format", "{{.Digest}}",
                                           ref]).stdout.strip()
        assert digest == fixture.images[image][0], image


# --- The downloader: pure functions ---------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("nginx", ("docker.io", "library/nginx", "latest", None)),
    ("nginx:1.25", ("docker.io", "library/nginx", "1.25", None)),
    ("rancher/mirrored-pause:3.6", ("docker.io", "rancher/mirrored-pause", "3.6", None)),
    ("docker.io/rancher/klipper-helm:v0.8.2-build20230815",
     ("docker.io", "rancher/klipper-helm", "v0.8.2-build20230815", None)),
    ("index.docker.io/library/busybox", ("docker.io", "library/busybox", "latest", None)),
    ("reg:5000/team/app:1.0", ("reg:5000", "team/app", "1.0", None)),
    ("localhost:5000/x", ("localhost:5000", "x", "latest", None)),
    ("localhost/x:2", ("localhost", "x", "2", None)),
    ("registry.k8s.io/pause:3.9", ("registry.k8s.io", "pause", "3.9", None)),
    ("quay.io/a/b/c/d:v1", ("quay.io", "a/b/c/d", "v1", None)),
    ("x/y@sha256:" + "a" * 64, ("docker.io", "x/y", None, "sha256:" + "a" * 64)),
    ("ghcr.io/x/y:1.2@sha256:" + "b" * 64, ("ghcr.io", "x/y", "1.2", "sha256:" + "b" * 64)),
    ("127.0.0.1:5000/app@sha256:" + "c" * 64,
     ("127.0.0.1:5000", "app", None, "sha256:" + "c" * 64)),
])
def test_parse_reference(text, expected):
    assert tuple(dsi.parse_reference(text)) == expected


@pytest.mark.parametrize("text", [
    "library/UPPER", "x/y@sha256:short", "x:bad tag", "x:", "-x", "reg:5000/", "x@md5:" + "a" * 32,
    "x/y:" + "t" * 200, "a//b",
])
def test_parse_reference_rejects(text):
    with pytest.raises(ValueError) as caught:
        dsi.parse_reference(text)
    assert repr(text) in str(caught.value)


def test_image_list_reports_every_bad_line():
    text = "# system images\nnginx\n\nBAD/Name  # comment\nx:\nquay.io/ok:1  # trailing\n"
    with pytest.raises(dsi.DownloadError) as caught:
        dsi.parse_image_list(text, "extra.txt")
    assert "extra.txt:4" in str(caught.value) and "extra.txt:5" in str(caught.value)
    good = dsi.parse_image_list("nginx\n# c\nquay.io/ok:1 # t\n", "l.txt")
    assert [(str(i), w) for i, w in good] == [("docker.io/library/nginx:latest", "l.txt:1"),
                                               ("quay.io/ok:1", "l.txt:3")]


def test_platforms():
    wanted = dsi.parse_platforms("linux/amd64,linux/arm64")
    assert dsi.platform_matches(wanted, {"os": "linux", "architecture": "arm64", "variant": "v8"})
    assert dsi.platform_matches(wanted, {"os": "linux", "architecture": "amd64"})
    assert not dsi.platform_matches(wanted, {"os": "linux", "architecture": "arm"})
    assert not dsi.platform_matches(wanted, {"os": "unknown", "architecture": "unknown"})
    v8 = dsi.parse_platforms("linux/arm64/v8")
    assert dsi.platform_matches(v8, {"os": "linux", "architecture": "arm64"})
    assert not dsi.platform_matches(dsi.parse_platforms("linux/arm/v6"),
                                    {"os": "linux", "architecture": "arm"})
    assert dsi.parse_platforms("all") is None
    with pytest.raises(dsi.DownloadError):
        dsi.parse_platforms("amd64")


def test_registries_yaml():
    text = dsi.registries_yaml(["docker.io", "quay.io", "docker.io"], "https://127.0.0.1:5443",
                               "/etc/embedded-registry/ca.crt")
    assert text.count('      - "https://127.0.0.1:5443"') == 3
    assert '  "bootstrap-registry.airgap":' in text and '  "quay.io":' in text
    assert '  "127.0.0.1:5443":\n    tls:\n      ca_file: "/etc/embedded-registry/ca.crt"' in text


# --- The downloader against a real upstream (CNCF distribution) -----------------------

CRANE_DOUBLE = '''#!%s
"""Test double of crane (go-containerregistry), which no package registry here ships.

It implements only what download_system_images.py calls: `crane manifest [--insecure] REF`
and `crane blob [--insecure] REPO@DIGEST`, over plain HTTP to a local test registry.
CRANE_DOUBLE_STALL=N makes `blob` write half of a blob and then stall N seconds.
"""
import os, sys, time, urllib.request
ACCEPT = ("application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, "
          "application/vnd.docker.distribution.manifest.list.v2+json, "
          "application/vnd.docker.distribution.manifest.v2+json")
args = [a for a in sys.argv[1:] if a != "--insecure"]
if len(args) != 2 or args[0] not in ("manifest", "blob"):
    sys.exit("Error: crane test double: unsupported arguments %%r" %% sys.argv[1:])
command, ref = args
name, _, digest = ref.partition("@")
host, _, repo = name.partition("/")
if ":" in repo.rsplit("/", 1)[-1]:
    repo, _, tag = repo.rpartition(":")
else:
    tag = "latest"
kind = "manifests" if command == "manifest" else "blobs"
url = "http://%%s/v2/%%s/%%s/%%s" %% (host, repo, kind, digest or tag)
try:
    data = urllib.request.urlopen(urllib.request.Request(url, headers={"Accept": ACCEPT})).read()
except Exception as error:
    sys.exit("Error: GET %%s: %%s" %% (url, error))
stall = float(os.environ.get("CRANE_DOUBLE_STALL", "0"))
if command == "blob" and stall:
    sys.stdout.buffer.write(data[:len(data) // 2])
    sys.stdout.flush()
    time.sleep(stall)
sys.stdout.buffer.write(data)
'''


class Upstream:
    """Debian's docker-registry on a free loopback port, with the fixture images pushed."""

    def __init__(self, directory):
        binary = need("docker-registry")
        config = os.path.join(directory, "config.yml")
        with open(config, "w") as f:
            f.write("version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n"
                    "    rootdirectory: %s\nhttp:\n  addr: 127.0.0.1:0\n"
                    % os.path.join(directory, "data"))
        self.process = subprocess.Popen([binary, "serve", config], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, universal_newlines=True)
        for line in self.process.stderr:
            match = re.search(r'listening on 127\.0\.0\.1:(\d+)', line)
            if match:
                self.host = "127.0.0.1:" + match.group(1)
                break
        else:
            raise AssertionError("docker-registry did not start")
        threading.Thread(target=self.process.stderr.read, daemon=True).start()

    def push(self, source, name, skopeo, certs):
        run([skopeo, "copy", "--all", "--preserve-digests", "--src-cert-dir", certs,
             "--dest-tls-verify=false", source, "docker://%s/%s" % (self.host, name)])

    def raw(self, name, skopeo):
        return run([skopeo, "inspect", "--raw", "--tls-verify=false",
                    "docker://%s/%s" % (self.host, name)]).stdout.encode()

    def stop(self):
        self.process.terminate()
        self.process.wait(10)


class LoopbackServer(threading.Thread):
    """A small HTTP server of the test's own on a free loopback port, in a thread."""

    def serve(self, handler_class):
        handler_class.log_message = lambda handler, *args: None
        self.server = er.http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler_class)
        self.host = "127.0.0.1:%d" % self.server.server_address[1]
        self.base = "http://" + self.host
        super().__init__(target=self.server.serve_forever, daemon=True)
        self.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


class K3sReleases(LoopbackServer):
    """The k3s channel redirect and release asset, served locally."""

    def __init__(self, version, image_list):
        class Handler(er.http.server.BaseHTTPRequestHandler):
            def do_GET(handler):
                path = urllib.parse.unquote(handler.path)
                if path == "/channels/stable":
                    handler.send_response(302)
                    handler.send_header("Location", "/releases/tag/" + version)
                    handler.send_header("Content-Length", "0")
                    handler.end_headers()
                    return
                body = {"/releases/tag/" + version: b"release page",
                        "/download/%s/k3s-images.txt" % version: image_list.encode()}.get(path)
                handler.send_response(200 if body else 404)
                handler.send_header("Content-Length", str(len(body or b"")))
                handler.end_headers()
                handler.wfile.write(body or b"")

        self.serve(Handler)


@pytest.fixture(scope="session")
def upstream(tmp_path_factory, tls_server, tls, fixture):
    skopeo = need("skopeo")
    certs = cert_dir_for(tls)
    registry = Upstream(str(tmp_path_factory.mktemp("upstream")))
    try:
        for image in fixture.images:
            registry.push("docker://%s/%s" % (host_port(tls_server), image), image, skopeo, certs)
        yield registry
    finally:
        registry.stop()


@pytest.fixture(scope="session")
def crane_double(tmp_path_factory):
    bin_dir = tmp_path_factory.mktemp("crane-double-bin")
    path = bin_dir / "crane"
    path.write_text(CRANE_DOUBLE % sys.executable)
    path.chmod(0o755)
    return str(bin_dir)


def downloader(args, env_extra=None, path_prefix=None, **kwargs):
    """download_system_images.py as the user runs it."""
    env = dict(os.environ)
    if path_prefix:
        env["PATH"] = path_prefix + os.pathsep + env["PATH"]
    env.update(env_extra or {})
    return subprocess.run([sys.executable, os.path.join(HERE, "download_system_images.py")] +
                          args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, env=env, timeout=300, **kwargs)


def tree_is_sound(root):
    """Every blob and digest-named manifest hashes to its name; no temporary is left."""
    for top, dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(top, name)
            assert not name.endswith(".tmp"), path
            if name.startswith("sha256:"):
                with open(path, "rb") as f:
                    assert sha256(f.read()) == name, path
        assert not [d for d in dirs if d.startswith(dsi.TEMP_PREFIX)], top


@pytest.fixture(params=["skopeo", "crane"])
def tool(request, crane_double):
    """Each downloader test runs on both paths: real skopeo, and the crane test double."""
    if request.param == "skopeo":
        need("skopeo")
        return {"args": ["--tool", "skopeo"], "path": None}
    return {"args": ["--tool", "crane"], "path": crane_double}


def test_download_then_serve_and_pull(tool, upstream, fixture, tls, containerd, tmp_path):
    skopeo = need("skopeo")
    multi_digest = fixture.images["library/multi:v1"][0]
    plain_digest = fixture.images["plain/no-media-type:latest"][0]
    releases = K3sReleases("v1.99.9+k3s1", "%s/library/multi:v1\n%s/rancher/docker-list:v2\n"
                           % (upstream.host, upstream.host))
    extra = tmp_path / "extra.txt"
    extra.write_text("# extra images\n%s/a/b/c/d:1.0\n\n%s/plain/no-media-type@%s\n"
                     % (upstream.host, upstream.host, plain_digest))
    root = tmp_path / "registry"
    result = downloader(["-d", str(root), "-f", str(extra), "-p", "linux/amd64", "--insecure",
                         "--channel-url", releases.base + "/channels",
                         "--release-url", releases.base + "/download",
                         "--registries-yaml", str(tmp_path / "registries.yaml"),
                         "--endpoint", "https://127.0.0.1:5443", "--debug"] + tool["args"],
                        path_prefix=tool["path"])
    assert result.returncode == 0, result.stderr
    assert "Downloading image list for v1.99.9+k3s1" in result.stderr
    assert "4 images: 4 ok, 0 failed" in result.stdout
    tree_is_sound(str(root))
    checked = check(root, "--deep")
    assert checked.returncode == 0, checked.stdout
    for image in ("library/multi:v1", "rancher/docker-list:v2", "a/b/c/d:1.0"):
        repo, tag = image.rsplit(":", 1)
        tag_file = root / repo / "manifests" / tag
        assert os.readlink(str(tag_file)) == sha256(upstream.raw(image, skopeo))
    amd64, arm64 = fixture.images["library/multi:v1"][2]
    assert (root / "library/multi/manifests" / amd64).exists()
    assert not (root / "library/multi/manifests" / arm64).exists()
    assert (root / "plain/no-media-type/manifests" / plain_digest).exists()
    assert '  "%s":\n    endpoint:' % upstream.host in (tmp_path / "registries.yaml").read_text()
    assert re.search(r"^\+ \S+ (manifest|inspect --raw) ", result.stderr, re.M)
    with serving(str(root), tls) as server:
        certs = cert_dir_for(tls)
        by_digest = "docker://%s/library/multi@%s" % (host_port(server), multi_digest)
        assert sha256(run([skopeo, "inspect", "--raw", "--cert-dir", certs,
                           by_digest]).stdout.encode()) == multi_digest
        write_hosts_toml(containerd.hosts_dir, MIRROR, ["https://" + host_port(server)],
                         tls["ca"])
        pulls = {"%s/library/multi:v1" % MIRROR: multi_digest,
                 "%s/library/multi@%s" % (MIRROR, multi_digest): multi_digest,
                 "%s/a/b/c/d:1.0" % MIRROR: fixture.images["a/b/c/d:1.0"][0]}
        for ref in pulls:
            containerd("images", "pull", "--hosts-dir", containerd.hosts_dir,
                       "--snapshotter", "native", "--platform", "linux/amd64", ref)
        assert ctr_image_digests(containerd) == pulls
        # The platform that was not downloaded is not there to pull.
        failed = subprocess.run(
            ["ctr", "--address", containerd.socket, "--namespace", "test", "images", "pull",
             "--hosts-dir", containerd.hosts_dir, "--platform", "linux/arm64",
             "%s/library/multi:v1" % MIRROR], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            universal_newlines=True, timeout=120)
        assert failed.returncode != 0
    # A second run fetches nothing new.
    again = downloader(["-d", str(root), "-s", "-f", str(extra), "--insecure"] + tool["args"],
                       path_prefix=tool["path"])
    assert again.returncode == 0, again.stderr
    assert "blobs 0 new" in again.stdout


def test_download_failures_and_repairs(tool, upstream, fixture, tmp_path):
    root = tmp_path / "registry"
    extra = tmp_path / "extra.txt"
    extra.write_text("%s/a/b/c/d:1.0\n%s/does/not-exist:1\n" % (upstream.host, upstream.host))
    args = ["-d", str(root), "-s", "-f", str(extra), "--insecure"] + tool["args"]
    result = downloader(args, path_prefix=tool["path"])
    assert result.returncode == 1
    assert "2 images: 1 ok, 1 failed" in result.stderr
    assert "FAILED %s/does/not-exist:1" % upstream.host in result.stderr
    assert (root / "a/b/c/d/manifests/1.0").exists()
    # A damaged blob in the store is noticed and fetched again.
    manifest = json.loads((root / "a/b/c/d/manifests/1.0").read_bytes())
    damaged = root / "blobs" / manifest["layers"][1]["digest"]
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    extra.write_text("%s/a/b/c/d:1.0\n" % upstream.host)
    result = downloader(args, path_prefix=tool["path"])
    assert result.returncode == 0, result.stderr
    assert "damaged" in result.stderr and "blobs 1 new" in result.stdout
    tree_is_sound(str(root))


def test_download_interrupted_then_completed(upstream, fixture, crane_double, tmp_path):
    root = tmp_path / "registry"
    extra = tmp_path / "extra.txt"
    extra.write_text("%s/library/multi:v1\n" % upstream.host)
    args = [sys.executable, os.path.join(HERE, "download_system_images.py"), "-d", str(root),
            "-s", "-f", str(extra), "--insecure", "--tool", "crane", "-p", "all"]
    env = dict(os.environ, PATH=crane_double + os.pathsep + os.environ["PATH"],
               CRANE_DOUBLE_STALL="60")
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.monotonic() + 60
    # Wait until a blob is half written in the temporary folder, then kill everything.
    while not any(os.path.getsize(os.path.join(top, f))
                  for top, _, files in os.walk(str(root)) if dsi.TEMP_PREFIX in top
                  for f in files):
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(10)
    assert not (root / "library/multi/manifests/v1").exists()
    for name in os.listdir(str(root / "blobs")):
        with open(str(root / "blobs" / name), "rb") as f:
            assert sha256(f.read()) == name
    result = downloader(args[2:], path_prefix=crane_double)
    assert result.returncode == 0, result.stderr
    tree_is_sound(str(root))
    assert os.readlink(str(root / "library/multi/manifests/v1")) == \
        fixture.images["library/multi:v1"][0]
    for child in fixture.images["library/multi:v1"][2]:
        assert (root / "library/multi/manifests" / child).exists()


def test_download_refuses_collisions_after_trimming(upstream, fixture, tls, crane_double,
                                                    tmp_path):
    # Our own server, over plain HTTP, is a second upstream with a different a/b/c/d:1.0.
    other = TreeBuilder(tmp_path / "other")
    other.image("a/b/c/d", "amd64", extra=b"other", tag="1.0")
    with serving(str(tmp_path / "other")) as second:
        extra = tmp_path / "extra.txt"
        extra.write_text("%s/a/b/c/d:1.0\n%s/a/b/c/d:1.0\n%s/library/multi:v1\n"
                         % (upstream.host, host_port(second).replace("127.0.0.1", "localhost"),
                            upstream.host))
        root = tmp_path / "registry"
        base = ["-d", str(root), "-s", "-f", str(extra), "--insecure", "--tool", "crane"]
        result = downloader(base, path_prefix=crane_double)
        assert result.returncode == 1
        assert "use -n" in result.stderr and "localhost:" in result.stderr
        assert "1 ok, 2 failed" in result.stderr
        assert not (root / "a/b/c/d/manifests/1.0").exists()
        result = downloader(base + ["-n"], path_prefix=crane_double)
        assert result.returncode == 0, result.stderr
        assert (root / upstream.host / "a/b/c/d/manifests/1.0").exists()
        with serving(str(root)) as server:
            conn = connect(server)
            status, headers, _ = fetch(conn, "HEAD", "/v2/a/b/c/d/manifests/1.0?ns=" +
                                       upstream.host)
            assert (status, headers["Docker-Content-Digest"]) == (
                200, fixture.images["a/b/c/d:1.0"][0])


@pytest.mark.parametrize("args, message", [
    (["-s"], "needs at least one -f"),
    (["-s", "-f", "/nonexistent/list.txt"], "cannot read image list /nonexistent/list.txt"),
    (["-p", "amd64", "-s", "-f", __file__], "--platform"),
    (["--registries-yaml", "x.yaml"], "go together"),
    (["--tool", "crane", "-s", "-f", os.devnull], "--tool crane: crane is not on PATH"),
])
def test_downloader_errors(args, message, tmp_path):
    result = downloader(["-d", str(tmp_path / "r")] + args,
                        env_extra={"PATH": "/nonexistent"} if "--tool" in args else None)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_downloader_dry_run(tmp_path):
    extra = tmp_path / "extra.txt"
    extra.write_text("nginx\nreg:5000/team/app:1.0\n")
    result = downloader(["-s", "-f", str(extra), "--dry-run", "-d", "reg"])
    assert result.returncode == 0, result.stderr
    assert "docker.io/library/nginx:latest -> reg/library/nginx" in result.stdout
    assert "reg:5000/team/app:1.0 -> reg/team/app" in result.stdout
    assert not (tmp_path / "reg").exists()


def test_demo_tree_serves(tmp_path):
    result = downloader(["--demo", "-d", str(tmp_path / "demo")])
    assert result.returncode == 0, result.stderr
    tree_is_sound(str(tmp_path / "demo"))
    with serving(str(tmp_path / "demo")) as server:
        conn = connect(server)
        status, headers, body = fetch(conn, "GET", "/v2/demo/hello/manifests/latest")
        assert status == 200 and headers["Content-Type"] == er.OCI_MANIFEST
        layer = json.loads(body)["layers"][0]["digest"]
        assert fetch(conn, "GET", "/v2/demo/hello/blobs/" + layer)[0] == 200


# --- Operations: certificates, signals, systemd, hostile clients -----------------------

def https_get(port, path, ca, client=None, timeout=10):
    context = ssl.create_default_context(cafile=ca)
    if client:
        context.load_cert_chain(*client)
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=timeout)
    try:
        return fetch(conn, "GET", path)
    finally:
        conn.close()


def test_mutual_tls(fixture, tls, tmp_path):
    client = make_ca_and_cert(tls["dir"], name="client")
    settings = dict(tls, client_ca=tls["ca"])
    with serving(fixture.root, settings) as server:
        port = server.server_address[1]
        assert https_get(port, "/v2/", tls["ca"], (client["cert"], client["key"]))[0] == 200
        with pytest.raises((ssl.SSLError, ConnectionError)):
            https_get(port, "/v2/", tls["ca"])
        stranger = make_ca_and_cert(tmp_path, name="stranger")  # signed by another CA
        with pytest.raises((ssl.SSLError, ConnectionError)):
            https_get(port, "/v2/", tls["ca"], (stranger["cert"], stranger["key"]))


def read_notifications(sock, count, timeout=20):
    sock.settimeout(timeout)
    return [sock.recv(4096).decode() for _ in range(count)]


def test_certificate_rotation_sighup_and_systemd_notify(fixture, tls, tmp_path):
    live = tmp_path / "live"
    live.mkdir()
    for name in ("cert", "key"):
        shutil.copy(tls[name], str(live / ("server." + name)))
    notify_path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify, \
            contextlib.ExitStack() as stack:
        notify.bind(notify_path)
        os.environ["NOTIFY_SOCKET"] = notify_path
        try:
            process, url = stack.enter_context(server_process(
                "--root", fixture.root, "--cert", str(live / "server.cert"),
                "--key", str(live / "server.key")))
        finally:
            del os.environ["NOTIFY_SOCKET"]
        assert read_notifications(notify, 1) == ["READY=1"]
        port = int(url.rsplit(":", 1)[1])
        context = ssl.create_default_context(cafile=tls["ca"])
        old = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
        assert fetch(old, "GET", "/v2/")[0] == 200
        # Rotate to a certificate from a new CA by replacing the files.
        (tmp_path / "new-ca").mkdir()
        rotated = make_ca_and_cert(tmp_path / "new-ca")
        for name in ("cert", "key"):
            shutil.copy(rotated[name], str(live / ("server." + name + ".new")))
            os.replace(str(live / ("server." + name + ".new")), str(live / ("server." + name)))
        deadline = time.monotonic() + 10
        while True:
            try:
                assert https_get(port, "/v2/", rotated["ca"])[0] == 200
                break
            except ssl.SSLError:
                assert time.monotonic() < deadline, "the rotated certificate was not picked up"
                time.sleep(0.2)
        assert fetch(old, "GET", "/v2/")[0] == 200  # the open connection was not dropped
        # A broken key keeps the current certificate; SIGHUP reloads and says so to systemd.
        (live / "server.key").write_text("not a key\n")
        process.send_signal(signal.SIGHUP)
        states = read_notifications(notify, 2)
        assert states[0].startswith("RELOADING=1\nMONOTONIC_USEC=") and states[1] == "READY=1"
        assert https_get(port, "/v2/", rotated["ca"])[0] == 200
        process.send_signal(signal.SIGTERM)
        assert read_notifications(notify, 1) == ["STOPPING=1"]
        assert process.wait(10) == 0
        log_text = process.stderr.read()
    assert "keeping the current TLS certificate" in log_text
    assert str(live / "server.key") in log_text


def test_sigterm_lets_a_large_transfer_finish(tmp_path):
    builder = TreeBuilder(tmp_path)
    big = os.urandom(64 * 1024 * 1024)
    descriptor = builder.blob(big, "application/octet-stream")
    builder.link_blobs("big")
    with server_process("--root", str(tmp_path), "--shutdown-timeout", "60") as (process, url):
        port = int(url.rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        idle = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        assert fetch(idle, "GET", "/v2/")[0] == 200  # an idle keep-alive connection
        conn.request("GET", "/v2/big/blobs/" + descriptor["digest"])
        response = conn.getresponse()
        received = [response.read(1024 * 1024)]
        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # the server is draining while the client reads on
        while True:
            chunk = response.read(1024 * 1024)
            if not chunk:
                break
            received.append(chunk)
        assert sha256(b"".join(received)) == descriptor["digest"]
        assert process.wait(20) == 0


@pytest.mark.parametrize("count", [300, 2000])
def test_idle_sockets_do_not_block_a_pull(fixture, tls, capsys, tmp_path, count):
    """Sockets that never send a byte; 2,000 is past the default --max-connections, where
    the oldest silent ones are closed to make room."""
    skopeo = need("skopeo")
    with serving(fixture.root, tls) as server:
        held = []
        try:
            for _ in range(count):
                held.append(socket.create_connection(("127.0.0.1", server.server_address[1]),
                                                     timeout=10))
            started = time.monotonic()
            run([skopeo, "copy", "--src-cert-dir", cert_dir_for(tls),
                 "docker://%s/a/b/c/d:1.0" % host_port(server), "dir:%s" % (tmp_path / "copy")])
            elapsed = time.monotonic() - started
        finally:
            for sock in held:
                sock.close()
    with capsys.disabled():
        print("\n[measured] skopeo pull with %d idle sockets held open: %.2fs" % (count, elapsed))
    # Far below the handshake timeout (10 s) that a blocked accept loop would wait out.
    assert elapsed < 8


def child_pids(pid, count=0):
    """The pids of the process's children, once there are count of them."""
    deadline = time.monotonic() + 15
    while True:
        result = subprocess.run(["pgrep", "-P", str(pid)], stdout=subprocess.PIPE,
                                universal_newlines=True)
        pids = sorted(int(p) for p in result.stdout.split())
        if len(pids) >= count:
            return pids
        assert time.monotonic() < deadline, "%d children, not %d" % (len(pids), count)
        time.sleep(0.05)


def test_workers_share_the_port_and_are_supervised(fixture, tls):
    with server_process("--root", fixture.root, "--cert", tls["cert"], "--key", tls["key"],
                        "--workers", "2") as (process, url):
        port = int(url.rsplit(":", 1)[1])
        workers = child_pids(process.pid)
        assert len(workers) == 2
        context = ssl.create_default_context(cafile=tls["ca"])

        def get():
            conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
            return fetch(conn, "GET", "/v2/library/multi/manifests/v1")[0]

        assert [get() for _ in range(20)] == [200] * 20
        process.send_signal(signal.SIGHUP)  # reaches the workers; nobody stops
        time.sleep(0.5)
        assert get() == 200 and child_pids(process.pid) == workers
        os.kill(workers[0], signal.SIGKILL)  # a worker dies: the parent starts another
        deadline = time.monotonic() + 10
        while len(child_pids(process.pid)) < 2 or workers[0] in child_pids(process.pid):
            assert time.monotonic() < deadline, "the dead worker was not replaced"
            time.sleep(0.1)
        assert [get() for _ in range(10)] == [200] * 10
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
        assert child_pids(process.pid) == []
        log_text = process.stderr.read()
    assert "starting another" in log_text and "Traceback" not in log_text


# --- Integrity check -------------------------------------------------------------------

def offline(mode, root, *flags):
    """embedded_registry.py --check or --gc on a tree, as an operator runs it."""
    result = subprocess.run([sys.executable, os.path.join(HERE, "embedded_registry.py"),
                             mode, "--root", str(root)] + list(flags),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, timeout=60)
    assert "Traceback" not in result.stderr
    return result


def check(root, *flags):
    return offline("--check", root, *flags)


def test_check_passes_a_sound_tree(fixture):
    result = check(fixture.root, "--deep", "--json")
    assert result.returncode == 0, result.stdout
    report = json.loads(result.stdout)
    assert report["ok"] and report["problems"] == []
    assert report["counts"]["repositories"] == 4 and report["counts"]["tags"] == 4


def flip_a_bit(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated blob": (lambda r, m: (r / "blobs" / m["layers"][1]["digest"]).write_bytes(b"x"),
                       "bytes,", False),
    "bit-flipped blob": (lambda r, m: flip_a_bit(r / "blobs" / m["layers"][0]["digest"]),
                         "does not hash to its digest", True),
    "missing blob": (lambda r, m: (r / "blobs" / m["config"]["digest"]).unlink(),
                     "is missing", False),
    "corrupt manifest": (lambda r, m: flip_a_bit(r / "app/manifests" / m["digest"]),
                         "not to its name", False),
    "missing children": (lambda r, m: [(r / "app/manifests" / c).unlink() for c in m["children"]],
                         "none of the index's child manifests", False),
    "dangling tag": (lambda r, m: os.symlink("sha256:" + "0" * 64, str(r / "app/manifests/gone")),
                     "dangling symlink", False),
    "stray temporary": (lambda r, m: (r / "blobs" / ".sha256:abc.tmp").write_bytes(b"partial"),
                        "temporary file", False),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_check_finds_damage(tmp_path, damage):
    builder = TreeBuilder(tmp_path)
    _, index_digest, children = builder.index("app", "1", ["amd64", "arm64"])
    manifest = json.loads((tmp_path / "app/manifests" / children[0]).read_bytes())
    manifest.update(digest=children[0], children=children)
    assert check(tmp_path).returncode == 0
    harm, message, deep_only = DAMAGE[damage]
    harm(tmp_path, manifest)
    result = check(tmp_path, "--deep")
    assert result.returncode == 1
    assert message in result.stdout
    assert "problems" in result.stdout.splitlines()[-1]
    if deep_only:
        assert check(tmp_path).returncode == 0


def test_check_json_gives_an_inventory_of_what_is_sound(tmp_path):
    builder = TreeBuilder(tmp_path)
    _, index_digest, children = builder.index("app", "1", ["amd64", "arm64"])
    body, other_digest = builder.image("team/other", "amd64", tag="2")
    layers = json.loads(body)["layers"]
    flip_a_bit(tmp_path / "blobs" / layers[1]["digest"])  # damaged, but the right size
    broken = builder.manifest("team/other", b'{"schemaVersion": 2, "layers": 5, "config": {}}')
    shallow = json.loads(check(tmp_path, "--json").stdout)["inventory"]
    deep = json.loads(check(tmp_path, "--json", "--deep").stdout)["inventory"]
    assert shallow["manifests"] == {index_digest: ["app"], children[0]: ["app"],
                                    children[1]: ["app"], other_digest: ["team/other"]}
    assert broken not in deep["manifests"]
    assert shallow["blobs"][layers[1]["digest"]] == layers[1]["size"]
    assert layers[1]["digest"] not in deep["blobs"]  # --deep: only blobs that hashed right
    assert deep["blobs"][layers[0]["digest"]] == layers[0]["size"]
    assert set(shallow["blobs"]) - set(deep["blobs"]) == {layers[1]["digest"]}


# --- Garbage collection -------------------------------------------------------------------

def two_releases(root):
    """rancher/app:1 and :2 sharing a base layer, and old/gone:1: what each one needs."""
    builder = TreeBuilder(root)
    images = {}
    for repo, tag, extra in (("rancher/app", "1", b"v1"), ("rancher/app", "2", b"v2"),
                             ("old/gone", "1", b"gone")):
        body, digest = builder.image(repo, "amd64", extra=extra, tag=tag)
        document = json.loads(body)
        images[repo, tag] = {"digest": digest, "body": body, "blobs": {
            d["digest"]: d["size"] for d in [document["config"]] + document["layers"]}}
    return images


def gc(root, *flags):
    return offline("--gc", root, *flags)


def test_gc_keeps_what_is_kept_and_frees_exactly_the_rest(tmp_path):
    root = tmp_path / "tree"
    images = two_releases(root)
    keep = tmp_path / "keep.txt"
    keep.write_text("# the release after the upgrade\nrancher/app:2\ndocker.io/x/absent:1\n")
    before = snapshot(str(tmp_path), "")
    dry = json.loads(gc(root, "--keep", str(keep), "--dry-run", "--json").stdout)
    assert snapshot(str(tmp_path), "") == before  # --dry-run removes nothing
    kept = images["rancher/app", "2"]
    gone = [images["rancher/app", "1"], images["old/gone", "1"]]
    freed_blobs = {d: n for image in gone for d, n in image["blobs"].items()
                   if d not in kept["blobs"]}
    expected = sum(freed_blobs.values()) + sum(len(image["body"]) for image in gone)
    result = gc(root, "--keep", str(keep), "--json")
    report = json.loads(result.stdout)
    assert report["bytes_freed"] == dry["bytes_freed"] == expected
    assert report["counts"] == {"tag": 2, "manifest": 2, "blob": len(freed_blobs),
                                "repository": 1}
    assert any("docker.io/x/absent:1" in w or "x/absent:1" in w for w in report["warnings"])
    assert not (root / "old").exists()  # the repository, its blobs link and its folder
    assert check(root, "--deep").returncode == 0
    with serving(root) as server:
        conn = connect(server)
        assert fetch(conn, "GET", "/v2/rancher/app/manifests/2")[0] == 200
        for digest in kept["blobs"]:
            assert sha256(fetch(conn, "GET", "/v2/rancher/app/blobs/" + digest)[2]) == digest
        assert fetch(conn, "GET", "/v2/rancher/app/manifests/1")[0] == 404
        assert fetch(conn, "GET", "/v2/old/gone/manifests/1")[0] == 404
    assert json.loads(gc(root, "--json").stdout)["counts"] == {}  # nothing left to do


def test_gc_without_keep_removes_only_what_no_tag_reaches(tmp_path):
    root = tmp_path / "tree"
    images = two_releases(root)
    (root / "rancher" / "app" / "manifests" / "1").unlink()  # an untagged manifest
    orphan = TreeBuilder(root).blob(b"an orphan blob", "application/octet-stream")
    report = json.loads(gc(root, "--json").stdout)
    removed = {os.path.basename(item["path"]) for item in report["removed"]}
    assert images["rancher/app", "1"]["digest"] in removed and orphan["digest"] in removed
    assert "tag" not in report["counts"]
    assert check(root, "--deep").returncode == 0
    assert (root / "old" / "gone" / "manifests" / "1").exists()


@pytest.mark.parametrize("line", ["bad ref!!", "app:bad:tag", "app@sha256:123"])
def test_gc_refuses_a_bad_keep_line_and_removes_nothing(tmp_path, line):
    root = tmp_path / "tree"
    two_releases(root)
    keep = tmp_path / "keep.txt"
    keep.write_text("rancher/app:2\n\n" + line + "\n")
    before = snapshot(str(tmp_path), "")
    result = gc(root, "--keep", str(keep))
    assert result.returncode == 2 and "%s:3" % keep in result.stderr
    assert "nothing was removed" in result.stderr
    assert snapshot(str(tmp_path), "") == before


def test_gc_refuses_a_damaged_tree_unless_forced(tmp_path):
    root = tmp_path / "tree"
    images = two_releases(root)
    layer = sorted(images["rancher/app", "2"]["blobs"])[0]
    (root / "blobs" / layer).write_bytes(b"x")  # the wrong size
    keep = tmp_path / "keep.txt"
    keep.write_text("rancher/app:2\n")
    before = snapshot(str(tmp_path), "")
    result = gc(root, "--keep", str(keep))
    assert result.returncode == 1 and layer in result.stderr
    assert "nothing was removed" in result.stderr and snapshot(str(tmp_path), "") == before
    assert gc(root, "--keep", str(keep), "--force").returncode == 0
    assert not (root / "old").exists() and (root / "blobs" / layer).exists()


def test_gc_killed_at_any_point_leaves_a_sound_tree_and_completes_when_run_again(
        tmp_path, monkeypatch):
    pristine = tmp_path / "pristine"
    two_releases(pristine)
    TreeBuilder(pristine).index("rancher/multi", "1", ["amd64", "arm64"])  # children go last
    keep = er.parse_image_lists([("keep", "rancher/app:2\n")])
    reference = tmp_path / "reference"
    shutil.copytree(str(pristine), str(reference), symlinks=True)
    total = len(er.GarbageCollection(str(reference), keep).run().removed)
    unlink = os.unlink
    for stop_after in range(total):
        tree = tmp_path / ("run%d" % stop_after)
        shutil.copytree(str(pristine), str(tree), symlinks=True)
        count = [0]

        def dying_unlink(path, *args, **kwargs):
            if count[0] == stop_after:
                raise KeyboardInterrupt  # as kill -9 would stop it, mid-way
            count[0] += 1
            return unlink(path, *args, **kwargs)

        monkeypatch.setattr(os, "unlink", dying_unlink)
        with pytest.raises(KeyboardInterrupt):
            er.GarbageCollection(str(tree), keep).run()
        monkeypatch.setattr(os, "unlink", unlink)
        assert er.TreeCheck(str(tree), deep=True).run().problems == [], stop_after
        er.GarbageCollection(str(tree), keep).run()
        assert snapshot(str(tree), "") == snapshot(str(reference), ""), stop_after


def test_a_blob_removed_while_served_keeps_streaming(tmp_path):
    builder = TreeBuilder(tmp_path)
    builder.image("app", "amd64", tag="1")
    orphan = builder.blob(os.urandom(32 * 1024 * 1024), "application/octet-stream")
    with serving(tmp_path) as server:
        conn = connect(server)
        conn.request("GET", "/v2/app/blobs/" + orphan["digest"])
        response = conn.getresponse()
        received = [response.read(1024 * 1024)]
        removed = er.GarbageCollection(str(tmp_path)).run().removed
        assert [item["path"] for item in removed] == [
            os.path.join(str(tmp_path), "blobs", orphan["digest"])]
        assert not (tmp_path / "blobs" / orphan["digest"]).exists()
        received.append(response.read())
    assert sha256(b"".join(received)) == orphan["digest"]


# --- Blobs verified while served -------------------------------------------------------

def read_cut(conn, path):
    """GET a blob the server may cut short: (status, Content-Length, bytes received)."""
    conn.request("GET", path)
    response = conn.getresponse()
    length = int(response.headers["Content-Length"])
    try:
        body = response.read()
    except http.client.IncompleteRead as cut:
        body = cut.partial
    return response.status, length, body


@pytest.mark.parametrize("damage", ["bit-flipped", "truncated", "small bit-flipped"])
def test_corrupt_blob_is_cut_short_then_refused(tmp_path, caplog, damage):
    builder = TreeBuilder(tmp_path)
    size = 100 * 1024 if damage.startswith("small") else 5 * 1024 * 1024 + 17
    descriptor = builder.blob(os.urandom(size), "application/octet-stream")
    builder.link_blobs("app")
    path = tmp_path / "blobs" / descriptor["digest"]
    if damage == "truncated":
        with open(str(path), "r+b") as f:
            f.truncate(size // 2)
    else:
        flip_a_bit(path)
    url = "/v2/app/blobs/" + descriptor["digest"]
    with caplog.at_level(logging.INFO, logger="embedded_registry"):
        with serving(tmp_path) as server:
            status, length, body = read_cut(connect(server), url)
            if damage.startswith("small"):
                assert status == 404  # hashed before a byte was sent
            else:
                assert status == 200 and len(body) < length  # the final chunk held back
                assert length - len(body) <= er.COPY_CHUNK
            for method in ("GET", "HEAD"):
                status, _, body = fetch(connect(server), method, url)
                assert status == 404
            assert json.loads(fetch(connect(server), "GET", url)[2])["errors"][0]["code"] == \
                "BLOB_UNKNOWN"
    assert str(path) in caplog.text
    assert "Traceback" not in caplog.text


def test_shared_verdicts_are_right_or_unknown():
    verdicts = er.SharedVerdicts(slots=1)  # every file lands in the one slot
    a = ("sha256:" + "a" * 64, "/tree/blobs/a", (1, 2, 30, 40))
    b = ("sha256:" + "b" * 64, "/tree/blobs/b", (1, 3, 30, 40))
    assert verdicts.get(*a) is None
    verdicts.put(*a, True)
    assert verdicts.get(*a) is True and verdicts.get(a[0], a[1], (1, 2, 30, 41)) is None
    assert verdicts.get(b[0], a[1], a[2]) is None  # the same file asked for as another digest
    verdicts.put(*b, False)  # takes the slot over
    assert verdicts.get(*b) is False and verdicts.get(*a) is None
    verdicts._table[:8] = bytes(8)  # as if read half-written by another process
    assert verdicts.get(*b) is None


def test_workers_share_what_hashing_found(tmp_path, tls):
    builder = TreeBuilder(tmp_path)
    descriptor = builder.blob(os.urandom(5 * 1024 * 1024), "application/octet-stream")
    builder.link_blobs("app")
    flip_a_bit(tmp_path / "blobs" / descriptor["digest"])
    url = "/v2/app/blobs/" + descriptor["digest"]
    with server_process("--root", str(tmp_path), "--cert", tls["cert"], "--key", tls["key"],
                        "--workers", "2") as (process, base):
        port = int(base.rsplit(":", 1)[1])
        context = ssl.create_default_context(cafile=tls["ca"])

        def connection():
            """A connection served by the worker that is not stopped: the kernel spreads
            connections over the workers' sockets, so one that waits on the stopped
            worker's socket is given up for another."""
            for _ in range(40):  # each lands on the running worker with even odds
                conn = http.client.HTTPSConnection("127.0.0.1", port, context=context,
                                                   timeout=0.5)
                try:
                    conn.connect()
                except socket.timeout:
                    conn.close()
                    continue
                conn.sock.settimeout(10)
                return conn
            raise AssertionError("no connection reached the running worker")

        first, second = child_pids(process.pid)
        os.kill(second, signal.SIGSTOP)  # every connection now served by the first worker
        try:
            status, length, body = read_cut(connection(), url)
            assert status == 200 and len(body) < length  # the first worker found it corrupt
        finally:
            os.kill(second, signal.SIGCONT)
        os.kill(first, signal.SIGSTOP)  # and now to the second, which never hashed it
        try:
            assert [fetch(connection(), method, url)[0] for method in ("HEAD", "GET")] == \
                [404, 404]
        finally:
            os.kill(first, signal.SIGCONT)


def test_sound_blob_is_verified_once_and_repaired_blob_served(tmp_path, caplog):
    builder = TreeBuilder(tmp_path)
    data = os.urandom(3 * 1024 * 1024)
    descriptor = builder.blob(data, "application/octet-stream")
    builder.link_blobs("app")
    path = tmp_path / "blobs" / descriptor["digest"]
    url = "/v2/app/blobs/" + descriptor["digest"]
    with serving(tmp_path) as server:
        conn = connect(server)
        for _ in range(2):
            status, length, body = read_cut(conn, url)
            assert (status, length, sha256(body)) == (200, len(data), descriptor["digest"])
        assert fetch(conn, "GET", url, {"Range": "bytes=10-19"})[2] == data[10:20]
        # Damaged after its verdict: the file's identity changed, so it is hashed again.
        flip_a_bit(path)
        assert len(read_cut(connect(server), url)[2]) < len(data)
        assert fetch(connect(server), "GET", url)[0] == 404
        path.write_bytes(data)  # repaired in place
        status, _, body = read_cut(connect(server), url)
        assert status == 200 and body == data


@pytest.mark.parametrize("verified", [False, True], ids=["hashed as sent", "sendfile"])
def test_blob_truncated_while_served_is_cut(tmp_path, caplog, verified):
    builder = TreeBuilder(tmp_path)
    data = os.urandom(48 * 1024 * 1024)
    descriptor = builder.blob(data, "application/octet-stream")
    builder.link_blobs("app")
    path = str(tmp_path / "blobs" / descriptor["digest"])
    with caplog.at_level(logging.INFO, logger="embedded_registry"):
        with serving(tmp_path) as server:
            conn = connect(server)
            if verified:  # a sound blob already hashed goes out by sendfile (plain HTTP)
                assert read_cut(conn, "/v2/app/blobs/" + descriptor["digest"])[2] == data
            conn.request("GET", "/v2/app/blobs/" + descriptor["digest"])
            response = conn.getresponse()
            first = response.read(1024 * 1024)
            with open(path, "r+b") as f:
                f.truncate(2 * 1024 * 1024)
            with pytest.raises(http.client.IncompleteRead):
                response.read()
            assert first == data[:len(first)]
            # The server is fine, and the shortened file no longer matches its name.
            assert fetch(connect(server), "GET", "/v2/")[0] == 200
    assert "ended" in caplog.text and path in caplog.text


# --- Hostile clients: slow loris, stalled readers ------------------------------------------

def test_slow_loris_sockets_are_cut_and_do_not_block_a_pull(fixture, tls, capsys, tmp_path):
    skopeo = need("skopeo")
    with serving(fixture.root, tls, header_timeout=2) as server:
        context = ssl.create_default_context(cafile=tls["ca"])
        lorises, began = [], []
        try:
            for _ in range(300):
                sock = context.wrap_socket(socket.create_connection(
                    ("127.0.0.1", server.server_address[1])), server_hostname="127.0.0.1")
                sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")
                began.append(time.monotonic())
                sock.settimeout(0.01)
                lorises.append(sock)
            cut_at = {}  # socket number -> seconds from its first byte until the cut
            started = time.monotonic()
            finished = []

            def pull():
                run([skopeo, "copy", "--src-cert-dir", cert_dir_for(tls),
                     "docker://%s/a/b/c/d:1.0" % host_port(server),
                     "dir:%s" % (tmp_path / "copy")])
                finished.append(time.monotonic() - started)

            puller = threading.Thread(target=pull)
            puller.start()
            while len(cut_at) < len(lorises) and time.monotonic() - started < 30:
                for number, sock in enumerate(lorises):  # one more header byte each
                    if number in cut_at:
                        continue
                    try:
                        sock.sendall(b"X")
                        if sock.recv(1024) == b"":
                            cut_at[number] = time.monotonic() - began[number]
                    except (ssl.SSLWantReadError, socket.timeout):
                        pass
                    except OSError:
                        cut_at[number] = time.monotonic() - began[number]
                time.sleep(0.2)
            puller.join(60)
        finally:
            for sock in lorises:
                sock.close()
    with capsys.disabled():
        print("\n[measured] skopeo pull beside 300 slow-loris sockets: %.2fs; the 2 s header "
              "deadline cut each %.2f-%.2fs after its first byte" % (
                  finished[0], min(cut_at.values()), max(cut_at.values())))
    assert finished, "the pull failed"
    assert len(cut_at) == 300, "some trickling sockets were never cut"
    assert finished[0] < 8
    # They kept sending, yet the deadline held: a per-receive timeout would never fire.
    assert min(cut_at.values()) >= 1.9


def test_client_that_stops_reading_is_cut_off(tmp_path, caplog):
    builder = TreeBuilder(tmp_path)
    descriptor = builder.blob(os.urandom(64 * 1024 * 1024), "application/octet-stream")
    builder.link_blobs("big")
    with caplog.at_level(logging.INFO, logger="embedded_registry"):
        with serving(tmp_path, send_timeout=1, max_connections=1) as server:
            stalled = socket.socket()
            stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            stalled.connect(("127.0.0.1", server.server_address[1]))
            stalled.sendall(b"GET /v2/big/blobs/%s HTTP/1.1\r\nHost: x\r\n\r\n" %
                            descriptor["digest"].encode())
            time.sleep(0.5)
            # The stalled reader holds the only connection slot until it is cut off.
            started = time.monotonic()
            status = fetch(connect(server), "GET", "/v2/")[0]
            waited = time.monotonic() - started
            stalled.settimeout(10)
            received = 0
            with contextlib.suppress(ConnectionError):
                for chunk in iter(lambda: stalled.recv(1 << 20), b""):
                    received += len(chunk)
            stalled.close()
    assert status == 200
    assert 0.3 < waited < 10
    assert received < 64 * 1024 * 1024
    assert "timed out" in caplog.text and "Traceback" not in caplog.text


# --- Importing image archives (--from-archive) -------------------------------------------

@pytest.fixture(scope="session")
def archives(tmp_path_factory, tls_server, tls, fixture):
    """Archives made by skopeo from the fixture: an OCI archive holding the whole index,
    and Docker archives (one platform each), in .tar, .tar.gz and .tar.zst."""
    skopeo = need("skopeo")
    zstd = need("zstd")
    directory = tmp_path_factory.mktemp("archives")
    source = "docker://%s/" % host_port(tls_server)
    certs = cert_dir_for(tls)
    oci = str(directory / "multi-oci.tar")
    run([skopeo, "copy", "--all", "--preserve-digests", "--src-cert-dir", certs,
         source + "library/multi:v1", "oci-archive:%s:docker.io/library/multi:v1" % oci])
    docker = str(directory / "abcd-docker.tar")
    run([skopeo, "copy", "--src-cert-dir", certs, source + "a/b/c/d:1.0",
         "docker-archive:%s:docker.io/a/b/c/d:1.0" % docker])
    listed = str(directory / "list-docker.tar")
    run([skopeo, "copy", "--override-arch", "arm64", "--src-cert-dir", certs,
         source + "rancher/docker-list:v2", "docker-archive:%s:rancher/docker-list:v2" % listed])
    with open(oci, "rb") as f, gzip.open(oci + ".gz", "wb") as out:
        shutil.copyfileobj(f, out)
    run([zstd, "-q", docker, "-o", docker + ".zst"])
    return {"oci": oci, "oci.gz": oci + ".gz", "docker": docker, "docker.zst": docker + ".zst",
            "list": listed}


def blob_of(root, descriptor):
    return (root / "blobs" / descriptor["digest"]).read_bytes()


@pytest.mark.parametrize("oci, docker", [("oci", "docker"), ("oci.gz", "docker.zst")])
def test_archives_import_into_a_tree_that_serves(archives, fixture, tls, containerd, tmp_path,
                                                 oci, docker):
    root = tmp_path / "registry"
    result = downloader(["--from-archive", archives[oci], archives[docker], archives["list"],
                         "-p", "linux/arm64", "-d", str(root)])
    assert result.returncode == 0, result.stderr
    assert "3 images: 3 ok, 0 failed" in result.stdout
    tree_is_sound(str(root))
    assert check(root, "--deep").returncode == 0
    # OCI: every byte kept, so the upstream index digest still resolves, with arm64 only.
    index_digest, _, children = fixture.images["library/multi:v1"]
    manifests = root / "library/multi/manifests"
    assert os.readlink(str(manifests / "v1")) == index_digest
    assert (manifests / children[1]).exists() and not (manifests / children[0]).exists()
    # Docker: the config (the image ID) and the uncompressed layers' diff IDs match upstream.
    upstream_manifest = json.loads(open(fixture.file(
        "a/b/c/d/manifests", fixture.images["a/b/c/d:1.0"][0]), "rb").read())
    tag = root / "a/b/c/d/manifests/1.0"
    imported = json.loads(tag.read_bytes())
    assert imported["mediaType"] == er.DOCKER_MANIFEST
    assert imported["config"]["digest"] == upstream_manifest["config"]["digest"]
    diff_ids = json.loads(blob_of(root, imported["config"]))["rootfs"]["diff_ids"]
    assert [layer["digest"] for layer in imported["layers"]] == diff_ids
    assert os.readlink(str(tag)) != fixture.images["a/b/c/d:1.0"][0]
    # The same archive imports to the same tree: digests are reproducible.
    again = tmp_path / "again"
    assert downloader(["--from-archive", archives["docker"], "-d", str(again)]).returncode == 0
    assert os.readlink(str(again / "a/b/c/d/manifests/1.0")) == os.readlink(str(tag))
    # containerd pulls what was imported, the OCI image by its upstream digest.
    with serving(root, tls) as server:
        write_hosts_toml(containerd.hosts_dir, MIRROR, ["https://" + host_port(server)],
                         tls["ca"])
        pulls = {"%s/library/multi@%s" % (MIRROR, index_digest): index_digest,
                 MIRROR + "/a/b/c/d:1.0": os.readlink(str(tag)),
                 MIRROR + "/rancher/docker-list:v2":
                     os.readlink(str(root / "rancher/docker-list/manifests/v2"))}
        for ref in pulls:
            containerd("images", "pull", "--hosts-dir", containerd.hosts_dir,
                       "--snapshotter", "native", "--platform", "linux/arm64", ref)
    assert ctr_image_digests(containerd) == pulls


def tar_of(path, members):
    """A tar file of {name: bytes or ('symlink', target)}."""
    with tarfile.open(str(path), "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(data, tuple):
                info.type, info.linkname = tarfile.SYMTYPE, data[1]
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_archive_import_errors_are_clear(archives, tmp_path):
    root = tmp_path / "registry"
    not_tar = tmp_path / "notes.tar"
    not_tar.write_bytes(b"hello, not a tar")
    empty = tar_of(tmp_path / "empty.tar", {"README": b"hi"})
    cases = [
        ([str(tmp_path / "missing.tar")], "archive %s does not exist" % (tmp_path / "missing.tar")),
        ([str(not_tar)], "cannot read %s as a tar archive" % not_tar),
        ([empty], "%s holds neither an OCI layout (index.json) nor a Docker archive" % empty),
        ([archives["docker.zst"]], "the zstd program is not installed"),
    ]
    for files, message in cases:
        env = {"PATH": os.path.dirname(sys.executable)} if files[0].endswith(".zst") else None
        result = downloader(["--from-archive"] + files + ["-d", str(root)], env_extra=env)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr
        assert "Traceback" not in result.stderr
    # Images without a name are reported, the rest imported; nothing escapes the tree.
    with tarfile.open(archives["docker"]) as source:
        members = {m.name: source.extractfile(m).read() if m.isfile() else ("symlink", m.linkname)
                   for m in source.getmembers()}
    entries = json.loads(members["manifest.json"])
    entries.append(dict(entries[0], RepoTags=None))
    members["manifest.json"] = json.dumps(entries).encode()
    members["../escaped"] = b"outside"
    members["/absolute"] = b"outside"
    mixed = tar_of(tmp_path / "mixed.tar", members)
    result = downloader(["--from-archive", mixed, "-d", str(root)])
    assert result.returncode == 1
    assert "FAILED %s, manifest.json entry 2: no RepoTags" % mixed in result.stderr
    assert "1 ok, 1 failed" in result.stderr
    assert not (tmp_path / "escaped").exists() and not os.path.exists("/absolute")
    tree_is_sound(str(root))
    assert (root / "a/b/c/d/manifests/1.0").exists()


# --- The whole air-gap journey, end to end -------------------------------------------------

K3S_LIKE = [  # (repo, tag, platforms, docker list?) — shaped like a k3s release's images
    ("rancher/mirrored-pause", "3.6", ["amd64", "arm64"], False),
    ("rancher/mirrored-coredns-coredns", "1.10.1", ["amd64", "arm64"], True),
    ("rancher/local-path-provisioner", "v0.0.24", ["amd64", "arm64"], False),
    ("rancher/mirrored-metrics-server", "v0.6.3", ["amd64"], False),
    ("rancher/klipper-helm", "v0.8.0-build20230510", ["amd64"], True),
    ("rancher/klipper-lb", "v0.4.4", ["amd64", "arm64"], True),
    ("rancher/mirrored-library-traefik", "2.9.10", ["amd64"], False),
    ("rancher/mirrored-library-busybox", "1.34.1", ["amd64", "arm64"], False),
]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def registry_on(port, root, tls, log_path):
    """embedded_registry.py with TLS on a given port, logging to a file, as on a node."""
    argv = [sys.executable, os.path.join(HERE, "embedded_registry.py"), "--root", str(root),
            "--cert", tls["cert"], "--key", tls["key"], "--listen", "127.0.0.1:%d" % port]
    with open(str(log_path), "a") as log_file:
        process = subprocess.Popen(argv, stderr=log_file)
    try:
        deadline = time.monotonic() + 15
        while "serving https://127.0.0.1:%d/v2/" % port not in log_path.read_text():
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "the registry did not start"
            time.sleep(0.05)
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
        process.wait(30)


def hosts_from_registries_yaml(text, hosts_dir):
    """Write hosts.toml files from a registries.yaml as k3s does: one per mirror, with the
    CA of each endpoint's configs: entry. server is the last endpoint (never the internet)."""
    mirrors, cas, section, current = {}, {}, None, None
    for line in text.splitlines():
        if line in ("mirrors:", "configs:"):
            section = line[:-1]
        elif re.match(r'  "[^"]+":$', line):
            current = line.strip()[1:-2]
            if section == "mirrors":
                mirrors[current] = []
        elif section == "mirrors" and line.strip().startswith("- "):
            mirrors[current].append(line.strip()[2:].strip('"'))
        elif section == "configs" and line.strip().startswith("ca_file:"):
            cas[current] = line.split(":", 1)[1].strip().strip('"')
    for registry, endpoints in mirrors.items():
        ca = cas[urllib.parse.urlsplit(endpoints[0]).netloc]
        write_hosts_toml(hosts_dir, registry, endpoints, ca)
    return mirrors


@pytest.fixture(scope="session")
def k3s_like_upstream(tmp_path_factory, tls):
    """An upstream distribution holding ten k3s-like images, shared base layers included."""
    skopeo = need("skopeo")
    staging = tmp_path_factory.mktemp("k3s-like")
    builder = TreeBuilder(staging)
    for repo, tag, arches, docker in K3S_LIKE:
        if len(arches) > 1:
            builder.index(repo, tag, arches, docker=docker)
        else:
            builder.image(repo, arches[0], docker=docker, tag=tag)
    builder.image("myorg/app", "amd64", tag="1.0")
    _, pinned = builder.image("myorg/tool", "amd64", tag="2.3")
    builder.image("myorg/late", "amd64", tag="0.1")  # added to the tree after the first trip
    registry = Upstream(str(tmp_path_factory.mktemp("k3s-like-upstream")))
    try:
        with serving(staging, tls) as server:
            for repo, tag, _, _ in K3S_LIKE + [("myorg/app", "1.0", 0, 0),
                                                 ("myorg/tool", "2.3", 0, 0),
                                                 ("myorg/late", "0.1", 0, 0)]:
                registry.push("docker://%s/%s:%s" % (host_port(server), repo, tag),
                              "%s:%s" % (repo, tag), skopeo, cert_dir_for(tls))
        registry.pinned = pinned
        body = registry.raw("myorg/app:1.0", skopeo)
        registry.signed = sign_on_upstream(Pusher(registry.host), "myorg/app", {
            "mediaType": er.OCI_MANIFEST, "digest": sha256(body), "size": len(body)})
        yield registry
    finally:
        registry.stop()


def test_air_gap_journey(k3s_like_upstream, tls, containerd, tmp_path, capsys):
    skopeo = need("skopeo")
    up = k3s_like_upstream.host
    # 1. The internet host: the k3s image list from the (local) release server, plus extras.
    releases = K3sReleases("v1.99.9+k3s1", "".join(
        "%s/%s:%s\n" % (up, repo, tag) for repo, tag, _, _ in K3S_LIKE))
    internet = tmp_path / "internet-host"
    internet.mkdir()
    extra = internet / "extra.txt"
    extra.write_text("# our workloads\n%s/myorg/app:1.0\n%s/myorg/tool@%s\n"
                     % (up, up, k3s_like_upstream.pinned))
    port = free_port()
    node = tmp_path / "node"
    ca_on_node = node / "etc/embedded-registry/ca.crt"
    download = downloader(["-f", str(extra), "-p", "linux/amd64", "--insecure",
                           "--tool", "skopeo", "--channel-url", releases.base + "/channels",
                           "--release-url", releases.base + "/download",
                           "--registries-yaml", "registries.yaml",
                           "--endpoint", "https://127.0.0.1:%d" % port,
                           "--ca-file", str(ca_on_node)], cwd=str(internet))
    assert download.returncode == 0, download.stderr
    assert "10 images: 10 ok, 0 failed" in download.stdout
    assert "with them: 2 signatures, 1 attestation, 1 SBOM" in download.stdout
    # 2. Carry: one tarball, extracted elsewhere.
    run(["tar", "-zcf", "registry.tar.gz", "registry"], cwd=str(internet))
    server_dir = node / "var/lib/rancher/k3s/server"
    server_dir.mkdir(parents=True)
    run(["tar", "-zxf", str(internet / "registry.tar.gz"), "-C", str(server_dir)])
    root = server_dir / "registry"
    ca_on_node.parent.mkdir(parents=True)
    shutil.copy(tls["ca"], str(ca_on_node))
    # 3. The node: the tree checks out, then the server starts with TLS.
    checked = check(root, "--deep")
    assert checked.returncode == 0, checked.stdout
    # 4. containerd, configured from the generated registries.yaml as k3s configures it.
    mirrors = hosts_from_registries_yaml((internet / "registries.yaml").read_text(),
                                         containerd.hosts_dir)
    assert set(mirrors) == {MIRROR, up}
    write_hosts_toml(containerd.hosts_dir, "docker.io", ["https://127.0.0.1:%d" % port],
                     str(ca_on_node))  # the hijack an operator adds for docker.io names
    log_path = node / "registry.log"
    expected = {}
    with registry_on(port, root, tls, log_path):
        for repo, tag, _, _ in K3S_LIKE:
            expected["%s/%s:%s" % (MIRROR, repo, tag)] = k3s_like_upstream.raw(
                "%s:%s" % (repo, tag), skopeo)
        expected["docker.io/myorg/app:1.0"] = k3s_like_upstream.raw("myorg/app:1.0", skopeo)
        expected["%s/myorg/tool@%s" % (MIRROR, k3s_like_upstream.pinned)] = None
        expected = {ref: sha256(raw) if raw else k3s_like_upstream.pinned
                    for ref, raw in expected.items()}
        started = time.monotonic()
        for ref in expected:
            containerd("images", "pull", "--hosts-dir", containerd.hosts_dir,
                       "--snapshotter", "native", "--platform", "linux/amd64", ref)
        pull_seconds = time.monotonic() - started
        # What a verifier asks the node for the signed image: its cosign signature by tag,
        # and its SBOM (and the SBOM's signature) through the referrers API.
        signed = k3s_like_upstream.signed
        app = expected["docker.io/myorg/app:1.0"]
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=30,
                                           context=ssl.create_default_context(
                                               cafile=str(ca_on_node)))
        status, _, body = fetch(conn, "GET", "/v2/myorg/app/manifests/sha256-%s.sig" % app[7:])
        assert status == 200 and sha256(body) == signed["signature"]["digest"]
        assert list(referrer_digests(conn, "myorg/app", app)[0]) == [signed["sbom"]["digest"]]
        assert list(referrer_digests(conn, "myorg/app", signed["sbom"]["digest"])[0]) == [
            signed["sbom_signature"]["digest"]]
    assert ctr_image_digests(containerd) == expected
    first_log = log_path.read_text()
    statuses = re.findall(r" (?:GET|HEAD) /v2/\S* (\d{3}) \d+ ", first_log)
    assert len(statuses) > 30 and set(statuses) == {"200"}, first_log
    # 5. Restart: what was pulled needs nothing; an image added later pulls without restarts.
    log_path.write_text("")
    with registry_on(port, root, tls, log_path):
        for ref in list(expected)[:3]:
            containerd("images", "pull", "--hosts-dir", containerd.hosts_dir,
                       "--snapshotter", "native", "--platform", "linux/amd64", ref)
        assert "/blobs/" not in log_path.read_text()
        later = internet / "later.txt"
        later.write_text("%s/myorg/late:0.1\n" % up)
        assert downloader(["-s", "-f", str(later), "--insecure", "--tool", "skopeo"],
                          cwd=str(internet)).returncode == 0
        run(["tar", "-zcf", "registry.tar.gz", "registry"], cwd=str(internet))
        run(["tar", "-zxf", str(internet / "registry.tar.gz"), "-C", str(server_dir)])
        containerd("images", "pull", "--hosts-dir", containerd.hosts_dir,
                   "--snapshotter", "native", MIRROR + "/myorg/late:0.1")
    assert ctr_image_digests(containerd)[MIRROR + "/myorg/late:0.1"] == sha256(
        k3s_like_upstream.raw("myorg/late:0.1", skopeo))
    with capsys.disabled():
        print("\n[journey] %s\n[journey] %s\n[journey] %d images pulled by containerd in %.1fs"
              % ("; ".join(download.stdout.strip().splitlines()), checked.stdout.strip(),
                 len(expected), pull_seconds))


def test_failover_to_the_second_registry(fixture, tls, containerd, tmp_path):
    """Two nodes' registries from one tree; the first dies mid-run, the second serves on."""
    ports = [free_port(), free_port()]
    endpoints = ["https://127.0.0.1:%d" % p for p in ports]
    write_hosts_toml(containerd.hosts_dir, MIRROR, endpoints, tls["ca"])
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    refs = ["%s/%s" % (MIRROR, image) for image in fixture.images]
    with registry_on(ports[1], fixture.root, tls, logs[1]):
        with registry_on(ports[0], fixture.root, tls, logs[0]) as first:
            containerd("images", "pull", "--hosts-dir", containerd.hosts_dir,
                       "--snapshotter", "native", refs[0])
            assert "/manifests/" in logs[0].read_text()
            assert "/manifests/" not in logs[1].read_text()
            first.kill()  # a node going down hard, not a clean stop
        for ref in refs[1:]:
            containerd("images", "pull", "--hosts-dir", containerd.hosts_dir,
                       "--snapshotter", "native", ref)
    pulled = ctr_image_digests(containerd)
    for image, (digest, _, _) in fixture.images.items():
        assert pulled["%s/%s" % (MIRROR, image)] == digest
    assert "/manifests/" in logs[1].read_text()


# --- Hardening: hostile trees ----------------------------------------------------------

def count_lines(text, *needles):
    return sum(1 for line in text.splitlines() if all(n in line for n in needles))


@pytest.mark.parametrize("link", ["symlink", "hard link"])
@pytest.mark.parametrize("first", ["true name", "false name"])
@pytest.mark.parametrize("size", [100 * 1024, 3 * 1024 * 1024 + 5])
def test_a_link_never_lends_or_takes_a_verdict(tmp_path, caplog, link, first, size):
    """ROOT/blobs/A is a link to blob B's sound file: A is never served, B always is."""
    builder = TreeBuilder(tmp_path)
    true = builder.blob(os.urandom(size), "application/octet-stream")
    false_digest = sha256(b"another blob")
    blobs = tmp_path / "blobs"
    if link == "symlink":
        os.symlink(true["digest"], str(blobs / false_digest))
    else:
        os.link(str(blobs / true["digest"]), str(blobs / false_digest))
    builder.link_blobs("app")
    true_url, false_url = "/v2/app/blobs/" + true["digest"], "/v2/app/blobs/" + false_digest

    def assert_true_served(server):
        status, _, body = fetch(connect(server), "GET", true_url)
        assert status == 200 and sha256(body) == true["digest"]

    def assert_false_refused(server):
        status, length, body = read_cut(connect(server), false_url)
        assert status == 404 or len(body) < length  # never a complete wrong blob
        assert fetch(connect(server), "GET", false_url)[0] == 404

    with caplog.at_level(logging.INFO, logger="embedded_registry"):
        with serving(tmp_path) as server:
            if first == "true name":
                assert_true_served(server)
                assert_false_refused(server)
            else:
                assert_false_refused(server)
            assert_true_served(server)
            assert_true_served(server)
    assert "Traceback" not in caplog.text


def test_listings_obey_the_root(tmp_path, caplog):
    root, outside = tmp_path / "root", tmp_path / "outside"
    TreeBuilder(root).image("good/app", "amd64", tag="1")
    outside.mkdir()
    (outside / "secret-name").write_text("x")
    os.makedirs(str(root / "leak"))
    os.symlink(str(outside), str(root / "leak" / "manifests"))
    with caplog.at_level(logging.INFO, logger="embedded_registry"):
        with serving(root) as server:
            conn = connect(server)
            for _ in range(3):
                status, _, body = fetch(conn, "GET", "/v2/leak/tags/list")
                assert status == 404 and b"secret-name" not in body
                assert json.loads(body)["errors"][0]["code"] == "NAME_UNKNOWN"
                status, _, body = fetch(conn, "GET", "/v2/_catalog")
                assert status == 200 and json.loads(body)["repositories"] == ["good/app"]
    assert count_lines(caplog.text, str(root / "leak" / "manifests"),
                       "resolves outside the root") == 1
    result = check(root)
    assert result.returncode == 1 and "leads outside the root" in result.stdout


def test_fifos_in_the_tree_never_block(tmp_path, caplog):
    builder = TreeBuilder(tmp_path)
    builder.image("app", "amd64", tag="1")
    fifo_blob = sha256(b"a fifo")
    os.mkfifo(str(tmp_path / "blobs" / fifo_blob))
    os.mkfifo(str(tmp_path / "app" / "manifests" / "pipe"))
    os.mkfifo(str(tmp_path / "app" / "manifests" / sha256(b"another fifo")))
    with caplog.at_level(logging.INFO, logger="embedded_registry"):
        with serving(tmp_path, max_connections=4) as server:
            for _ in range(3):
                for path in ("/v2/app/blobs/" + fifo_blob, "/v2/app/manifests/pipe",
                             "/v2/app/manifests/" + sha256(b"another fifo")):
                    assert fetch(connect(server), "GET", path)[0] == 404
            assert fetch(connect(server), "GET", "/v2/")[0] == 200
    assert count_lines(caplog.text, fifo_blob, "not a regular file") == 1
    result = check(tmp_path)  # check() itself has a time limit
    assert result.returncode == 1
    assert count_lines(result.stdout, "pipe", "not a regular file") == 1


@contextlib.contextmanager
def directory_chain(top, depth):
    """top/d/d/.../d, depth levels, made and removed one level at a time (recursive
    makedirs and rmtree would hit Python's recursion limit)."""
    cwd = os.getcwd()
    os.mkdir(top)
    try:
        os.chdir(top)
        for _ in range(depth):
            os.mkdir("d")
            os.chdir("d")
    finally:
        os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(top)
        for _ in range(depth - 1):
            os.chdir("d")
        for _ in range(depth):
            os.rmdir("d")
            os.chdir("..")
        os.chdir(cwd)


def test_deep_trees_and_deep_documents(tmp_path, caplog):
    builder = TreeBuilder(tmp_path)
    builder.image("good/app", "amd64", tag="1")
    nested = b"[" * 100000 + b"]" * 100000
    (tmp_path / "good" / "app" / "manifests" / "nested").write_bytes(nested)
    with directory_chain(str(tmp_path / "deep"), 1100):
        with caplog.at_level(logging.INFO, logger="embedded_registry"):
            with serving(tmp_path) as server:
                conn = connect(server)
                status, _, body = fetch(conn, "GET", "/v2/_catalog")
                assert status == 200 and json.loads(body)["repositories"] == ["good/app"]
                for _ in range(3):
                    assert fetch(conn, "GET", "/v2/good/app/manifests/nested")[0] == 404
        result = check(tmp_path)
    assert count_lines(caplog.text, "nested", "nested too deeply") == 1
    assert "Traceback" not in caplog.text and "RecursionError" not in caplog.text
    assert result.returncode == 1
    assert "nested too deeply" in result.stdout and "deeper than any repository" in result.stdout


SHAPES = {
    "manifests a string": lambda m, i: i.update(manifests="abc"),
    "manifests of numbers": lambda m, i: i.update(manifests=[1, 2]),
    "layers a number": lambda m, i: m.update(layers=5),
    "config digest a number": lambda m, i: m["config"].update(digest=123),
    "digest a list": lambda m, i: m["layers"][0].update(digest=["sha256:00"]),
    "platform os a number": lambda m, i: i["manifests"][0]["platform"].update(os=5),
    "digest a path": lambda m, i: m["layers"][0].update(digest="../../../etc/passwd"),
    "size a string": lambda m, i: m["layers"][0].update(size="12"),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_check_reports_every_shape_of_manifest(tmp_path, shape):
    builder = TreeBuilder(tmp_path)
    _, _, children = builder.index("app", "1", ["amd64"])
    manifest_path = tmp_path / "app" / "manifests" / children[0]
    manifest = json.loads(manifest_path.read_bytes())
    index = json.loads((tmp_path / "app" / "manifests" / "1").read_bytes())
    SHAPES[shape](manifest, index)
    # Written under new digests: the shape, not the name, is what is wrong.
    builder.manifest("app", json.dumps(manifest).encode(), tag="single")
    builder.manifest("app", json.dumps(index).encode(), tag="index")
    result = check(tmp_path, "--deep")
    assert result.returncode == 1, result.stdout
    assert " has " in result.stdout, result.stdout


@pytest.fixture()
def unprivileged():
    """A world-readable copy of the server and a tree folder, to run --check as nobody."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run --check as another user")
    python = "/usr/bin/python3"
    if not os.path.exists(python):
        pytest.skip("needs /usr/bin/python3, which the user nobody can run")
    base = tempfile.mkdtemp(prefix="er-nobody-")
    os.chmod(base, 0o755)
    shutil.copy(os.path.join(HERE, "embedded_registry.py"), base)

    def check_as_nobody(root, *flags):
        result = subprocess.run(
            [python, os.path.join(base, "embedded_registry.py"), "--check", "--root", root]
            + list(flags), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            universal_newlines=True, timeout=60, user="nobody")
        assert "Traceback" not in result.stderr, result.stderr
        return result

    yield base, check_as_nobody
    shutil.rmtree(base)


@pytest.mark.parametrize("unreadable", ["root", "repository", "manifests", "blob"])
def test_check_reports_what_its_user_cannot_read(unprivileged, unreadable):
    base, check_as_nobody = unprivileged
    root = os.path.join(base, "tree")
    builder = TreeBuilder(root)
    _, digest = builder.image("app", "amd64", tag="1")
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            with contextlib.suppress(FileNotFoundError):
                os.chmod(os.path.join(top, name), 0o755 if name in dirs else 0o644)
    os.chmod(root, 0o755)
    assert check_as_nobody(root, "--deep").returncode == 0
    layer = json.loads(open(os.path.join(root, "app", "manifests", digest), "rb").read())[
        "layers"][0]["digest"]
    target = {"root": root, "repository": os.path.join(root, "app"),
              "manifests": os.path.join(root, "app", "manifests"),
              "blob": os.path.join(root, "blobs", layer)}[unreadable]
    os.chmod(target, 0o600 if unreadable == "blob" else 0o700)
    for flags in ([], ["--deep"]):
        result = check_as_nobody(root, *flags)
        assert result.returncode == 1, (flags, result.stdout)
        assert "Permission denied" in result.stdout, result.stdout


def test_refusals_are_logged_once_per_file(tmp_path, caplog):
    root, outside = tmp_path / "root", tmp_path / "outside"
    builder = TreeBuilder(root)
    body, digest = builder.image("app", "amd64", tag="1")
    outside.mkdir()
    (outside / "x").write_bytes(b"{}")
    os.symlink(str(outside / "x"), str(root / "app" / "manifests" / "out"))
    wrong = sha256(b"not this manifest")
    os.symlink(digest, str(root / "app" / "manifests" / wrong))  # hashes to another digest
    corrupt = builder.blob(os.urandom(1000), "application/octet-stream")
    flip_a_bit(root / "blobs" / corrupt["digest"])
    os.makedirs(str(root / "c" / "d" / "manifests"))
    os.symlink(str(outside), str(root / "c" / "d" / "blobs"))
    with caplog.at_level(logging.INFO, logger="embedded_registry"):
        with serving(root) as server:
            conn = connect(server)
            for _ in range(5):
                for path in ("/v2/app/manifests/out", "/v2/app/manifests/" + wrong,
                             "/v2/app/blobs/" + corrupt["digest"]):
                    assert fetch(conn, "GET", path)[0] == 404
            for number in range(300):  # a new name each time, beneath one bad link
                assert fetch(conn, "GET", "/v2/c/d/blobs/" + sha256(b"%d" % number))[0] == 404
    assert count_lines(caplog.text, "resolves outside the root") == 2
    assert count_lines(caplog.text, "does not hash to " + wrong) == 1
    assert count_lines(caplog.text, corrupt["digest"], "WARNING") + count_lines(
        caplog.text, corrupt["digest"], "ERROR") == 1


# --- Hardening: hostile clients --------------------------------------------------------

@pytest.mark.parametrize("value", ["bytes=0-" + "9" * 5000, "bytes=%s-" % ("9" * 5000),
                                   "bytes=\u00b2-", "bytes=-" + "9" * 5000, "bytes=0-\u00b9"])
def test_range_values_always_get_an_answer(tmp_path, caplog, value):
    builder = TreeBuilder(tmp_path)
    descriptor = builder.blob(os.urandom(5000), "application/octet-stream")
    builder.link_blobs("app")
    request = ("GET /v2/app/blobs/%s HTTP/1.1\r\nHost: x\r\nRange: %s\r\nConnection: close"
               "\r\n\r\n" % (descriptor["digest"], value)).encode("latin-1")  # as it decodes
    with caplog.at_level(logging.INFO, logger="embedded_registry"):
        with serving(tmp_path) as server:
            answer = raw_exchange(server, request)
    assert answer.split(b" ", 2)[1] in (b"200", b"206", b"416"), answer[:100]
    assert "failed" not in caplog.text and "Traceback" not in caplog.text


@pytest.mark.parametrize("small", [True, False], ids=["small", "large"])
def test_a_range_of_the_whole_blob_is_verified(tmp_path, small):
    builder = TreeBuilder(tmp_path)
    descriptor = builder.blob(os.urandom(1000 if small else 3 * 1024 * 1024),
                              "application/octet-stream")
    builder.link_blobs("app")
    flip_a_bit(tmp_path / "blobs" / descriptor["digest"])
    url = "/v2/app/blobs/" + descriptor["digest"]
    with serving(tmp_path) as server:
        conn = connect(server)
        conn.request("GET", url, headers={"Range": "bytes=0-"})
        response = conn.getresponse()
        try:
            body = response.read()
        except http.client.IncompleteRead as cut:
            body = cut.partial
        assert response.status == 404 or len(body) < descriptor["size"]
        assert fetch(connect(server), "GET", url)[0] == 404


def test_malformed_targets_and_our_own_faults_get_answers(tmp_path, caplog):
    TreeBuilder(tmp_path).image("app", "amd64", tag="1")
    with caplog.at_level(logging.INFO, logger="embedded_registry"):
        with serving(tmp_path) as server:
            answer = raw_exchange(server, b"GET http://[::1/v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 400 ") and b'{"errors": [' in answer
            answer = raw_exchange(server, b"GET http://x/v2/ HTTP/1.1\r\nHost: x\r\n"
                                          b"Connection: close\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 200 ")

            def broken(*args, **kwargs):
                raise RuntimeError("the disk fell off")

            server.tree.locate_manifest = broken
            answer = raw_exchange(server, b"GET /v2/app/manifests/1 HTTP/1.1\r\nHost: x\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 500 ") and b"Connection: close" in answer
            assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["errors"]
    assert count_lines(caplog.text, "the disk fell off") == 1
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize("framing", [
    b"Content-Length: %d\r\n\r\n",
    b"Transfer-Encoding: chunked\r\n\r\n%x\r\n",
    b"Content-Length : %d\r\n\r\n",
    b"Content-Length\t: %d\r\n\r\n",
    b"Content-Length\x00: %d\r\n\r\n",
    b"Content-Length:\r\n %d\r\n\r\n",
    b"Transfer-Encoding : chunked\r\n\r\n%x\r\n",
    b"X-Before: 1\r\n Transfer-Encoding: chunked\r\n\r\n%x\r\n",
])
def test_a_request_body_is_never_read_as_a_request(tmp_path, framing):
    TreeBuilder(tmp_path).image("app", "amd64", tag="1")
    smuggled = b"GET /v2/_catalog HTTP/1.1\r\nHost: x\r\n\r\n"
    request = b"GET /v2/ HTTP/1.1\r\nHost: x\r\n" + framing % len(smuggled) + smuggled
    with serving(tmp_path) as server:
        answer = raw_exchange(server, request)
    assert answer.count(b"HTTP/1.1 ") == 1 and answer.startswith(b"HTTP/1.1 400 "), answer
    assert b"repositories" not in answer


def proc_status(pid, field):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def test_request_heads_are_bounded_in_size_and_memory(tmp_path, capsys):
    TreeBuilder(tmp_path).image("app", "amd64", tag="1")
    many = b"GET /v2/ HTTP/1.1\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 4000)
                                              for i in range(20)) + b"\r\n"
    with serving(tmp_path) as server:
        assert raw_exchange(server, many).startswith(b"HTTP/1.1 431 ")
    # 100 connections sending 99 headers of 65,000 bytes each, and holding on.
    head = b"GET /v2/ HTTP/1.1\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 65000)
                                              for i in range(99))
    with server_process("--root", str(tmp_path), drain=True) as (process, url):
        port = int(url.rsplit(":", 1)[1])
        assert https_or_http_status(url, "/v2/") == 200
        idle = proc_status(process.pid, "VmRSS")
        held = []
        try:
            for _ in range(100):
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                held.append(sock)
                with contextlib.suppress(OSError):
                    sock.sendall(head)
            peak = proc_status(process.pid, "VmHWM")
        finally:
            for sock in held:
                sock.close()
        assert https_or_http_status(url, "/v2/") == 200
    grown = (peak - idle) / 1024.0
    with capsys.disabled():
        print("\n[measured] 100 connections sending 99 headers of 65,000 bytes: peak RSS "
              "%.1f MiB above idle" % grown)
    assert grown < 100, "peak RSS grew by %.0f MiB" % grown


def https_or_http_status(url, path, ca=None):
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":
        context = ssl.create_default_context(cafile=ca)
        conn = http.client.HTTPSConnection(parts.hostname, parts.port, context=context,
                                           timeout=10)
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        return fetch(conn, "GET", path)[0]
    finally:
        conn.close()


# --- Hardening: connections and signals ------------------------------------------------

def signal_storm(pid, signums, count, gap=0.0015):
    for number in range(count):
        os.kill(pid, signums[number % len(signums)])
        time.sleep(gap)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sighup_storms_leave_the_server_serving(fixture, tls, workers):
    with server_process("--root", fixture.root, "--cert", tls["cert"], "--key", tls["key"],
                        "--workers", workers, drain=True) as (process, url):
        for _ in range(3):
            signal_storm(process.pid, [signal.SIGHUP], 1000)
            assert https_or_http_status(url, "/v2/library/multi/manifests/v1", tls["ca"]) == 200
        signal_storm(process.pid, [signal.SIGHUP, signal.SIGTERM, signal.SIGINT], 300)
        assert process.wait(30) == 0
    assert "Traceback" not in "".join(process.log_lines)


def test_a_silent_connection_after_its_handshake_has_only_the_header_deadline(fixture, tls):
    with server_process("--root", fixture.root, "--cert", tls["cert"], "--key", tls["key"],
                        "--header-timeout", "1", "--idle-timeout", "60",
                        "--max-connections", "4") as (process, url):
        port = int(url.rsplit(":", 1)[1])
        context = ssl.create_default_context(cafile=tls["ca"])
        silent = [context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                                      server_hostname="127.0.0.1") for _ in range(8)]
        try:
            # Four hold every slot; the other four made room by closing the oldest.
            assert https_or_http_status(url, "/v2/", tls["ca"]) == 200
            started = time.monotonic()
            for sock in silent:
                with contextlib.suppress(OSError):
                    assert sock.recv(1) == b""
            assert time.monotonic() - started < 10  # not the 60 s idle timeout
        finally:
            for sock in silent:
                sock.close()


def test_sigterm_with_every_slot_busy_stops_in_time(tmp_path):
    builder = TreeBuilder(tmp_path)
    descriptor = builder.blob(os.urandom(64 * 1024 * 1024), "application/octet-stream")
    builder.link_blobs("big")
    request = ("GET /v2/big/blobs/%s HTTP/1.1\r\nHost: x\r\n\r\n" % descriptor["digest"]).encode()
    with server_process("--root", str(tmp_path), "--max-connections", "2",
                        "--shutdown-timeout", "2") as (process, url):
        port = int(url.rsplit(":", 1)[1])
        clients = []
        try:
            for _ in range(3):  # two transfers that never read on, one waiting for a slot
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.sendall(request)
                clients.append(sock)
            time.sleep(0.5)
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            assert process.wait(20) == 0
            assert time.monotonic() - started < 8
        finally:
            for sock in clients:
                sock.close()


def test_a_worker_that_ends_on_its_own_is_replaced(fixture, tls):
    with server_process("--root", fixture.root, "--workers", "2") as (process, url):
        workers = child_pids(process.pid)
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGTERM)  # the worker drains and exits 0
        deadline = time.monotonic() + 10
        while len(child_pids(process.pid)) < 2 or workers[0] in child_pids(process.pid):
            assert time.monotonic() < deadline, "the worker that exited 0 was not replaced"
            time.sleep(0.1)
        assert https_or_http_status(url, "/v2/") == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0


@pytest.mark.parametrize("verified", [False, True], ids=["hashed as sent", "verified"])
@pytest.mark.parametrize("use_tls", [False, True], ids=["http", "https"])
def test_the_access_log_gives_the_bytes_sent(tmp_path, tls, caplog, verified, use_tls):
    builder = TreeBuilder(tmp_path)
    descriptor = builder.blob(os.urandom(64 * 1024 * 1024), "application/octet-stream")
    builder.link_blobs("app")
    url = "/v2/app/blobs/" + descriptor["digest"]
    with caplog.at_level(logging.INFO, logger="embedded_registry"):
        with serving(tmp_path, tls if use_tls else None) as server:
            if verified:
                assert sha256(fetch(connect(server, tls), "GET", url)[2]) == descriptor["digest"]
            conn = connect(server, tls)
            conn.request("GET", url)
            response = conn.getresponse()
            response.read(1024 * 1024)
            conn.sock.close()
            response.close()
            deadline = time.monotonic() + 20
            while count_lines(caplog.text, "GET " + url) < 1 + verified:
                assert time.monotonic() < deadline, "no access log line for the cut transfer"
                time.sleep(0.1)
    sizes = [int(m) for m in re.findall(re.escape(url) + r" 200 (\d+) ", caplog.text)]
    assert sizes[-1] < descriptor["size"], sizes


def damage_keeping_mtime(path, replace):
    """One byte changed, in place or in a new file under the old name, mtime restored."""
    before = os.stat(str(path))
    data = bytearray(path.read_bytes())
    data[12345] ^= 0x40
    if replace:  # as tar -x does: a new file, which may get the freed inode back
        path.unlink()
    with open(str(path), "r+b" if not replace else "wb") as f:
        f.write(bytes(data))
    os.utime(str(path), ns=(before.st_atime_ns, before.st_mtime_ns))


@pytest.mark.parametrize("mode", ["first", "always"])
@pytest.mark.parametrize("how", ["in place", "replaced", "beneath the file system"])
def test_a_verified_blob_that_changes_is_never_served_whole(tmp_path, mode, how):
    builder = TreeBuilder(tmp_path)
    descriptor = builder.blob(os.urandom(5 * 1024 * 1024), "application/octet-stream")
    builder.link_blobs("app")
    path = tmp_path / "blobs" / descriptor["digest"]
    url = "/v2/app/blobs/" + descriptor["digest"]
    with serving(tmp_path, verify_always=mode == "always") as server:
        assert sha256(fetch(connect(server), "GET", url)[2]) == descriptor["digest"]
        damage_keeping_mtime(path, replace=how == "replaced")
        if how == "beneath the file system":
            # Bit rot changes bytes and no metadata at all: stand for it by telling the
            # server that the changed file is the one it verified.
            real = os.path.realpath(str(path))
            server.tree._blob_verdicts.put(descriptor["digest"], real,
                                           er.stat_identity(os.stat(real)), True)
        status, length, body = read_cut(connect(server), url)
        if mode == "first" and how == "beneath the file system":
            # The one case --verify first cannot see, as the README says.
            assert status == 200 and len(body) == length and sha256(body) != descriptor["digest"]
        else:
            assert len(body) < length  # cut short: never a complete wrong blob
            assert fetch(connect(server), "GET", url)[0] == 404


# --- Hardening: hostile manifests, indexes and archives for the downloader ----------------
# Every archive here is built by hand with tarfile: no skopeo or registry is needed.

DEMO = "docker.io/library/demo:1"
DEEP = b"[" * 100000 + b"]" * 100000  # json.loads raises RecursionError on this


def as_bytes(value):
    """A member's content: bytes as they are, anything else as JSON."""
    return value if isinstance(value, bytes) else json.dumps(value).encode()


def keep(name, document):
    return document


def oci_archive(path, mutate=keep, nested=False):
    """An oci-archive of one image, DEMO. mutate(name, document) may change each JSON
    document ("manifest", "index" when nested, "index.json") after the documents it points
    at are written, so a change to a digest stays the one the test made."""
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    layer = b"not really a tar, and the downloader does not care"
    blobs = {}

    def add(data, media_type, **extra):
        blobs[sha256(data)] = data
        return dict({"mediaType": media_type, "digest": sha256(data), "size": len(data)},
                    **extra)

    manifest = as_bytes(mutate("manifest", {
        "schemaVersion": 2, "mediaType": dsi.OCI_MANIFEST,
        "config": add(config, "application/vnd.oci.image.config.v1+json"),
        "layers": [add(layer, "application/vnd.oci.image.layer.v1.tar")]}))
    top = add(manifest, dsi.OCI_MANIFEST, platform={"architecture": "amd64", "os": "linux"})
    if nested:
        index = as_bytes(mutate("index", {"schemaVersion": 2, "mediaType": dsi.OCI_INDEX,
                                          "manifests": [top]}))
        top = add(index, dsi.OCI_INDEX)
    top = dict(top, annotations={"io.containerd.image.name": DEMO,
                                 "org.opencontainers.image.ref.name": "1"})
    top.pop("platform", None)
    index_json = as_bytes(mutate("index.json", {"schemaVersion": 2, "manifests": [top]}))
    members = {"oci-layout": b'{"imageLayoutVersion": "1.0.0"}', "index.json": index_json}
    members.update(("blobs/sha256/" + digest.split(":")[1], data)
                   for digest, data in blobs.items())
    return tar_of(path, members)


def docker_archive(path, mutate=keep):
    """A docker-archive of one image, DEMO; mutate(name, document) may change manifest.json."""
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        info = tarfile.TarInfo("hello.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    config_name = sha256(config).split(":")[1] + ".json"
    layer_name = sha256(layer.getvalue()).split(":")[1] + "/layer.tar"
    entries = mutate("manifest.json", [{"Config": config_name, "RepoTags": [DEMO],
                                        "Layers": [layer_name]}])
    return tar_of(path, {"manifest.json": as_bytes(entries), config_name: config,
                         layer_name: layer.getvalue()})


def import_archives(capsys, tree, *paths):
    """main() in-process: (return code, stderr); anything escaping main fails the test."""
    code = dsi.main(["--from-archive"] + [str(p) for p in paths] + ["-d", str(tree)])
    return code, capsys.readouterr().err


def tags_in(tree):
    """repo:tag for every tag link in the tree."""
    found = set()
    for top, dirs, files in os.walk(str(tree)):
        if os.path.basename(top) == "manifests":
            repo = os.path.relpath(os.path.dirname(top), str(tree))
            found.update("%s:%s" % (repo, name) for name in files + dirs
                         if not name.startswith("sha256:"))
    return found


def failure_lines(stderr, *words):
    return [line for line in stderr.splitlines() if all(word in line for word in words)]


# --- The archives build as the downloader expects (so the failures below are the changes) --

@pytest.mark.parametrize("build", [oci_archive, docker_archive,
                                   lambda path: oci_archive(path, nested=True)])
def test_hand_built_archives_import(tmp_path, capsys, build):
    tree = tmp_path / "registry"
    code, stderr = import_archives(capsys, tree, build(tmp_path / "image.tar"))
    assert code == 0, stderr
    assert tags_in(tree) == {"library/demo:1"}


# --- Finding 1: a digest from an archive never reaches a path -------------------------------

def test_a_path_like_layer_digest_deletes_nothing_outside_the_tree(tmp_path, capsys):
    victim = tmp_path / "outside" / "victim.txt"
    victim.parent.mkdir()
    victim.write_bytes(b"precious")
    tree = tmp_path / "d1" / "d2" / "registry"  # blobs/../../../../outside is the victim's

    def aim_at_victim(name, document):
        if name == "manifest":
            document["layers"][0]["digest"] = "../../../../outside/victim.txt"
        return document

    archive = oci_archive(tmp_path / "evil.tar", aim_at_victim)
    code, stderr = import_archives(capsys, tree, archive)
    assert victim.read_bytes() == b"precious"
    assert code != 0
    assert "Traceback" not in stderr
    lines = failure_lines(stderr, archive, "layers[0].digest")
    assert len(lines) == 1, stderr
    assert "layers[0].digest is '../../../../outside/victim.txt', not sha256:" in lines[0]


def test_path_like_digests_in_an_index_json_are_refused(tmp_path, capsys):
    def bad_entry(name, document):
        if name == "index.json":
            document["manifests"].append(dict(document["manifests"][0],
                                              digest="sha256:../../../x"))
        return document

    archive = oci_archive(tmp_path / "two.tar", bad_entry)
    code, stderr = import_archives(capsys, tmp_path / "registry", archive)
    assert code == 1
    assert failure_lines(stderr, "FAILED %s, index.json entry 2: digest is 'sha256:../../../x'"
                         % archive)
    assert tags_in(tmp_path / "registry") == {"library/demo:1"}  # entry 1 still imported


@pytest.mark.parametrize("field, value, message", [
    ("annotations", ["x"], "annotations is a list, not an object"),
    ("annotations", {"io.containerd.image.name": 5},
     "annotations.io.containerd.image.name is 5, not a string"),
    ("annotations", {"a\nb": None}, "annotations.'a\\nb' is None, not a string"),
    ("mediaType", 7, "mediaType is 7, not a string"),
    ("size", True, "size is True, not a size in bytes"),
    ("size", -1, "size is -1, not a size in bytes"),
    ("size", 1.5, "size is 1.5, not a size in bytes"),
    ("platform", {"os": ["linux"]}, "platform.os is a list, not a string"),
    ("platform", {"os.features": "x"}, "platform.os.features is 'x', not a list of strings"),
    ("urls", "http://x", "urls is 'http://x', not a list of strings"),
])
def test_odd_index_json_entries_fail_alone(tmp_path, capsys, field, value, message):
    def odd_entry(name, document):
        if name == "index.json":
            document["manifests"][0][field] = value
        return document

    archive = oci_archive(tmp_path / "odd.tar", odd_entry)
    code, stderr = import_archives(capsys, tmp_path / "registry", archive)
    assert code == 1 and "Traceback" not in stderr
    assert failure_lines(stderr, "FAILED %s, index.json entry 1: %s" % (archive, message)), stderr


def test_a_nested_index_in_an_oci_archive_is_checked_too(tmp_path, capsys):
    def bad_child(name, document):
        if name == "index":
            document["manifests"][0]["digest"] = "../../x"
        return document

    archive = oci_archive(tmp_path / "nested.tar", bad_child, nested=True)
    code, stderr = import_archives(capsys, tmp_path / "registry", archive)
    assert code == 1 and "Traceback" not in stderr
    assert failure_lines(stderr, archive, "manifests[0].digest is '../../x', not sha256:")


# --- Finding 2: oddly typed archive JSON is a one-line error naming archive and member -----

@pytest.mark.parametrize("member, document, message", [
    ("manifest.json", {"a": 1}, "manifest.json is an object, not a list of images"),
    ("manifest.json", 5, "manifest.json is 5, not a list of images"),
    ("manifest.json", "x", "manifest.json is 'x', not a list of images"),
    ("manifest.json", None, "manifest.json is None, not a list of images"),
    ("index.json", [], "index.json is a list, not a JSON object"),
    ("index.json", [{"manifests": []}], "index.json is a list, not a JSON object"),
    ("index.json", {"manifests": {"a": 1}}, "index.json: manifests is an object, not a list"),
    ("index.json", DEEP, "index.json is not valid JSON: nested too deeply"),
    ("manifest.json", DEEP, "manifest.json is not valid JSON: nested too deeply"),
])
def test_whole_file_shape_errors_fail_the_archive(tmp_path, capsys, member, document, message):
    def replace(name, original):
        return document if name == member else original

    build = docker_archive if member == "manifest.json" else oci_archive
    archive = build(tmp_path / "odd.tar", replace)
    code, stderr = import_archives(capsys, tmp_path / "registry", archive)
    assert code == 2
    assert stderr.strip() == "download_system_images.py: error: %s: %s" % (archive, message)


@pytest.mark.parametrize("entry, message", [
    (1, "it is 1, not an object"),
    (["a"], "it is a list, not an object"),
    ({"Config": ["a"], "Layers": []}, "Config is a list, not the name of a member"),
    ({"Config": None}, "Config is None, not the name of a member"),
    ({"Config": "c.json", "Layers": "l.tar"}, "Layers is 'l.tar', not a list of member names"),
    ({"Config": "c.json", "Layers": [{}]}, "Layers is a list, not a list of member names"),
    ({"Config": "c.json", "RepoTags": [5]}, "RepoTags is a list, not a list of image names"),
    ({"Config": "c.json", "RepoTags": "nginx"}, "RepoTags is 'nginx', not a list of image"),
    ({"Config": "c.json", "Layers": None}, "'c.json' is not in the archive"),
])
def test_odd_manifest_json_entries_fail_alone(tmp_path, capsys, entry, message):
    def add_odd_entry(name, entries):
        return [entry] + entries

    archive = docker_archive(tmp_path / "odd.tar", add_odd_entry)
    tree = tmp_path / "registry"
    code, stderr = import_archives(capsys, tree, archive)
    assert code == 1 and "Traceback" not in stderr
    lines = failure_lines(stderr, "FAILED %s, manifest.json entry 1: %s" % (archive, message))
    assert len(lines) == 1, stderr
    assert "1 ok, 1 failed" in stderr  # entry 2, the sound one, is imported
    assert tags_in(tree) == {"library/demo:1"}


def test_repotags_as_a_string_imports_no_one_letter_images(tmp_path, capsys):
    def string_tags(name, entries):
        entries[0]["RepoTags"] = "nginx"
        return entries

    tree = tmp_path / "registry"
    archive = docker_archive(tmp_path / "nginx.tar", string_tags)
    code, stderr = import_archives(capsys, tree, archive)
    assert code == 1 and "Traceback" not in stderr
    assert failure_lines(stderr, "%s, manifest.json entry 1: RepoTags is 'nginx'" % archive)
    assert tags_in(tree) == set()
    assert not (tree / "library").exists()  # no library/n, library/g, library/i, library/x


def test_a_name_the_tree_cannot_hold_fails_its_image_not_the_run(tmp_path, capsys):
    # library/a's tag "manifests" is a file where library/a/manifests would need a folder:
    # a repository path part named manifests (or blobs) is refused by its name.
    def clashing_tags(name, entries):
        entries[0]["RepoTags"] = ["a:manifests", "library/a/manifests:1", DEMO]
        return entries

    tree = tmp_path / "registry"
    archive = docker_archive(tmp_path / "clash.tar", clashing_tags)
    code, stderr = import_archives(capsys, tree, archive)
    assert code == 1 and "Traceback" not in stderr
    assert "blobs or manifests cannot be laid out" in stderr
    assert "library/demo:1" in tags_in(tree)


# --- The download path (crane/skopeo): the same gate, with a test double for the tool ------

class FakeUpstreamForTest(dsi.Source):
    """Test double for crane/skopeo: serves crafted manifest bytes, and refuses to fetch."""

    name = "fake"

    def __init__(self, manifests):
        self.manifests = manifests  # reference -> bytes
        self.fetched = []

    def manifest(self, reference):
        if reference not in self.manifests:
            raise dsi.DownloadError("%s: not on the fake upstream" % reference)
        return self.manifests[reference]

    def fetch_blobs(self, image, manifest_digest, descriptors, workdir, jobs):
        self.fetched += descriptors
        raise dsi.DownloadError("the fake upstream has no blobs")


def descriptor(digest="sha256:" + "a" * 64, size=3, **extra):
    return dict({"mediaType": "application/octet-stream", "digest": digest, "size": size},
                **extra)


def image_manifest(**changes):
    document = {"schemaVersion": 2, "mediaType": dsi.OCI_MANIFEST, "config": descriptor(),
                "layers": [descriptor("sha256:" + "b" * 64)]}
    document.update(changes)
    return json.dumps(document).encode()


def run_fake(tmp_path, manifests, reference="example.com/a/b:1"):
    writer = dsi.TreeWriter(str(tmp_path / "registry"))
    try:
        tool = FakeUpstreamForTest(manifests)
        downloader = dsi.Downloader(tool, writer, None)
        results = dsi.download_all(downloader, [(dsi.parse_reference(reference), "list:1")])
    finally:
        writer.close()
    return tool, results


@pytest.mark.parametrize("body, message", [
    (image_manifest(layers=[descriptor("../../../../victim")]),
     "layers[0].digest is '../../../../victim', not sha256:"),
    (image_manifest(config=descriptor("sha256:../../x")), "config.digest is 'sha256:../../x'"),
    (image_manifest(config=["x"]), "config is a list, not an object"),
    (image_manifest(layers={"a": 1}), "layers is an object, not a list"),
    (image_manifest(layers=[descriptor(size="3")]), "layers[0].size is '3', not a size"),
    (image_manifest(layers=[descriptor(urls=[1])]), "layers[0].urls is a list, not a list of"),
    (image_manifest(mediaType=["x"]), "mediaType is a list, not a string"),
    (json.dumps({"schemaVersion": 1, "fsLayers": []}).encode(), "Docker schema 1"),
    (json.dumps({"manifests": [descriptor("/etc/passwd")]}).encode(),
     "manifests[0].digest is '/etc/passwd', not sha256:"),
    (json.dumps({"manifests": [descriptor(platform={"architecture": 1})]}).encode(),
     "manifests[0].platform.architecture is 1, not a string"),
    (json.dumps({"manifests": "x"}).encode(), "manifests is 'x', not a list"),
    (b"[1]", "is a list, not a JSON object"),
    (DEEP, "is not valid JSON: nested too deeply"),
    (b"\xff\xfe{", "is not valid JSON"),
])
def test_a_bad_upstream_manifest_fails_its_image_before_any_path(tmp_path, body, message):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    tool, results = run_fake(tmp_path, {"example.com/a/b:1": body})
    [result] = results
    assert not result.ok
    assert "manifest example.com/a/b:1" in result.message and message in result.message
    assert tool.fetched == [] and victim.read_bytes() == b"keep"


def test_a_bad_child_manifest_fails_its_image(tmp_path):
    child = image_manifest(layers=[descriptor("sha256:../../../victim")])
    index = json.dumps({"mediaType": dsi.OCI_INDEX, "manifests": [
        descriptor(sha256(child), len(child), platform={"os": "linux",
                                                        "architecture": "amd64"})]}).encode()
    tool, [result] = run_fake(tmp_path, {"example.com/a/b:1": index,
                                         "example.com/a/b@" + sha256(child): child})
    assert not result.ok and tool.fetched == []
    assert "layers[0].digest is 'sha256:../../../victim'" in result.message
    assert "(list:1)" in result.message


def test_an_index_of_indexes_is_an_error_not_a_crash(tmp_path):
    inner = json.dumps({"mediaType": dsi.OCI_INDEX, "manifests": []}).encode()
    outer = json.dumps({"mediaType": dsi.OCI_INDEX, "manifests": [
        descriptor(sha256(inner), len(inner))]}).encode()
    _, [result] = run_fake(tmp_path, {"example.com/a/b:1": outer,
                                      "example.com/a/b@" + sha256(inner): inner})
    assert not result.ok and "names another index" in result.message


def test_windows_platform_features_pass_the_gate():
    document = {"mediaType": dsi.OCI_INDEX, "manifests": [descriptor(platform={
        "os": "windows", "architecture": "amd64", "os.version": "10.0.17763.1",
        "os.features": ["win32k"]})]}
    assert dsi.check_document(document, "x") is document


def test_crane_and_skopeo_refuse_a_bad_digest_before_running(tmp_path):
    image = dsi.parse_reference("example.com/a/b:1")
    bad = [descriptor("../../x")]
    for tool in (dsi.Crane(str(tmp_path / "no-crane")), dsi.Skopeo(str(tmp_path / "no-skopeo"))):
        with pytest.raises(dsi.DownloadError, match="refusing '../../x' as a file name"):
            tool.fetch_blobs(image, "sha256:" + "c" * 64, bad, str(tmp_path), 1)
    assert sorted(os.listdir(str(tmp_path))) == []


# --- TreeWriter refuses names outside their grammar, whoever calls it ----------------------

@pytest.fixture
def writer(tmp_path):
    writer = dsi.TreeWriter(str(tmp_path / "a" / "registry"))
    yield writer
    writer.close()


GOOD = "sha256:" + "d" * 64


@pytest.mark.parametrize("call", [
    lambda w: w.has_blob({"digest": "../../victim", "size": 1}),
    lambda w: w.has_blob({"digest": "sha256:../../../victim", "size": 1}),
    lambda w: w.place_blob({"digest": "../../victim", "size": 1}, __file__),
    lambda w: w.save_manifest("../../x", b"{}"),
    lambda w: w.save_manifest("a/../../x", b"{}"),
    lambda w: w.link_blobs("../x"),
    lambda w: w.link_blobs("/abs"),
    lambda w: w.link_tag("a/b", "../victim", GOOD),
    lambda w: w.link_tag("a/b", GOOD, GOOD),  # a tag must not replace a manifest file
    lambda w: w.link_tag("a/b", "1", "../../victim"),
    lambda w: w.link_tag("../../x", "1", GOOD),
    lambda w: w.link_tag(None, "1", GOOD),
])
def test_tree_writer_refuses_bad_names(tmp_path, writer, call):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    before = sorted(os.listdir(writer.root))
    with pytest.raises(dsi.DownloadError, match="refusing"):
        call(writer)
    assert victim.read_bytes() == b"keep"
    assert sorted(os.listdir(writer.root)) == before
    assert sorted(os.listdir(str(tmp_path))) == ["a", "victim"]


def test_tree_writer_accepts_a_registry_host_with_no_trim(writer):
    writer.link_blobs("localhost:5000/a/b")
    digest = writer.save_manifest("localhost:5000/a/b", b"{}")
    writer.link_tag("localhost:5000/a/b", "v1.0", digest)
    assert os.readlink(os.path.join(writer.root, "localhost:5000/a/b/manifests/v1.0")) == digest


# --- Finding 3: a bounded, seeded fuzz of both archive formats -----------------------------

SEED = 20240611
PATH_LIKE = ["../../x", "sha256:../../x", "../../../sentinel.txt", "../../sentinel.txt",
             "sha256:../../../../sentinel.txt", "../../../../sentinel_dir", "/etc/passwd",
             "sha256:" + "a" * 63 + "/", "sha256:" + "A" * 64, "blobs/sha256/..", "..", "."]
STRINGS = PATH_LIKE + ["", "nginx", DEMO, "a/b:1", "../x:1", "manifest.json", "index.json",
                       dsi.OCI_INDEX, dsi.OCI_MANIFEST, "sha256:" + "0" * 64, "line\nbreak"]


def random_json(rng, depth=0):
    kind = rng.choice(["dict", "list", "str", "int", "float", "bool", "none"]
                      if depth < 4 else ["str", "int", "float", "bool", "none"])
    if kind == "dict":
        keys = ["digest", "size", "mediaType", "manifests", "layers", "config", "platform",
                "urls", "annotations", "Config", "Layers", "RepoTags", "os", "x"]
        return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))}
    if kind == "list":
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if kind == "str":
        return rng.choice(STRINGS)
    if kind == "int":
        return rng.choice([0, 1, -1, 5, 2 ** 70])
    if kind == "float":
        return rng.choice([0.5, -1.0, 1e308, float("nan")])
    return rng.choice([True, False]) if kind == "bool" else None


def positions(document):
    """(container, key) of every value inside a JSON document."""
    found, stack = [], [document]
    while stack:
        item = stack.pop()
        keys = list(item) if isinstance(item, dict) else range(len(item)) \
            if isinstance(item, list) else []
        for key in keys:
            found.append((item, key))
            stack.append(item[key])
    return found


def mutated(rng, document):
    """The document with one change: a new value, a field dropped, a digest made path-like,
    or the whole document replaced."""
    document = copy.deepcopy(document)
    places = positions(document)
    digests = [(c, k) for c, k in places if k == "digest"]
    how = rng.choice(["whole", "value", "drop", "digest", "digest"])
    if how == "whole" or not places:
        return random_json(rng)
    if how == "digest" and digests:
        container, key = rng.choice(digests)
        container[key] = rng.choice(PATH_LIKE)
        return document
    container, key = rng.choice(places)
    if how == "drop":
        del container[key]
    else:
        container[key] = random_json(rng)
    return document


def snapshot(top, tree):
    """Everything under top but the tree: {relative path: bytes, link target or 'dir'}."""
    found = {}
    for directory, dirs, files in os.walk(top):
        if os.path.abspath(directory) == tree:
            dirs[:] = []
            continue
        for name in dirs + files:
            path = os.path.join(directory, name)
            if path == tree:
                continue
            relative = os.path.relpath(path, top)
            if os.path.islink(path):
                found[relative] = "link:" + os.readlink(path)
            elif os.path.isdir(path):
                found[relative] = "dir"
            else:
                with open(path, "rb") as f:
                    found[relative] = f.read()
    return found


def test_fuzzed_archives_never_crash_or_touch_anything_outside_the_tree(tmp_path, capsys,
                                                                         caplog):
    rng = random.Random(SEED)
    outer = tmp_path / "outer"
    work = outer / "work"
    tree = work / "registry"  # blobs/../../.. is outer, and one more .. is tmp_path
    for place in (tmp_path, outer, work):
        (place / "sentinel_dir").mkdir(parents=True)
        (place / "sentinel.txt").write_bytes(b"sentinel in %s" % place.name.encode())
        (place / "sentinel_dir" / "keep.txt").write_bytes(b"kept")
    archive = str(tmp_path / "fuzz.tar")
    codes = []
    for case in range(500):
        docker = case % 3 == 0
        targets = ["manifest.json"] if docker else ["manifest", "index.json"] + (
            ["index"] if case % 3 == 2 else [])
        chosen = set(rng.sample(targets, rng.randint(1, len(targets))))

        def mutate(name, document):
            return mutated(rng, document) if name in chosen else document

        if docker:
            docker_archive(archive, mutate)
        else:
            oci_archive(archive, mutate, nested=case % 3 == 2)
        before = snapshot(str(tmp_path), str(tree))
        try:
            code = dsi.main(["--from-archive", archive, "-d", str(tree), "-p", "all"])
        except BaseException as error:  # noqa: B036 - report the case, then fail
            pytest.fail("case %d (seed %d) raised %r" % (case, SEED, error))
        stderr = capsys.readouterr().err
        assert code in (0, 1, 2), (case, stderr)
        assert "Traceback" not in stderr and "Traceback" not in caplog.text, case
        assert snapshot(str(tmp_path), str(tree)) == before, case
        codes.append(code)
    assert {0, 1, 2} <= set(codes)  # the fuzz reached sound imports and both kinds of failure


# --- Hardening: fuzzing the server and --check -------------------------------------------

FUZZ_NAMES = ["library/multi", "a/b/c/d", "evil", "escape", "..", "%2e%2e", "a//b", "A",
              "a" * 300, "good\x00", "\u00e9", "library/multi/..", "_catalog", ""]
FUZZ_REFERENCES = ["v1", "latest", "1.0", ".INVALID", "sha256:" + "0" * 64, "sha256:zz",
                   "sha512:" + "a" * 128, "sha256:" + "a" * 65, "../../outside/canary.json",
                   "x" * 200, "\u00b2", ""]
FUZZ_NUMBERS = ["", "0", "1", "-1", "99999999999999999999", "\u00b2", "1e3", "nan",
                "9" * 5000, " 5"]
FUZZ_RANGES = ["bytes=0-", "bytes=-1", "bytes=\u00b2-", "bytes=0-" + "9" * 5000, "bytes=5-2",
               "bytes=0-1,2-3", "items=0-1", "bytes=-", "bytes= 1-2", "bytes=0-0"]


def fuzz_request(rng, known):
    """One random request: method, target, version and headers, mostly almost right."""
    name = rng.choice(FUZZ_NAMES)
    reference = rng.choice(FUZZ_REFERENCES + known)
    target = rng.choice([
        "/v2/", "/v2", "/", "/v2/_catalog?n=%s&last=%s" % (rng.choice(FUZZ_NUMBERS), name),
        "/v2/%s/tags/list?n=%s&last=%s" % (name, rng.choice(FUZZ_NUMBERS),
                                           rng.choice(FUZZ_REFERENCES)),
        "/v2/%s/manifests/%s?ns=%s" % (name, reference, rng.choice(
            ["", "bootstrap-registry.airgap", "../../", "a" * 300, "[::1]", "x:99999"])),
        "/v2/%s/blobs/%s" % (name, reference),
        "http://%s/v2/%s/manifests/%s" % (rng.choice(["x", "[::1", "*", ""]), name, reference),
        "*", "/v2/../../outside/canary.json", "".join(rng.choice("/%.a\x01\x7f") for _ in
                                                      range(rng.randint(0, 30)))])
    method = rng.choice(["GET"] * 6 + ["HEAD"] * 3 + ["POST", "PUT", "DELETE", "OPTIONS",
                                                      "BREW", "get", "G\x00T"])
    version = rng.choice(["HTTP/1.1"] * 8 + ["HTTP/1.0", "HTTP/2.0", "HTTP/1.1x", ""])
    headers = ["Host: 127.0.0.1"]
    for _ in range(rng.randint(0, 4)):
        headers.append(rng.choice([
            "Range: " + rng.choice(FUZZ_RANGES), "Accept: " + ACCEPT_CONTAINERD,
            "Content-Length: " + rng.choice(["0", "5", "-1", "abc", "99999999999999999999"]),
            "Transfer-Encoding: " + rng.choice(["chunked", "gzip", ""]),
            "X-Junk: " + "".join(chr(rng.randint(32, 0x2ff)) for _ in range(rng.randint(0, 50))),
            "X-Long: " + "v" * rng.choice([10, 5000, 70000]), "no colon here", ": empty name"]))
    headers.append("Connection: close")
    line = " ".join(part for part in (method, target, version) if part)
    return method, ("%s\r\n%s\r\n\r\n" % (line, "\r\n".join(headers))).encode(
        "utf-8", "surrogateescape")


def exchange_over_tls(port, context, request, method):
    """Send one raw request; (status, body), or (None, b"") if the server closed cleanly."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            with contextlib.suppress(OSError):  # answered and closed before all was sent
                sock.sendall(request)
            response = http.client.HTTPResponse(sock, method=method)
            try:
                response.begin()
            except (http.client.RemoteDisconnected, ConnectionResetError, ssl.SSLEOFError,
                    ssl.SSLZeroReturnError):
                return None, b""
            try:
                return response.status, response.read()
            except http.client.IncompleteRead as cut:
                return response.status, cut.partial


def test_fuzzed_requests_always_get_an_answer_and_leave_nothing_behind(hostile_tree, tls,
                                                                       capsys):
    rng = random.Random(SEED)
    root = hostile_tree["root"]
    _, digest = TreeBuilder(root).index("library/multi", "v1", ["amd64"])[:2]
    known = [digest, "v1", hostile_tree["digest"]]
    context = ssl.create_default_context(cafile=tls["ca"])
    with server_process("--root", str(root), "--cert", tls["cert"], "--key", tls["key"],
                        "--idle-timeout", "2", drain=True) as (process, url):
        port = int(url.rsplit(":", 1)[1])
        for _ in range(20):  # warm up: caches and the first threads' memory
            assert exchange_over_tls(port, context, fuzz_request(rng, known)[1], "GET")
        idle_rss, idle_threads = (proc_status(process.pid, "VmRSS"),
                                  proc_status(process.pid, "Threads"))
        statuses = collections.Counter()
        for case in range(2000):
            method, request = fuzz_request(rng, known)
            status, body = exchange_over_tls(port, context, request, method)
            statuses[status] += 1
            assert status is None or 200 <= status < 500, (case, request[:200], status, body)
            assert hostile_tree["canary"] not in body, (case, request[:200])
        deadline = time.monotonic() + er.ConnectionThreads.linger + 20  # kept ones end too
        while proc_status(process.pid, "Threads") > idle_threads:
            assert time.monotonic() < deadline, "connection threads did not end"
            time.sleep(0.1)
        grown = (proc_status(process.pid, "VmRSS") - idle_rss) / 1024.0
        log_text = "".join(process.log_lines)
    with capsys.disabled():
        print("\n[measured] 2,000 fuzzed requests over TLS: %s; RSS %+.1f MiB, threads back "
              "to %d" % (", ".join("%s: %d" % (status or "closed", n) for status, n in sorted(
                  statuses.items(), key=lambda item: item[0] or 0)), grown, idle_threads))
    assert grown < 16, "RSS grew by %.1f MiB" % grown
    assert "Traceback" not in log_text and " failed: " not in log_text
    assert statuses[200] and statuses[404] and statuses[400]  # the fuzz reached every kind


def test_fuzzed_manifests_never_crash_check(tmp_path):
    rng = random.Random(SEED)
    root = tmp_path / "tree"
    builder = TreeBuilder(root)
    _, _, children = builder.index("app", "1", ["amd64"])
    documents = [json.loads((root / "app" / "manifests" / name).read_bytes())
                 for name in ("1", children[0])]
    manifests = root / "app" / "manifests"
    for case in range(300):
        body = json.dumps(mutated(rng, rng.choice(documents))).encode()
        for name in os.listdir(str(manifests)):
            if name.startswith("fuzz"):
                os.unlink(str(manifests / name))
        (manifests / ("fuzz%d" % case)).write_bytes(body)
        if case % 2:  # the same document under its own digest, as the downloader names it
            os.symlink("fuzz%d" % case, str(manifests / sha256(body)))
        before = snapshot(str(tmp_path), "")
        report = er.TreeCheck(str(root), deep=case % 3 == 0).run()
        json.loads(report.as_json())
        assert report.report().splitlines()[-1].startswith("checked "), case
        assert snapshot(str(tmp_path), "") == before, case
        for name in os.listdir(str(manifests)):
            if name.startswith("sha256:") and os.path.islink(str(manifests / name)):
                os.unlink(str(manifests / name))


# --- Hardening: what the adversarial review found beyond the first findings --------------

@pytest.mark.parametrize("media_type", ["application/x\r\nSet-Cookie: evil=1",
                                        "application/vnd.oci.image.manifest.v1+json\u2603",
                                        "", "text"])
def test_a_media_type_must_be_one_to_be_served(tmp_path, caplog, media_type):
    builder = TreeBuilder(tmp_path)
    body, _ = builder.image("app", "amd64")
    document = json.loads(body)
    document["mediaType"] = media_type
    builder.manifest("app", json.dumps(document).encode(), tag="bad")
    with caplog.at_level(logging.INFO, logger="embedded_registry"):
        with serving(tmp_path) as server:
            answer = raw_exchange(server, b"GET /v2/app/manifests/bad HTTP/1.1\r\nHost: x\r\n"
                                          b"Connection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 404 ") and b"Set-Cookie" not in answer
    assert " failed: " not in caplog.text
    result = check(tmp_path)
    assert result.returncode == 1 and "no valid mediaType" in result.stdout


def test_check_judges_each_repository_and_each_name_it_cannot_serve(tmp_path, unprivileged):
    base, check_as_nobody = unprivileged
    root = os.path.join(base, "tree")
    builder = TreeBuilder(root)
    _, digest = builder.image("a", "amd64", tag="1")
    os.makedirs(os.path.join(root, "b", "manifests"))  # b shares a's manifest, not its blobs
    os.makedirs(os.path.join(root, "b", "blobs"))
    os.symlink(os.path.join("..", "..", "a", "manifests", digest),
               os.path.join(root, "b", "manifests", "latest"))
    body, _ = builder.image("x/Upper", "amd64", tag="1")  # not a repository name
    builder.manifest("c", body)
    os.rename(os.path.join(root, "c", "manifests", sha256(body)),
              os.path.join(root, "c", "manifests", "sha512:" + "0" * 128))
    for top, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(top, name), 0o755)
    os.chmod(root, 0o755)
    result = check_as_nobody(root)
    assert result.returncode == 1
    assert count_lines(result.stdout, os.path.join(root, "b"), "is missing") >= 1
    assert count_lines(result.stdout, "Upper", "not a valid repository name") == 1
    assert "never served" not in result.stdout.replace("repository name (lowercase, digits, "
                                                       "separators): never served", "")
    os.chmod(os.path.join(root, "a", "manifests"), 0o744)  # listable, not searchable
    result = check_as_nobody(root)
    assert count_lines(result.stdout, os.path.join(root, "a", "manifests", "1"),
                       "Permission denied") == 1


def test_a_fifo_for_a_certificate_never_hangs_a_reload(fixture, tls, tmp_path):
    live = tmp_path / "live"
    live.mkdir()
    for name in ("cert", "key"):
        shutil.copy(tls[name], str(live / ("server." + name)))
    with server_process("--root", fixture.root, "--cert", str(live / "server.cert"),
                        "--key", str(live / "server.key"), "--shutdown-timeout", "2",
                        drain=True) as (process, url):
        (live / "server.cert").unlink()
        os.mkfifo(str(live / "server.cert"))
        process.send_signal(signal.SIGHUP)
        time.sleep(1.5)  # past the once-a-second check of the files, too
        assert https_or_http_status(url, "/v2/", tls["ca"]) == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
    assert "not a regular file" in "".join(process.log_lines)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sighups_after_sigterm_still_end_in_exit_0(fixture, workers):
    with server_process("--root", fixture.root, "--workers", workers,
                        drain=True) as (process, url):
        assert https_or_http_status(url, "/v2/") == 200
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        while process.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGHUP)
            time.sleep(0.0005)
        assert process.wait(5) == 0


def test_a_stopped_worker_does_not_keep_the_server_from_stopping(fixture):
    with server_process("--root", fixture.root, "--workers", "2", "--shutdown-timeout", "1",
                        drain=True) as (process, url):
        workers = child_pids(process.pid)
        os.kill(workers[0], signal.SIGSTOP)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(20)  # the stopped worker is killed once its drain time is past
        assert time.monotonic() - started < 15
        assert child_pids(process.pid) == []


def test_devices_in_the_tree_are_never_opened(tmp_path, caplog):
    if os.geteuid() != 0:
        pytest.skip("making a device node needs root")
    builder = TreeBuilder(tmp_path)
    builder.image("app", "amd64", tag="1")
    device = sha256(b"a device")
    os.mknod(str(tmp_path / "blobs" / device), 0o644 | stat.S_IFCHR, os.makedev(1, 5))
    os.mknod(str(tmp_path / "app" / "manifests" / "zero"), 0o644 | stat.S_IFCHR,
             os.makedev(1, 5))  # /dev/zero: an endless read if it were opened
    with caplog.at_level(logging.INFO, logger="embedded_registry"):
        with serving(tmp_path) as server:
            for path in ("/v2/app/blobs/" + device, "/v2/app/manifests/zero"):
                assert fetch(connect(server), "GET", path)[0] == 404
    assert count_lines(caplog.text, device, "not a regular file") == 1
    result = check(tmp_path)
    assert result.returncode == 1 and count_lines(result.stdout, "zero",
                                                  "not a regular file") == 1


def test_a_sparse_or_oversized_archive_member_is_refused(tmp_path, capsys):
    tar = need("tar")
    layout = tmp_path / "layout"
    (layout / "blobs" / "sha256").mkdir(parents=True)
    big = "sha256:" + "e" * 64
    with open(str(layout / "blobs" / "sha256" / ("e" * 64)), "wb") as f:
        f.truncate(800 * 1024 * 1024)  # sparse: 800 MB of nothing
    huge = b'{"schemaVersion": 2, "x": "' + b"y" * (5 * 1024 * 1024) + b'"}'
    (layout / "blobs" / "sha256" / sha256(huge)[7:]).write_bytes(huge)
    index = {"schemaVersion": 2, "manifests": [
        {"mediaType": dsi.OCI_MANIFEST, "digest": digest, "size": 10,
         "annotations": {"io.containerd.image.name": "docker.io/library/%s:1" % name}}
        for name, digest in (("sparse", big), ("huge", sha256(huge)))]}
    (layout / "index.json").write_text(json.dumps(index))
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    archive = str(tmp_path / "hostile.tar")
    run([tar, "--sparse", "-cf", archive, "-C", str(layout), "."])
    tree = tmp_path / "tree"
    code = dsi.main(["--from-archive", archive, "-d", str(tree)])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "sparse" in err and "over the 4194304-byte manifest limit" in err
    assert not any(name.startswith(".incoming-") for name in os.listdir(str(tree)))


# --- Bundles: the trips across the gap -----------------------------------------------------

def release_archive(path, images):
    """An oci-archive of {reference: [layer bytes]}: images that share a layer share its blob."""
    blobs, entries = {}, []

    def add(data, media_type):
        blobs[sha256(data)] = data
        return {"mediaType": media_type, "digest": sha256(data), "size": len(data)}

    for reference, layers in sorted(images.items()):
        config = json.dumps({"architecture": "amd64", "os": "linux", "image": reference,
                             "rootfs": {"type": "layers", "diff_ids": []}}).encode()
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": dsi.OCI_MANIFEST,
            "config": add(config, "application/vnd.oci.image.config.v1+json"),
            "layers": [add(layer, "application/vnd.oci.image.layer.v1.tar") for layer in layers]
        }).encode()
        entry = add(manifest, dsi.OCI_MANIFEST)
        entry["annotations"] = {"io.containerd.image.name": reference}
        entries.append(entry)
    members = {"oci-layout": b'{"imageLayoutVersion": "1.0.0"}',
               "index.json": json.dumps({"schemaVersion": 2, "manifests": entries}).encode()}
    members.update(("blobs/sha256/" + d.split(":")[1], data) for d, data in blobs.items())
    return tar_of(path, members)


BASE = b"base layer " * 5000
V1 = {"docker.io/rancher/app:1": [BASE, b"app v1"], "docker.io/rancher/tool:1": [BASE, b"tool"],
      "docker.io/rancher/old:1": [BASE, b"old"]}
V2 = {"docker.io/rancher/app:2": [BASE, b"app v2"], "docker.io/rancher/tool:1": [BASE, b"tool"],
      "docker.io/rancher/new:1": [BASE, b"new"]}


def bundle_members(path):
    return run([need("tar"), "-tf", str(path)]).stdout.split()


def unpack(bundle, node):
    node.mkdir(exist_ok=True)
    run([need("tar"), "-xf", str(bundle), "-C", str(node)])
    return node / "registry"


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz", ".tar.zst"])
def test_a_bundle_holds_the_run_and_unpacks_with_tar(tmp_path, capsys, suffix):
    archive = release_archive(tmp_path / "v1.tar", V1)
    bundle = tmp_path / ("v1" + suffix)
    code = dsi.main(["--from-archive", archive, "-d", str(tmp_path / "tree"),
                     "--bundle", str(bundle)])
    out = capsys.readouterr().out
    assert code == 0 and "bundle v1%s:" % suffix in out, out
    run([need("sha256sum"), "-c", bundle.name + ".sha256"], cwd=str(tmp_path))
    names = bundle_members(bundle)
    kinds = ["blob" if "/blobs/sha256:" in n and n.startswith("registry/blobs/") else
             "link" if n.endswith("/blobs") else "manifest" if "/manifests/sha256:" in n else
             "meta" if "/.bundle/" in n else "tag" for n in names]
    assert kinds == sorted(kinds, key=["blob", "link", "manifest", "tag", "meta"].index), names
    assert kinds.count("tag") == 3 and kinds.count("blob") == 1 + 3 * 2
    assert not any(n.startswith(".") or ".partial" in n for n in os.listdir(str(tmp_path)))
    tree = unpack(bundle, tmp_path / "node")
    assert check(tree, "--deep").returncode == 0
    assert (tree / ".bundle" / "images.txt").read_text().split() == sorted(V1)
    with serving(tree) as server:
        for reference in V1:
            repo, tag = reference[len("docker.io/"):].split(":")
            status, headers, _ = fetch(connect(server), "GET", "/v2/%s/manifests/%s" % (repo, tag))
            assert status == 200


def test_a_differential_bundle_carries_only_what_the_node_lacks(tmp_path, capsys):
    internet = tmp_path / "internet"
    internet.mkdir()
    dsi.main(["--from-archive", release_archive(internet / "v1.tar", V1), "-d",
              str(internet / "tree"), "--bundle", str(internet / "v1.tar.gz")])
    node = unpack(internet / "v1.tar.gz", tmp_path / "node")
    inventory = internet / "inventory.json"
    inventory.write_text(check(node, "--json").stdout)  # carried back across the gap
    shutil.copytree(str(node), str(internet / "shipped"), symlinks=True)
    v2 = release_archive(internet / "v2.tar", V2)
    capsys.readouterr()
    bundles = {}
    for name, since in (("full", []), ("inventory", ["--since", str(inventory)]),
                        ("tree", ["--since", str(internet / "shipped")])):
        bundles[name] = internet / ("v2-%s.tar" % name)
        assert dsi.main(["--from-archive", v2, "-d", str(internet / "tree"),
                         "--bundle", str(bundles[name])] + since) == 0
    summary = capsys.readouterr().out
    # The base layer, and tool:1 whole (its config, layer and manifest).
    assert "3 blobs and 1 manifests already there" in summary
    with tarfile.open(str(bundles["inventory"])) as one, tarfile.open(str(bundles["tree"])) as two:
        assert [(m.name, m.linkname, m.size) for m in one] == [(m.name, m.linkname, m.size)
                                                               for m in two]
    differential = set(bundle_members(bundles["inventory"]))
    assert not any(n.startswith("registry/blobs/") and n[len("registry/blobs/"):] in
                   json.loads(inventory.read_text())["inventory"]["blobs"] for n in differential)
    assert os.path.getsize(str(bundles["inventory"])) < os.path.getsize(str(bundles["full"]))
    assert "registry/rancher/tool/manifests/1" in differential  # every tag of the run
    shutil.copytree(str(node), str(tmp_path / "full-node" / "registry"), symlinks=True)
    full_node = unpack(bundles["full"], tmp_path / "full-node")
    node = unpack(bundles["inventory"], tmp_path / "node")
    assert check(node, "--deep").returncode == 0
    assert snapshot(str(node), str(node / ".bundle")) == snapshot(str(full_node),
                                                                  str(full_node / ".bundle"))
    keep = node / ".bundle" / "images.txt"
    report = json.loads(gc(node, "--keep", str(keep), "--json").stdout)
    assert report["counts"]["tag"] == 2  # app:1 and old:1
    old_only = sha256(b"old"), sha256(b"app v1")
    assert {os.path.basename(i["path"]) for i in report["removed"]} >= set(old_only)
    assert check(node, "--deep").returncode == 0


def test_bundle_errors_are_one_line_and_leave_nothing_behind(tmp_path, capsys):
    archive = release_archive(tmp_path / "v1.tar", V1)
    (tmp_path / "other.json").write_text('{"inventory": {"manifests": []}}')
    tree = str(tmp_path / "tree")
    for args, message in (
            (["--bundle", str(tmp_path / "missing" / "b.tar")], "its directory does not exist"),
            (["--bundle", str(tmp_path / "b.zip")], "must end in .tar, .tar.gz or .tar.zst"),
            (["--bundle", str(tmp_path / "b.tar"), "--since", archive], "is not valid JSON"),
            (["--bundle", str(tmp_path / "b.tar"), "--since", str(tmp_path / "other.json")],
             "is not an inventory"),
            (["--bundle", str(tmp_path / "b.tar"), "--since", str(tmp_path / "nope.json")],
             "cannot read --since")):
        assert dsi.main(["--from-archive", archive, "-d", tree] + args) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        assert not os.path.exists(str(tmp_path / "b.tar"))
    assert not [n for n in os.listdir(str(tmp_path)) if "partial" in n]


def test_a_damaged_bundle_is_caught_by_sha256sum_and_tar(tmp_path, capsys):
    bundle = tmp_path / "v1.tar.gz"
    dsi.main(["--from-archive", release_archive(tmp_path / "v1.tar", V1), "-d",
              str(tmp_path / "tree"), "--bundle", str(bundle)])
    data = bundle.read_bytes()
    bundle.write_bytes(data[:len(data) // 2])
    result = subprocess.run([need("sha256sum"), "-c", bundle.name + ".sha256"],
                            cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert result.returncode != 0
    result = subprocess.run([need("tar"), "-tzf", str(bundle)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert result.returncode != 0


# The k3s-like release sets of the upgrade journey: most of v2 is v1, as in real k3s
# releases (every image shares one base layer); app is bumped, gone is gone, new is new.
UPGRADE_V1 = [("rancher/app", "1", b"v1"), ("rancher/tool", "1", b"tool"),
              ("rancher/gone", "1", b"gone")]
UPGRADE_V2 = [("rancher/app", "2", b"v2"), ("rancher/tool", "1", b"tool"),
              ("rancher/new", "1", b"new")]


def test_upgrade_journey(tls, containerd, tmp_path, capsys):
    skopeo = need("skopeo")
    tar = need("tar")
    # The upstream distribution holds both sets.
    staging = TreeBuilder(tmp_path / "staging")
    base = make_layer({"usr/lib/base.bin": random.Random(SEED).randbytes(2 * 1024 * 1024)})
    blobs_of = {}
    for repo, tag, extra in UPGRADE_V1 + UPGRADE_V2:
        own = make_layer({"app/" + repo: extra})
        config = json.dumps({"architecture": "amd64", "os": "linux",
                             "config": {"Entrypoint": ["/app/" + repo]}, "rootfs": {
                                 "type": "layers", "diff_ids": [sha256(base[1]), sha256(own[1])]}
                             }).encode()
        layer_type = "application/vnd.oci.image.layer.v1.tar+gzip"
        document = {"schemaVersion": 2, "mediaType": er.OCI_MANIFEST,
                    "config": staging.blob(config, "application/vnd.oci.image.config.v1+json"),
                    "layers": [staging.blob(base[0], layer_type),
                               staging.blob(own[0], layer_type)]}
        staging.manifest(repo, json.dumps(document).encode(), tag=tag)
        blobs_of[repo, tag] = {d["digest"]: d["size"]
                               for d in [document["config"]] + document["layers"]}
    upstream = Upstream(str(tmp_path))
    try:
        with serving(staging.root, tls) as server:
            for repo, tag, _ in UPGRADE_V1 + UPGRADE_V2:
                upstream.push("docker://%s/%s:%s" % (host_port(server), repo, tag),
                              "%s:%s" % (repo, tag), skopeo, cert_dir_for(tls))
        internet, node = tmp_path / "internet", tmp_path / "node"
        internet.mkdir()
        node.mkdir()
        lists = {}
        for name, images in (("v1", UPGRADE_V1), ("v2", UPGRADE_V2)):
            lists[name] = internet / (name + ".txt")
            lists[name].write_text("".join("%s/%s:%s\n" % (upstream.host, repo, tag)
                                           for repo, tag, _ in images))

        def download(name, *flags):
            result = downloader(["-s", "-f", str(lists[name]), "--insecure", "--tool", "skopeo",
                                 "-d", str(internet / "tree")] + list(flags))
            assert result.returncode == 0, result.stderr
            return result.stdout

        # 1. Internet host: v1, and a full bundle of it.
        download("v1", "--bundle", str(internet / "v1.tar.gz"))
        # 2. Node: unpack it, serve it, containerd pulls v1.
        run([tar, "-xf", str(internet / "v1.tar.gz"), "-C", str(node)])
        root = node / "registry"
        port = free_port()
        endpoint = "https://127.0.0.1:%d" % port
        write_hosts_toml(containerd.hosts_dir, upstream.host, [endpoint], tls["ca"])

        def pull(repo, reference):
            sep = "@" if reference.startswith("sha256:") else ":"
            ref = "%s/%s%s%s" % (upstream.host, repo, sep, reference)
            containerd("images", "pull", "--hosts-dir", containerd.hosts_dir, ref)
            containerd("images", "rm", "--sync", ref)

        with registry_on(port, root, tls, tmp_path / "registry.log"):
            for repo, tag, _ in UPGRADE_V1:
                pull(repo, tag)
            # 3. Node: the inventory that is carried back.
            inventory = internet / "node-inventory.json"
            inventory.write_text(check(root, "--json").stdout)
            # 4. Internet host: v2, full and differential.
            download("v2", "--bundle", str(internet / "v2-full.tar.gz"))
            summary = download("v2", "--bundle", str(internet / "v2.tar.gz"),
                               "--since", str(inventory))
            node_blobs = set(json.loads(inventory.read_text())["inventory"]["blobs"])
            members = bundle_members(internet / "v2.tar.gz")
            assert not node_blobs & {m.rsplit("/", 1)[1] for m in members
                                     if m.startswith("registry/blobs/")}
            sizes = [os.path.getsize(str(internet / n)) for n in ("v2-full.tar.gz", "v2.tar.gz")]
            assert sizes[1] < sizes[0] / 10, sizes  # the 2 MiB base layer stays home
            # 5. Node: unpack it member by member while containerd pulls what is there.
            pulls, failures, done = [0], [], threading.Event()

            def keep_pulling():
                while not done.is_set():
                    for repo, tag, _ in UPGRADE_V1[:2]:
                        try:
                            pull(repo, tag)
                            pulls[0] += 1
                        except AssertionError as error:
                            failures.append(str(error)[-500:])

            puller = threading.Thread(target=keep_pulling)
            puller.start()
            try:
                for member in members:
                    run([tar, "-xf", str(internet / "v2.tar.gz"), "-C", str(node), member])
                    time.sleep(0.2)
            finally:
                done.set()
                puller.join(120)
            assert not failures and pulls[0] >= 2, (pulls, failures)
            for repo, tag, _ in UPGRADE_V2:
                pull(repo, tag)
            tool_digest = (root / "rancher" / "tool" / "manifests" / "1").resolve().name
            pull("rancher/tool", tool_digest)
            # 6. Node: --gc with the bundle's own list frees exactly the v1-only blobs.
            v2_blobs = {d for (repo, tag, _) in UPGRADE_V2 for d in blobs_of[repo, tag]}
            v1_only = {d: n for (repo, tag, _) in UPGRADE_V1
                       for d, n in blobs_of[repo, tag].items() if d not in v2_blobs}
            report = json.loads(gc(root, "--keep", str(root / ".bundle" / "images.txt"),
                                   "--json").stdout)
            freed = {os.path.basename(i["path"]): i["bytes"] for i in report["removed"]
                     if i["kind"] == "blob"}
            assert freed == v1_only
            assert check(root, "--deep").returncode == 0
            for repo, tag, _ in UPGRADE_V2:
                pull(repo, tag)
            with pytest.raises(AssertionError):
                pull("rancher/gone", "1")
    finally:
        upstream.stop()
    with capsys.disabled():
        print("\n[upgrade] %s\n[upgrade] full v2 bundle %d bytes, differential %d bytes; "
              "%d pulls during the unpack; --gc freed %d bytes of v1-only blobs" % (
                  summary.strip().splitlines()[-1], sizes[0], sizes[1], pulls[0],
                  sum(freed.values())))


def test_a_full_disk_leaves_no_bundle_behind(tmp_path, capsys):
    full = tmp_path / "small-disk"
    full.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs",
                                            str(full)]).returncode != 0:
        pytest.skip("needs root and a tmpfs mount to make a disk that fills up")
    try:
        archive = release_archive(tmp_path / "v1.tar", V1)
        code = dsi.main(["--from-archive", archive, "-d", str(tmp_path / "tree"),
                         "--bundle", str(full / "v1.tar")])
        err = capsys.readouterr().err
        assert code == 2 and "cannot write bundle" in err and "No space left" in err, err
        assert os.listdir(str(full)) == []  # neither the bundle nor its temporary file
    finally:
        subprocess.run(["umount", str(full)])


# --- Referrers: signatures, SBOMs and attestations (OCI 1.1) -------------------------------

EMPTY_CONFIG = b"{}"


def attach(builder, repo, subject, artifact_type=None, config_type=None, tag=None,
           annotations=None):
    """An OCI 1.1 artifact manifest whose subject is the manifest with digest subject."""
    layer = builder.blob(b"payload of %s" % (artifact_type or config_type).encode(),
                         "application/octet-stream")
    config = builder.blob(EMPTY_CONFIG, config_type or "application/vnd.oci.empty.v1+json")
    document = {"schemaVersion": 2, "mediaType": er.OCI_MANIFEST, "config": config,
                "layers": [layer], "subject": {"mediaType": er.OCI_MANIFEST, "digest": subject,
                                               "size": 1}}
    if artifact_type:
        document["artifactType"] = artifact_type
    if annotations:
        document["annotations"] = annotations
    body = json.dumps(document).encode()
    return builder.manifest(repo, body, tag), len(body)


@pytest.fixture()
def signed_tree(tmp_path):
    builder = TreeBuilder(tmp_path)
    _, image = builder.image("app", "amd64", tag="1")
    sbom, _ = attach(builder, "app", image, artifact_type="application/spdx+json",
                     annotations={"org.opencontainers.image.created": "2026-11-28"})
    signature, _ = attach(builder, "app", sbom, artifact_type="application/vnd.dev.sig")
    typed_by_config, _ = attach(builder, "app", image,
                                config_type="application/vnd.cncf.helm.config.v1+json")
    return {"root": tmp_path, "builder": builder, "image": image, "sbom": sbom,
            "signature": signature, "typed_by_config": typed_by_config}


def test_the_referrers_api_lists_what_refers_to_a_manifest(signed_tree):
    tree = signed_tree
    with serving(tree["root"]) as server:
        conn = connect(server)
        status, headers, body = fetch(conn, "GET", "/v2/app/referrers/" + tree["image"])
        assert status == 200 and headers["Content-Type"] == er.OCI_INDEX
        index = json.loads(body)
        assert index["mediaType"] == er.OCI_INDEX and index["schemaVersion"] == 2
        listed = {d["digest"]: d for d in index["manifests"]}
        assert set(listed) == {tree["sbom"], tree["typed_by_config"]}
        assert listed[tree["sbom"]]["artifactType"] == "application/spdx+json"
        assert listed[tree["sbom"]]["annotations"] == {
            "org.opencontainers.image.created": "2026-11-28"}
        assert listed[tree["typed_by_config"]]["artifactType"] == \
            "application/vnd.cncf.helm.config.v1+json"
        for descriptor in listed.values():
            body = fetch(conn, "GET", "/v2/app/manifests/" + descriptor["digest"])[2]
            assert descriptor["size"] == len(body) and descriptor["mediaType"] == er.OCI_MANIFEST
        status, headers, body = fetch(
            conn, "GET", "/v2/app/referrers/%s?artifactType=application/spdx%%2Bjson"
            % tree["image"])
        assert headers["OCI-Filters-Applied"] == "artifactType"
        assert [d["digest"] for d in json.loads(body)["manifests"]] == [tree["sbom"]]
        body = fetch(conn, "GET", "/v2/app/referrers/" + tree["sbom"])[2]
        assert [d["digest"] for d in json.loads(body)["manifests"]] == [tree["signature"]]
        status, _, body = fetch(conn, "GET", "/v2/app/referrers/sha256:" + "0" * 64)
        assert status == 200 and json.loads(body)["manifests"] == []
        status, _, body = fetch(conn, "GET", "/v2/app/referrers/sha256:zz")
        assert status == 400 and json.loads(body)["errors"][0]["code"] == "DIGEST_INVALID"
        status, _, body = fetch(conn, "GET", "/v2/nope/referrers/" + tree["image"])
        assert status == 404 and json.loads(body)["errors"][0]["code"] == "NAME_UNKNOWN"
        # A referrer added later is listed on the next request: the folder changed.
        late, _ = attach(tree["builder"], "app", tree["image"], artifact_type="text/plain")
        body = fetch(conn, "GET", "/v2/app/referrers/" + tree["image"])[2]
        assert late in {d["digest"] for d in json.loads(body)["manifests"]}


def test_referrers_through_ns_and_a_real_client(signed_tree, tls):
    skopeo = need("skopeo")
    namespaced = signed_tree["root"] / "mirror.example" / "app"
    namespaced.parent.mkdir()
    os.symlink(str(signed_tree["root"] / "app"), str(namespaced))
    with serving(signed_tree["root"], tls) as server:
        body = fetch(connect(server, tls), "GET", "/v2/app/referrers/%s?ns=mirror.example"
                     % signed_tree["image"])[2]
        assert len(json.loads(body)["manifests"]) == 2
        raw = run([skopeo, "inspect", "--raw", "--cert-dir", cert_dir_for(tls),
                   "docker://%s/app@%s" % (host_port(server), signed_tree["sbom"])]).stdout
    assert sha256(raw.encode()) == signed_tree["sbom"]
    assert json.loads(raw)["subject"]["digest"] == signed_tree["image"]


def test_check_reports_a_referrer_without_its_subject(signed_tree):
    assert check(signed_tree["root"], "--deep").returncode == 0
    (signed_tree["root"] / "app" / "manifests" / signed_tree["sbom"]).unlink()
    result = check(signed_tree["root"])
    assert result.returncode == 1
    assert count_lines(result.stdout, signed_tree["signature"], "refers to subject",
                       signed_tree["sbom"]) == 1


def test_gc_keeps_the_referrers_of_what_it_keeps(signed_tree, tmp_path):
    tree = signed_tree
    builder = tree["builder"]
    os.symlink(tree["signature"], str(tree["root"] / "app" / "manifests" /
                                      ("sha256-%s.sig" % tree["image"][7:])))
    _, old = builder.image("app", "amd64", extra=b"old", tag="0")
    old_sbom, _ = attach(builder, "app", old, artifact_type="application/spdx+json")
    os.symlink(old_sbom, str(tree["root"] / "app" / "manifests" / ("sha256-%s.sbom" % old[7:])))
    keep = tmp_path / "keep.txt"
    keep.write_text("registry.example/app:1\n")  # trimmed, as the downloader lays it out
    report = json.loads(gc(tree["root"], "--keep", str(keep), "--json").stdout)
    removed = {os.path.basename(item["path"]) for item in report["removed"]}
    assert {old, old_sbom, "0", "sha256-%s.sbom" % old[7:]} <= removed
    assert not {tree["image"], tree["sbom"], tree["signature"], tree["typed_by_config"],
                "sha256-%s.sig" % tree["image"][7:]} & removed
    assert check(tree["root"], "--deep").returncode == 0


def test_gc_judges_by_real_file_and_by_every_name(tmp_path):
    """Odd layouts an operator's tooling makes: a repository that is another's alias, links
    between repositories, sha512 names, a blobs link that leads into a manifests folder."""
    root = tmp_path / "tree"
    images = two_releases(root)
    pause = root / "rancher" / "app" / "manifests"
    os.makedirs(str(root / "rancher" / "alias"))
    os.symlink("../app/manifests", str(root / "rancher" / "alias" / "manifests"))
    os.symlink("../blobs", str(root / "rancher" / "alias" / "blobs"))
    os.makedirs(str(root / "other" / "manifests"))
    os.symlink("../blobs", str(root / "other" / "blobs"))
    kept_by_link = images["old/gone", "1"]["digest"]
    os.symlink(os.path.join("..", "..", "old", "gone", "manifests", kept_by_link),
               str(root / "other" / "manifests" / "linked"))
    body = images["rancher/app", "1"]["body"]
    sha512 = "sha512:" + hashlib.sha512(body).hexdigest()
    (pause / sha512).write_bytes(body)
    os.symlink(sha512, str(pause / "by512"))
    os.makedirs(str(root / "x" / "manifests"))
    os.symlink("../rancher/app/manifests", str(root / "x" / "blobs"))  # not a blob store
    keep = tmp_path / "keep.txt"
    keep.write_text("Reg/rancher/alias:2\nreg.example/other:linked\nreg.example/rancher/app:by512\n")
    result = gc(root, "--keep", str(keep), "--json")
    report = json.loads(result.stdout)
    assert not report["warnings"], report["warnings"]
    removed = {os.path.basename(i["path"]) for i in report["removed"]}
    assert {"2", "by512", sha512, kept_by_link, images["rancher/app", "2"]["digest"]} \
        .isdisjoint(removed)
    assert (pause / "2").exists() and (root / "other" / "manifests" / "linked").exists()
    assert check(root, "--deep").returncode == 0


def test_gc_refuses_lists_that_are_not_files(tmp_path):
    root = tmp_path / "tree"
    two_releases(root)
    fifo = tmp_path / "fifo"
    os.mkfifo(str(fifo))
    result = gc(root, "--keep", str(fifo))  # gc() itself has a time limit
    assert result.returncode == 2 and "not a regular file" in result.stderr
    archive = release_archive(tmp_path / "v1.tar", V1)
    assert dsi.main(["--from-archive", archive, "-d", str(tmp_path / "t"), "--bundle",
                     str(tmp_path / "b.tar"), "--since", str(fifo)]) == 2


def test_no_bundle_from_a_run_that_failed_an_image(tmp_path, capsys):
    archive = release_archive(tmp_path / "v1.tar", V1)
    members = {}
    with tarfile.open(archive) as tar:  # index.json names one more image, not in the archive
        for member in tar:
            members[member.name] = tar.extractfile(member).read()
    index = json.loads(members["index.json"])
    index["manifests"].append(dict(index["manifests"][0], digest="sha256:" + "1" * 64))
    members["index.json"] = json.dumps(index).encode()
    tar_of(archive, members)
    code = dsi.main(["--from-archive", archive, "-d", str(tmp_path / "tree"),
                     "--bundle", str(tmp_path / "b.tar")])
    err = capsys.readouterr().err
    assert code == 2 and "no bundle written" in err
    assert not (tmp_path / "b.tar").exists()


def test_a_bundle_carries_only_the_run_s_platforms(tmp_path, capsys):
    builder = TreeBuilder(tmp_path / "staging")
    _, index, children = builder.index("rancher/multi", "1", ["amd64", "arm64"])
    layout = tmp_path / "layout"
    (layout / "blobs" / "sha256").mkdir(parents=True)
    for store in ("blobs", "rancher/multi/manifests"):
        for name in os.listdir(str(builder.root + "/" + store)):
            if name.startswith("sha256:"):
                shutil.copy(os.path.join(builder.root, store, name),
                            str(layout / "blobs" / "sha256" / name[7:]))
    body = (layout / "blobs" / "sha256" / index[7:]).read_bytes()
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": er.OCI_INDEX, "digest": index, "size": len(body),
        "annotations": {"io.containerd.image.name": "docker.io/rancher/multi:1"}}]}))
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    archive = tar_of(tmp_path / "multi.tar", {
        os.path.relpath(os.path.join(top, f), str(layout)): open(os.path.join(top, f), "rb").read()
        for top, _, files in os.walk(str(layout)) for f in files})
    tree = str(tmp_path / "tree")
    assert dsi.main(["--from-archive", archive, "-d", tree, "-p", "all"]) == 0
    flip_a_bit(tmp_path / "tree" / "rancher" / "multi" / "manifests" / children[1])  # arm64
    bundle = tmp_path / "amd64.tar"
    assert dsi.main(["--from-archive", archive, "-d", tree, "-p", "linux/amd64",
                     "--bundle", str(bundle)]) == 0, capsys.readouterr().err
    names = bundle_members(bundle)
    assert "registry/rancher/multi/manifests/" + children[0] in names
    assert "registry/rancher/multi/manifests/" + children[1] not in names


def test_repository_names_the_tree_cannot_lay_out(tmp_path):
    with pytest.raises(ValueError, match="blobs or manifests"):
        dsi.parse_reference("example.com/team/blobs:1")
    builder = TreeBuilder(tmp_path)
    builder.image("team/blobs", "amd64", tag="1")
    result = check(tmp_path)
    assert result.returncode == 1 and "not a valid repository name" in result.stdout


# --- Logs for Loki and Elasticsearch -------------------------------------------------------

def test_json_logs_carry_each_request_s_fields(fixture, tls):
    with server_process("--root", fixture.root, "--cert", tls["cert"], "--key", tls["key"],
                        "--log-format", "json", drain=True) as (process, url):
        assert https_or_http_status(url, "/v2/library/multi/manifests/v1?ns=docker.io",
                                    tls["ca"]) == 200
        assert https_or_http_status(url, "/v2/nope/manifests/1", tls["ca"]) == 404
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
    entries = [json.loads(line) for line in process.log_lines]  # every line is JSON
    access = [e for e in entries if e.get("path") == "/v2/library/multi/manifests/v1"
              "?ns=docker.io"]
    assert len(access) == 1
    entry = access[0]
    assert entry["method"] == "GET" and entry["status"] == 200 and entry["ns"] == "docker.io"
    assert entry["client"] == "127.0.0.1" and entry["level"] == "info"
    served = open(fixture.file("library", "multi", "manifests", "v1"), "rb").read()
    assert entry["bytes"] == len(served) and entry["seconds"] >= 0
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])
    assert any(e.get("status") == 404 for e in entries)


# --- Signatures, SBOMs and charts from an upstream (cosign's tags, OCI 1.1 referrers) -----

COSIGN_SIMPLESIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
DSSE_ENVELOPE = "application/vnd.dsse.envelope.v1+json"
SPDX = "application/spdx+json"
COSIGN_SIG_ARTIFACT = "application/vnd.dev.cosign.artifact.sig.v1+json"
HELM_CONFIG = "application/vnd.cncf.helm.config.v1+json"
HELM_CHART = "application/vnd.cncf.helm.chart.content.v1.tar+gzip"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"


class Pusher:
    """Pushes blobs and manifests to a plain-HTTP registry, as an OCI client does."""

    def __init__(self, host):
        self.base = "http://" + host

    def blob(self, repo, data, media_type, annotations=None):
        digest = sha256(data)
        started = urllib.request.urlopen(urllib.request.Request(
            "%s/v2/%s/blobs/uploads/" % (self.base, repo), method="POST", data=b""))
        location = urllib.parse.urljoin(self.base, started.headers["Location"])
        urllib.request.urlopen(urllib.request.Request(
            location + ("&" if "?" in location else "?") + "digest=" + digest, method="PUT",
            data=data, headers={"Content-Type": "application/octet-stream"}))
        descriptor = {"mediaType": media_type, "digest": digest, "size": len(data)}
        if annotations:
            descriptor["annotations"] = annotations
        return descriptor

    def manifest(self, repo, document, tag=None):
        body = json.dumps(document).encode()
        urllib.request.urlopen(urllib.request.Request(
            "%s/v2/%s/manifests/%s" % (self.base, repo, tag or sha256(body)), method="PUT",
            data=body, headers={"Content-Type": document["mediaType"]}))
        return {"mediaType": document["mediaType"], "digest": sha256(body), "size": len(body)}

    def fallback_index(self, repo, subject, referrers):
        """The tag sha256-<hex> listing subject's referrers, as an OCI 1.1 client writes
        it for a registry without the referrers API."""
        return self.manifest(repo, {"schemaVersion": 2, "mediaType": er.OCI_INDEX,
                                    "manifests": referrers}, "sha256-" + subject["digest"][7:])


def sign_on_upstream(push, repo, subject):
    """What a supply chain attaches to an image: a cosign signature and attestation under
    their tags, an SBOM with a subject (through the fallback tag), and a signature on the
    SBOM (the same way). Returns {name: descriptor}, names and tags included."""
    tag = "sha256-" + subject["digest"][7:]
    config = push.blob(repo, json.dumps({"architecture": "", "os": "", "config": {}, "rootfs": {
        "type": "layers", "diff_ids": []}}).encode(), OCI_CONFIG)
    payload = json.dumps({"critical": {"identity": {"docker-reference": repo}, "image": {
        "docker-manifest-digest": subject["digest"]}, "type": "cosign container image "
        "signature"}, "optional": None}).encode()
    found = {"signature": push.manifest(repo, {
        "schemaVersion": 2, "mediaType": er.OCI_MANIFEST, "config": config, "layers": [
            push.blob(repo, payload, COSIGN_SIMPLESIGNING,
                      {"dev.cosignproject.cosign/signature": "MEUCIQD" + "x" * 40})]},
        tag + ".sig")}
    envelope = json.dumps({"payloadType": "application/vnd.in-toto+json", "payload": "e30=",
                           "signatures": [{"sig": "MEQC"}]}).encode()
    found["attestation"] = push.manifest(repo, {
        "schemaVersion": 2, "mediaType": er.OCI_MANIFEST, "config": config, "layers": [
            push.blob(repo, envelope, DSSE_ENVELOPE,
                      {"predicateType": "https://slsa.dev/provenance/v0.2"})]}, tag + ".att")
    empty = push.blob(repo, EMPTY_CONFIG, OCI_EMPTY)
    annotations = {"org.opencontainers.image.created": "2026-11-28T00:00:00Z"}
    found["sbom"] = push.manifest(repo, {
        "schemaVersion": 2, "mediaType": er.OCI_MANIFEST, "artifactType": SPDX,
        "config": empty, "layers": [push.blob(repo, b'{"spdxVersion": "SPDX-2.3"}', SPDX)],
        "subject": subject, "annotations": annotations})
    found["fallback"] = push.fallback_index(repo, subject, [
        dict(found["sbom"], artifactType=SPDX, annotations=annotations)])
    found["sbom_signature"] = push.manifest(repo, {
        "schemaVersion": 2, "mediaType": er.OCI_MANIFEST, "artifactType": COSIGN_SIG_ARTIFACT,
        "config": empty, "layers": [push.blob(repo, b"a signature of the SBOM",
                                              "application/vnd.dev.sigstore.bundle.v0.3+json")],
        "subject": found["sbom"]})
    found["sbom_fallback"] = push.fallback_index(repo, found["sbom"], [
        dict(found["sbom_signature"], artifactType=COSIGN_SIG_ARTIFACT)])
    found["tags"] = {tag + ".sig": found["signature"]["digest"],
                     tag + ".att": found["attestation"]["digest"],
                     tag: found["fallback"]["digest"],
                     "sha256-" + found["sbom"]["digest"][7:]: found["sbom_fallback"]["digest"]}
    return found


def push_chart(push, repo, tag):
    chart = gzip.compress(b"a Helm chart's files", mtime=0)
    config = push.blob(repo, b'{"name": "app", "version": "1.2.3", "apiVersion": "v2"}',
                       HELM_CONFIG)
    layer = push.blob(repo, chart, HELM_CHART, {"org.opencontainers.image.title": "app.tgz"})
    return push.manifest(repo, {"schemaVersion": 2, "mediaType": er.OCI_MANIFEST,
                                "config": config, "layers": [layer]}, tag), chart


@pytest.fixture(scope="session")
def signed_upstream(upstream, fixture):
    """signed/app:v1, a copy of the multi-platform fixture image, signed on the upstream as
    a supply chain signs it; and a Helm chart, charts/app:1.2.3."""
    skopeo = need("skopeo")
    run([skopeo, "copy", "--all", "--preserve-digests", "--src-tls-verify=false",
         "--dest-tls-verify=false", "docker://%s/library/multi:v1" % upstream.host,
         "docker://%s/signed/app:v1" % upstream.host])
    body = upstream.raw("signed/app:v1", skopeo)
    subject = {"mediaType": json.loads(body)["mediaType"], "digest": sha256(body),
               "size": len(body)}
    push = Pusher(upstream.host)
    found = sign_on_upstream(push, "signed/app", subject)
    found["image"] = subject
    found["tags"]["v1"] = subject["digest"]
    found["chart"], found["chart_bytes"] = push_chart(push, "charts/app", "1.2.3")
    # One more referrer, which only a referrers API lists (the fallback tag does not).
    empty = push.blob("signed/app", EMPTY_CONFIG, OCI_EMPTY)
    found["provenance"] = push.manifest("signed/app", {
        "schemaVersion": 2, "mediaType": er.OCI_MANIFEST, "artifactType": "application/vnd."
        "in-toto+json", "config": empty, "layers": [push.blob(
            "signed/app", b'{"_type": "https://in-toto.io/Statement/v1"}', "application/"
            "vnd.in-toto+json")], "subject": subject})
    return found


def referrer_digests(conn, repo, digest, query=""):
    status, headers, body = fetch(conn, "GET", "/v2/%s/referrers/%s%s" % (repo, digest, query))
    assert status == 200 and headers["Content-Type"] == er.OCI_INDEX, body
    return {d["digest"]: d for d in json.loads(body)["manifests"]}, headers


def test_download_brings_signatures_sboms_and_charts(tool, signed_upstream, upstream, tls,
                                                     tmp_path):
    skopeo = need("skopeo")
    up = signed_upstream
    extra = tmp_path / "extra.txt"
    extra.write_text("%s/signed/app:v1\noci://%s/charts/app:1.2.3\n" % (upstream.host,
                                                                        upstream.host))
    root = tmp_path / "registry"
    bundle = tmp_path / "signed.tar"
    result = downloader(["-d", str(root), "-s", "-f", str(extra), "-p", "linux/amd64",
                         "--insecure", "--bundle", str(bundle)] + tool["args"],
                        path_prefix=tool["path"])
    assert result.returncode == 0, result.stderr
    assert "2 images: 2 ok, 0 failed" in result.stdout
    assert "with them: 2 signatures, 1 attestation, 1 SBOM" in result.stdout
    assert re.search(r"signed/app:v1 %s 1 platform, \d+ blobs new .*; with 2 signatures, "
                     r"1 attestation, 1 SBOM\n" % up["image"]["digest"], result.stderr)
    assert re.search(r"charts/app:1\.2\.3 %s chart, 2 blobs new" % up["chart"]["digest"],
                     result.stderr)
    tree_is_sound(str(root))
    checked = check(root, "--deep")
    assert checked.returncode == 0, checked.stdout
    # Byte-exact, under the upstream's tags.
    manifests = root / "signed" / "app" / "manifests"
    for tag, digest in up["tags"].items():
        assert os.readlink(str(manifests / tag)) == digest
        assert (manifests / digest).read_bytes() == upstream.raw("signed/app@" + digest, skopeo)
    for name in ("sbom", "sbom_signature"):
        assert (manifests / up[name]["digest"]).is_file()
    assert os.readlink(str(root / "charts/app/manifests/1.2.3")) == up["chart"]["digest"]
    # The bundle carries all of it.
    members = set(bundle_members(bundle))
    for tag, digest in up["tags"].items():
        assert {"registry/signed/app/manifests/" + tag,
                "registry/signed/app/manifests/" + digest} <= members
    assert "registry/blobs/" + sha256(up["chart_bytes"]) in members
    # The node's registry answers what a verifier asks.
    with serving(str(root), tls) as server:
        conn = connect(server, tls)
        listed, _ = referrer_digests(conn, "signed/app", up["image"]["digest"])
        assert list(listed) == [up["sbom"]["digest"]]
        assert listed[up["sbom"]["digest"]]["artifactType"] == SPDX
        assert listed[up["sbom"]["digest"]]["annotations"] == {
            "org.opencontainers.image.created": "2026-11-28T00:00:00Z"}
        listed, _ = referrer_digests(conn, "signed/app", up["sbom"]["digest"])
        assert list(listed) == [up["sbom_signature"]["digest"]]
        listed, headers = referrer_digests(conn, "signed/app", up["image"]["digest"],
                                           "?artifactType=" + urllib.parse.quote(SPDX))
        assert list(listed) == [up["sbom"]["digest"]]
        assert headers["OCI-Filters-Applied"] == "artifactType"
        listed, _ = referrer_digests(conn, "signed/app", up["image"]["digest"],
                                     "?artifactType=" + urllib.parse.quote(DSSE_ENVELOPE))
        assert listed == {}
        listed, _ = referrer_digests(conn, "signed/app", up["signature"]["digest"])
        assert listed == {}
        certs = cert_dir_for(tls)
        for reference in ["signed/app:" + tag for tag in up["tags"]] + [
                "signed/app@" + up[name]["digest"] for name in ("sbom", "sbom_signature")] + [
                "charts/app:1.2.3"]:
            served = run([skopeo, "inspect", "--raw", "--cert-dir", certs, "docker://%s/%s" % (
                host_port(server), reference)]).stdout.encode()
            assert served == upstream.raw(reference, skopeo), reference
        pulled = oras_pull(server, tls, "charts/app:1.2.3", tmp_path / "chart")
        assert pulled == {"app.tgz": up["chart_bytes"]}
    # A second run fetches nothing new, and says what it has.
    again = downloader(["-d", str(root), "-s", "-f", str(extra), "-p", "linux/amd64",
                        "--insecure"] + tool["args"], path_prefix=tool["path"])
    assert again.returncode == 0, again.stderr
    assert "blobs 0 new" in again.stdout and "2 signatures" in again.stdout
    # A differential bundle against the tree itself carries nothing; --gc keeping the same
    # list removes nothing, referrers and fallback tags included.
    again = downloader(["-d", str(root), "-s", "-f", str(extra), "-p", "linux/amd64",
                        "--insecure", "--bundle", str(tmp_path / "none.tar"), "--since",
                        str(root)] + tool["args"], path_prefix=tool["path"])
    assert again.returncode == 0, again.stderr
    assert not [m for m in bundle_members(tmp_path / "none.tar") if "sha256:" in m]
    report = json.loads(gc(root, "--keep", str(extra), "--json").stdout)
    assert report["removed"] == [] and not report["warnings"], report


def oras_pull(server, tls, reference, directory):
    """{file name: bytes} that the oras Python client (PyPI) pulls from the server."""
    try:
        import oras.client
    except ImportError:
        need("oras (pip install oras)")
    saved = os.environ.get("REQUESTS_CA_BUNDLE")
    os.environ["REQUESTS_CA_BUNDLE"] = tls["ca"]
    try:
        client = oras.client.OrasClient(hostname=host_port(server), tls_verify=True)
        paths = client.pull(target="%s/%s" % (host_port(server), reference),
                            outdir=str(directory))
    finally:
        if saved is None:
            del os.environ["REQUESTS_CA_BUNDLE"]
        else:
            os.environ["REQUESTS_CA_BUNDLE"] = saved
    return {os.path.basename(p): open(p, "rb").read() for p in paths}


class ReferrersUpstream(LoopbackServer):
    """A test upstream that answers the referrers API, as no packaged registry does yet: it
    serves the spec's answer from `listed` ({subject: [descriptor]}) and passes every other
    request to the real upstream. With `token`, the referrers API and the tags it guards
    ask for a bearer token, which /token gives for the Basic `credentials` only. `answer`
    replaces the referrers answer with (status, body), as a broken upstream would."""

    def __init__(self, upstream_host, listed, token=None, credentials=None, realm=None,
                 answer=None, page_size=None, token_uses=None, served=None):
        outer = self
        self.paths, self.authorizations = [], []
        self.tokens = []  # issued, the last one valid for token_uses guarded requests

        class Handler(er.http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(handler):
                outer.paths.append(handler.path)
                outer.authorizations.append(handler.headers.get("Authorization"))
                guarded = "/referrers/" in handler.path or "/manifests/sha256-" in handler.path
                if handler.path.startswith("/token?"):
                    if credentials and handler.headers.get("Authorization") != credentials:
                        return handler.reply(401, b"{}")
                    outer.tokens.append([token + ("-%d" % len(outer.tokens) if token_uses
                                                  else ""), token_uses or float("inf")])
                    return handler.reply(200, json.dumps({"token": outer.tokens[-1][0]}).encode())
                if token and guarded and not handler.earns_entry():
                    return handler.reply(401, b"{}", {"WWW-Authenticate": (
                        'Bearer realm="%s",service="test",scope="repository:signed/app:pull"'
                        % (realm or "http://%s/token" % outer.host))})
                match = re.fullmatch(r"/v2/(.+)/referrers/(sha256:[a-f0-9]{64})(?:\?page=(\d+))?",
                                     handler.path)
                if handler.path in (served or {}):  # what no real registry would hold
                    return handler.reply(200, served[handler.path],
                                         {"Content-Type": er.OCI_MANIFEST})
                if match and answer:
                    return handler.reply(*answer)
                if match:
                    found, page = listed.get(match.group(2), []), int(match.group(3) or 0)
                    size = page_size or len(found) or 1
                    headers = {"Content-Type": er.OCI_INDEX}
                    if (page + 1) * size < len(found):
                        headers["Link"] = '</v2/%s/referrers/%s?page=%d>; rel="next"' % (
                            match.group(1), match.group(2), page + 1)
                    return handler.reply(200, json.dumps({
                        "schemaVersion": 2, "mediaType": er.OCI_INDEX,
                        "manifests": found[page * size:(page + 1) * size]}).encode(), headers)
                handler.relay()

            def earns_entry(handler):
                """Whether the request carries the last token issued, still valid."""
                if not outer.tokens or handler.headers.get("Authorization") != \
                        "Bearer " + outer.tokens[-1][0] or outer.tokens[-1][1] <= 0:
                    return False
                outer.tokens[-1][1] -= 1
                return True

            do_HEAD = do_GET

            def relay(handler):
                request = urllib.request.Request(
                    "http://%s%s" % (upstream_host, handler.path), method=handler.command,
                    headers={"Accept": ", ".join(handler.headers.get_all("Accept") or ["*/*"])})
                try:
                    with urllib.request.urlopen(request) as response:
                        status, headers, body = response.status, response.headers, response.read()
                except urllib.error.HTTPError as error:
                    status, headers, body = error.code, error.headers, error.read()
                handler.reply(status, body, {k: headers[k] for k in (
                    "Content-Type", "Docker-Content-Digest") if headers.get(k)},
                    length=headers.get("Content-Length"))

            def reply(handler, status, body, headers=None, length=None):
                handler.send_response(status)
                for name, value in (headers or {}).items():
                    handler.send_header(name, value)
                handler.send_header("Content-Length", length or str(len(body)))
                handler.end_headers()
                if handler.command != "HEAD":
                    handler.wfile.write(body)

        self.serve(Handler)


def write_auth_file(path, host, credentials):
    """A docker / containers auth file holding one registry's 'Basic ...' credentials."""
    path.write_text(json.dumps({"auths": {host: {"auth": credentials.split(" ", 1)[1]}}}))


def test_download_uses_the_referrers_api_where_the_upstream_answers_it(
        tool, signed_upstream, upstream, tmp_path):
    up = signed_upstream
    listed = {up["image"]["digest"]: [dict(up["sbom"], artifactType=SPDX),
                                      dict(up["provenance"], artifactType="application/vnd."
                                           "in-toto+json")],
              up["sbom"]["digest"]: [dict(up["sbom_signature"], artifactType=COSIGN_SIG_ARTIFACT)]}
    credentials = "Basic " + base64.b64encode(b"ci:s3cret").decode()
    # One referrer a page; each token good for three requests, then renewed.
    proxy = ReferrersUpstream(upstream.host, listed, token="t0ken", credentials=credentials,
                              page_size=1, token_uses=3)
    try:
        write_auth_file(tmp_path / "config.json", proxy.host, credentials)
        extra = tmp_path / "extra.txt"
        extra.write_text("%s/signed/app:v1\n" % proxy.host)
        root = tmp_path / "registry"
        result = downloader(["-d", str(root), "-s", "-f", str(extra), "-p", "linux/amd64",
                             "--insecure"] + tool["args"], path_prefix=tool["path"],
                            env_extra={"DOCKER_CONFIG": str(tmp_path),
                                       "REGISTRY_AUTH_FILE": str(tmp_path / "config.json")})
    finally:
        proxy.stop()
    assert result.returncode == 0, result.stderr
    assert "with them: 2 signatures, 2 attestations, 1 SBOM" in result.stdout
    manifests = root / "signed" / "app" / "manifests"
    for name in ("sbom", "sbom_signature", "signature", "attestation", "provenance"):
        assert (manifests / up[name]["digest"]).is_file(), name
    # The API was asked, each fallback tag was not; the token was earned with the
    # credentials of the tool's own auth file, and then carried.
    fallback_tags = {"/v2/signed/app/manifests/sha256-" + up[name]["digest"][7:]
                     for name in ("image", "sbom")}
    assert not fallback_tags & set(proxy.paths)
    assert not (manifests / ("sha256-" + up["image"]["digest"][7:])).exists()
    assert "/v2/signed/app/referrers/" + up["image"]["digest"] in proxy.paths
    assert "/v2/signed/app/referrers/%s?page=1" % up["image"]["digest"] in proxy.paths
    asked = dict(zip(proxy.paths, proxy.authorizations))
    assert asked["/v2/signed/app/referrers/" + up["sbom"]["digest"]].startswith("Bearer t0ken-")
    assert len(proxy.tokens) > 2  # each renewed as it expired, the run going on
    tree_is_sound(str(root))


HOSTILE_REFERRERS = {
    "a 500": (dict(answer=(500, b"oops")), "the upstream answered 500"),
    "not an object": (dict(answer=(200, b"[1]")), "is a list, not a JSON object"),
    "a path as a digest": (dict(answer=(200, json.dumps({
        "schemaVersion": 2, "mediaType": er.OCI_INDEX,
        "manifests": [{"digest": "../../../etc/passwd", "size": 1}]}).encode())),
        "manifests[0].digest is '../../../etc/passwd', not sha256:"),
    "a manifest for an index": (dict(answer=(200, json.dumps({
        "schemaVersion": 2, "mediaType": er.OCI_MANIFEST, "config": {
            "digest": "sha256:" + "0" * 64, "size": 2}, "layers": []}).encode())),
        "answered with a manifest, not an index"),
    "too big": (dict(answer=(200, b" " * (dsi.MAX_MANIFEST_BYTES + 1))), "the answer is over"),
    "a file realm": (dict(token="t", realm="file:///etc/passwd"),
                     "token realm 'file:///etc/passwd' is not an HTTP URL"),
    "a header in the token": (dict(token="t\r\nX-Injected: 1"), "is not a token"),
    "credentials refused": (dict(token="t", credentials="Basic bm90OnRoZXNl"),
                            "token service answered 401"),
    "a challenge over 64 KiB": (dict(token="t", realm="http://127.0.0.1/" + "a" * 70000),
                                "got more than 65536 bytes"),
    "a realm's port that is no number": (dict(token="t", realm="http://127.0.0.1:abc/t"),
                                         "nonnumeric port"),
}


@pytest.mark.parametrize("trouble", sorted(HOSTILE_REFERRERS))
def test_a_hostile_upstream_s_referrers_fail_that_image_only(trouble, signed_upstream, upstream,
                                                              crane_double, tmp_path):
    up = signed_upstream
    options, expected = HOSTILE_REFERRERS[trouble]
    proxy = ReferrersUpstream(upstream.host, {}, **options)
    try:
        extra = tmp_path / "extra.txt"
        extra.write_text("%s/signed/app:v1\n%s/library/multi:v1\n" % (proxy.host, upstream.host))
        root = tmp_path / "registry"
        result = downloader(["-d", str(root), "-s", "-f", str(extra), "--insecure", "--tool",
                             "crane"], path_prefix=crane_double,
                            env_extra={"DOCKER_CONFIG": str(tmp_path)})
    finally:
        proxy.stop()
    assert result.returncode == 1
    assert "2 images: 1 ok, 1 failed" in result.stderr
    failed = [line for line in result.stderr.splitlines() if "FAILED" in line]
    assert len(failed) == 1 and "signed/app:v1" in failed[0] and expected in failed[0], failed
    assert "X-Injected" not in "".join(proxy.paths)
    tree_is_sound(str(root))
    assert check(root, "--deep").returncode == 0  # the image itself is whole
    assert not (root / "signed" / "app" / "manifests" / up["sbom"]["digest"]).exists()


def test_a_listed_referrer_that_names_another_subject_is_left_out(signed_upstream, upstream,
                                                                  crane_double, tmp_path):
    up = signed_upstream
    proxy = ReferrersUpstream(upstream.host, {up["image"]["digest"]: [up["sbom_signature"]]})
    try:
        extra = tmp_path / "extra.txt"
        extra.write_text("%s/signed/app:v1\n" % proxy.host)
        root = tmp_path / "registry"
        result = downloader(["-d", str(root), "-s", "-f", str(extra), "--insecure", "--tool",
                             "crane"], path_prefix=crane_double)
    finally:
        proxy.stop()
    assert result.returncode == 0, result.stderr
    assert "1 listed as referrers of %s do not name it as their subject; left out: %s" % (
        up["image"]["digest"], up["sbom_signature"]["digest"]) in result.stderr
    assert not (root / "signed/app/manifests" / up["sbom_signature"]["digest"]).exists()
    assert "with them: 1 signature, 1 attestation\n" in result.stdout


def test_no_referrers_saves_the_images_only(signed_upstream, upstream, fixture, crane_double,
                                            tmp_path):
    extra = tmp_path / "extra.txt"
    extra.write_text("%s/signed/app:v1\n" % upstream.host)
    root = tmp_path / "registry"
    result = downloader(["-d", str(root), "-s", "-f", str(extra), "--insecure", "--tool", "crane",
                         "--no-referrers"], path_prefix=crane_double)
    assert result.returncode == 0, result.stderr
    assert "with them" not in result.stdout
    assert sorted(os.listdir(str(root / "signed/app/manifests"))) == sorted(
        ["v1", signed_upstream["image"]["digest"], fixture.images["library/multi:v1"][2][0]])


def oci_archive_of(builder, repo, path, entries):
    """An oci-archive of every blob and manifest of builder's repo, whose index.json lists
    entries: [(digest, image name or None)]."""
    members = {"oci-layout": b'{"imageLayoutVersion": "1.0.0"}'}
    for store in ("blobs", repo + "/manifests"):
        for name in os.listdir(os.path.join(builder.root, store)):
            full = os.path.join(builder.root, store, name)
            if name.startswith("sha256:") and not os.path.islink(full):
                members["blobs/sha256/" + name[7:]] = open(full, "rb").read()
    listed = []
    for digest, name in entries:
        entry = {"mediaType": er.OCI_MANIFEST, "digest": digest,
                 "size": len(members["blobs/sha256/" + digest[7:]])}
        if name:
            entry["annotations"] = {"io.containerd.image.name": name}
        listed.append(entry)
    members["index.json"] = json.dumps({"schemaVersion": 2, "manifests": listed}).encode()
    return tar_of(path, members)


def test_an_oci_archive_keeps_its_referrers(tmp_path, capsys):
    builder = TreeBuilder(tmp_path / "staging")
    _, image = builder.image("rancher/app", "amd64", tag="1")
    sbom, _ = attach(builder, "rancher/app", image, artifact_type=SPDX)
    signature, _ = attach(builder, "rancher/app", sbom, artifact_type=COSIGN_SIG_ARTIFACT)
    _, unnamed = builder.image("rancher/app", "amd64", extra=b"no name, no subject")
    orphan, _ = attach(builder, "rancher/app", "sha256:" + "1" * 64, artifact_type=SPDX)
    # The SBOM is listed in index.json without a name; its signature is only a blob.
    archive = oci_archive_of(builder, "rancher/app", tmp_path / "app.tar", [
        (image, "docker.io/rancher/app:1"), (sbom, None), (unnamed, None), (orphan, None)])
    tree = tmp_path / "tree"
    assert dsi.main(["--from-archive", archive, "-d", str(tree)]) == 1
    out, err = capsys.readouterr()
    assert "with them: 1 signature, 1 SBOM" in err
    assert "3 images: 1 ok, 2 failed" in err and "entry 3: no image name" in err
    assert "entry 4: a referrer of sha256:%s, which is not in the archive" % ("1" * 64) in err
    assert check(tree, "--deep").returncode == 0
    with serving(str(tree)) as server:
        conn = connect(server)
        assert list(referrer_digests(conn, "rancher/app", image)[0]) == [sbom]
        assert list(referrer_digests(conn, "rancher/app", sbom)[0]) == [signature]
    assert dsi.main(["--from-archive", archive, "-d", str(tmp_path / "bare"),
                     "--no-referrers"]) == 1
    assert not (tmp_path / "bare" / "rancher/app/manifests" / sbom).exists()


# --- Metrics, scraped by the real Prometheus -------------------------------------------

class Prometheus:
    """Debian's prometheus on a free loopback port, scraping targets every second."""

    def __init__(self, directory, targets):
        binary = need("prometheus")
        config = os.path.join(directory, "prometheus.yml")
        with open(config, "w") as f:
            f.write("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                    "scrape_configs:\n  - job_name: embedded-registry\n"
                    "    static_configs:\n      - targets: [%s]\n"
                    % ", ".join('"%s"' % target for target in targets))
        self.base = "http://127.0.0.1:%d" % free_port()
        self.log = open(os.path.join(directory, "prometheus.log"), "w")
        self.process = subprocess.Popen(
            [binary, "--config.file", config, "--storage.tsdb.path",
             os.path.join(directory, "data"), "--web.listen-address", self.base[7:]],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not self._ready():
            assert self.process.poll() is None, "prometheus exited: see %s" % self.log.name
            assert time.monotonic() < deadline, "prometheus did not start"
            time.sleep(0.2)

    def _ready(self):
        try:
            return urllib.request.urlopen(self.base + "/-/ready", timeout=2).status == 200
        except OSError:
            return False

    def query(self, expression):
        """{labels as a sorted tuple: value} of an instant query."""
        url = "%s/api/v1/query?%s" % (self.base, urllib.parse.urlencode({"query": expression}))
        answer = json.loads(urllib.request.urlopen(url, timeout=10).read())
        assert answer["status"] == "success", answer
        return {tuple(sorted(item["metric"].items())): float(item["value"][1])
                for item in answer["data"]["result"]}

    def wait_for(self, expression, expected, timeout=30):
        """The query's one value once it equals expected (scrapes come each second)."""
        deadline = time.monotonic() + timeout
        while True:
            values = list(self.query(expression).values())
            if values == [expected] or time.monotonic() > deadline:
                return values
            time.sleep(0.5)

    def stop(self):
        self.process.terminate()
        self.process.wait(30)
        self.log.close()


ACCESS_LINE_RE = re.compile(r" INFO \S+ ([A-Z]+) (\S+) (\d{3}) (\d+) [\d.]+s$")


def access_log(lines):
    """[(route, method, status, path, bytes)] of the access log's request lines."""
    requests = []
    for line in lines:
        match = ACCESS_LINE_RE.search(line.rstrip("\n"))
        if match:
            method, path, status, sent = match.groups()
            try:
                route = er.parse_route(path).kind
            except er.RegistryError:
                route = "other"
            requests.append((route, method, status, path, int(sent)))
    return requests


def openssl_not_after(cert):
    text = run([need("openssl"), "x509", "-noout", "-enddate", "-in", cert]).stdout
    return calendar.timegm(time.strptime(text.strip().split("=", 1)[1], "%b %d %H:%M:%S %Y GMT"))


@pytest.mark.parametrize("workers", [1, 2])
def test_prometheus_scrapes_what_was_served(workers, fixture, tls, containerd, tmp_path):
    skopeo = need("skopeo")
    promtool = need("promtool")
    root = tmp_path / "tree"
    shutil.copytree(fixture.root, str(root), symlinks=True)
    broken = json.loads(TreeBuilder(root).image("broken/app", "amd64", tag="1")[0])
    corrupt = root / "blobs" / broken["layers"][1]["digest"]
    flip_a_bit(corrupt)
    metrics_port = free_port()
    with server_process("--root", str(root), "--cert", tls["cert"], "--key", tls["key"],
                        "--workers", str(workers), "--metrics-listen", str(metrics_port),
                        drain=True) as (process, url):
        prometheus = Prometheus(str(tmp_path), ["127.0.0.1:%d" % metrics_port])
        try:
            run([skopeo, "copy", "--src-cert-dir", cert_dir_for(tls), "docker://%s/library/multi:v1"
                 % url[8:], "dir:" + str(tmp_path / "copy")])
            write_hosts_toml(containerd.hosts_dir, MIRROR, [url], tls["ca"])
            containerd("images", "pull", "--hosts-dir", containerd.hosts_dir, "--snapshotter",
                       "native", "%s/a/b/c/d:1.0" % MIRROR)
            context = ssl.create_default_context(cafile=tls["ca"])
            for _ in range(2):  # the second time it is refused at once, not hashed again
                conn = http.client.HTTPSConnection("127.0.0.1", int(url.rsplit(":", 1)[1]),
                                                   context=context, timeout=10)
                with contextlib.suppress(http.client.HTTPException, OSError):
                    fetch(conn, "GET", "/v2/broken/app/blobs/" + corrupt.name)
                conn.close()
            time.sleep(0.5)  # the last access lines are written after the answers
            served = access_log(process.log_lines)
            assert prometheus.wait_for("sum(embedded_registry_http_requests_total)",
                                       len(served)) == [len(served)]
            by_route = prometheus.query(
                "sum by (route, method, code) (embedded_registry_http_requests_total)")
            counted = collections.Counter((r, m, c) for r, m, c, _, _ in served)
            assert by_route == {(("code", c), ("method", m), ("route", r)): float(n)
                                for (r, m, c), n in counted.items()}
            assert counted["blob", "GET", "200"] >= 6 and counted["manifest", "GET", "200"] >= 3
            # Blob bytes: each sound blob's file size, and what went out of the corrupt one.
            expected = sum(os.path.getsize(str(root / "blobs" / urllib.parse.urlsplit(
                path).path.rsplit("/", 1)[1]))
                           for route, method, status, path, _ in served
                           if route == "blob" and method == "GET" and status == "200"
                           and corrupt.name not in path)
            expected += sum(sent for route, _, _, path, sent in served
                            if route == "blob" and corrupt.name in path)
            assert prometheus.query('embedded_registry_http_response_bytes_total{route="blob"}'
                                    ).popitem()[1] == expected
            assert list(prometheus.query(
                'sum(embedded_registry_blob_verifications_total{result="corrupt"})').values()) \
                == [1.0]
            assert list(prometheus.query(
                "embedded_registry_tls_certificate_expiry_timestamp_seconds").values()) == [
                float(openssl_not_after(tls["cert"]))]
            assert list(prometheus.query("sum(up)").values()) == [1.0]
            scraped = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % metrics_port,
                                             timeout=10).read()
            checked = subprocess.run([promtool, "check", "metrics"], input=scraped,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            assert checked.returncode == 0, checked.stdout
            assert b'embedded_registry_build_info{version="%s"' % er.__version__.encode() in scraped
        finally:
            prometheus.stop()


# --- k3s's own certificates: waiting for them, and their rotation -------------------------

def k3s_serving_certificate(tls_dir, days):
    """k3s's server CA and its serving-kube-apiserver certificate (ECDSA P-256, as k3s
    issues them, with 127.0.0.1 among the names), laid out as in
    /var/lib/rancher/k3s/server/tls; each file appears whole, by rename."""
    openssl = need("openssl")
    d = str(tls_dir)
    os.makedirs(d, exist_ok=True)
    ca_key, ca_crt = os.path.join(d, "server-ca.key"), os.path.join(d, "server-ca.crt")
    if not os.path.exists(ca_crt):
        run([openssl, "req", "-x509"] + EC_KEY + [
            "-nodes", "-days", "3650", "-subj", "/CN=k3s-server-ca@1700000000",
            "-keyout", ca_key + ".new", "-out", ca_crt + ".new"])
        os.rename(ca_key + ".new", ca_key)
        os.rename(ca_crt + ".new", ca_crt)
    key, crt = (os.path.join(d, "serving-kube-apiserver" + ext) for ext in (".key", ".crt"))
    ext = os.path.join(d, "serving.ext")
    with open(ext, "w") as f:
        f.write("subjectAltName=DNS:kubernetes,DNS:kubernetes.default,DNS:localhost,"
                "IP:127.0.0.1,IP:::1,IP:10.43.0.1\nextendedKeyUsage=serverAuth\n")
    run([openssl, "req"] + EC_KEY + ["-nodes", "-subj", "/O=k3s/CN=kube-apiserver",
                                     "-keyout", key + ".new", "-out", crt + ".csr"])
    run([openssl, "x509", "-req", "-in", crt + ".csr", "-CA", ca_crt, "-CAkey", ca_key,
         "-CAcreateserial", "-days", str(days), "-extfile", ext, "-out", crt + ".new"])
    os.rename(key + ".new", key)
    os.rename(crt + ".new", crt)
    return {"ca": ca_crt, "cert": crt, "key": key}


def served_certificate(port, ca):
    """The DER certificate the server presents to a new connection trusting ca."""
    context = ssl.create_default_context(cafile=ca)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with context.wrap_socket(sock, server_hostname="127.0.0.1") as tls_sock:
            return tls_sock.getpeercert(binary_form=True)


def test_k3s_certificates_waited_for_then_rotated(fixture, containerd, tmp_path):
    tls_dir = tmp_path / "var/lib/rancher/k3s/server/tls"
    cert, key = (str(tls_dir / ("serving-kube-apiserver" + ext)) for ext in (".crt", ".key"))
    port, metrics_port = free_port(), free_port()
    log_path = tmp_path / "registry.log"
    with open(str(log_path), "w") as log_file:
        process = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "embedded_registry.py"), "--root", fixture.root,
             "--listen", "127.0.0.1:%d" % port, "--cert", cert, "--key", key,
             "--wait-for-cert", "60", "--metrics-listen", str(metrics_port)], stderr=log_file)
    try:
        deadline = time.monotonic() + 15
        while "waiting up to 60s for the certificate" not in log_path.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        time.sleep(1)
        assert process.poll() is None and "serving https" not in log_path.read_text()
        first = k3s_serving_certificate(tls_dir, days=30)  # k3s has started
        while "serving https://127.0.0.1:%d/v2/" % port not in log_path.read_text():
            assert process.poll() is None and time.monotonic() < deadline + 15, \
                log_path.read_text()
            time.sleep(0.1)
        assert log_path.read_text().count("waiting up to") == 1
        write_hosts_toml(containerd.hosts_dir, MIRROR, ["https://127.0.0.1:%d" % port],
                         first["ca"])
        images = list(fixture.images)
        containerd("images", "pull", "--hosts-dir", containerd.hosts_dir, "--snapshotter",
                   "native", "%s/%s" % (MIRROR, images[0]))
        metrics_url = "http://127.0.0.1:%d/metrics" % metrics_port

        def expiry():
            text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
            return float(re.search(r"^embedded_registry_tls_certificate_expiry_timestamp_seconds"
                                   r" (\S+)$", text, re.M).group(1))

        first_expiry = openssl_not_after(cert)
        assert expiry() == first_expiry
        old = served_certificate(port, first["ca"])
        # k3s renews the certificate: same CA, new key, new expiry.
        k3s_serving_certificate(tls_dir, days=300)
        deadline = time.monotonic() + 15
        while served_certificate(port, first["ca"]) == old:
            assert time.monotonic() < deadline, "the new certificate was not taken"
            time.sleep(0.3)
        assert expiry() == openssl_not_after(cert) > first_expiry
        containerd("images", "pull", "--hosts-dir", containerd.hosts_dir, "--snapshotter",
                   "native", "%s/%s" % (MIRROR, images[1]))
        assert "loaded TLS certificate" in log_path.read_text()
        assert "tls_reloads_total{result=\"success\"} 1" in urllib.request.urlopen(
            metrics_url, timeout=10).read().decode()
    finally:
        process.terminate()
        process.wait(15)


def scrape(port):
    """{(name, labels text): value} of one scrape of the metrics port."""
    text = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=10).read()
    samples = {}
    for line in text.decode().splitlines():
        match = re.fullmatch(r"([a-z_]+)(?:\{(.*)\})? (\S+)", line)
        if match:
            samples[match.group(1), match.group(2) or ""] = float(match.group(3))
    return samples


def test_certificate_expiry_is_read_as_openssl_reads_it(tmp_path):
    openssl = need("openssl")
    for algorithm, days in (("rsa:2048", 2), ("ec", 40000)):  # past 2049: GeneralizedTime
        key, crt = str(tmp_path / "k.pem"), str(tmp_path / "c.pem")
        extra = ["-pkeyopt", "ec_paramgen_curve:P-256"] if algorithm == "ec" else []
        run([openssl, "req", "-x509", "-newkey", algorithm] + extra + [
            "-nodes", "-days", str(days), "-subj", "/CN=x", "-keyout", key, "-out", crt])
        pem = open(crt, "rb").read()
        assert er.certificate_not_after(b"junk\n" + pem) == openssl_not_after(crt)
    for junk in (b"", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----",
                 b"-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----",
                 pem[:len(pem) // 2].rsplit(b"\n", 1)[0] + b"\n-----END CERTIFICATE-----"):
        with pytest.raises(ValueError):
            er.certificate_not_after(junk)


def test_metrics_port_refuses_what_is_not_a_scrape(fixture, tls):
    metrics_port = free_port()
    with server_process("--root", fixture.root, "--cert", tls["cert"], "--key", tls["key"],
                        "--metrics-listen", "127.0.0.1:%d" % metrics_port,
                        "--handshake-timeout", "0.5", "--header-timeout", "0.5",
                        "--idle-timeout", "0.5", drain=True) as (process, url):
        port = int(url.rsplit(":", 1)[1])
        for path, status in (("/", 404), ("/metrics/../etc/passwd", 404), ("/metricsx", 404)):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen("http://127.0.0.1:%d%s" % (metrics_port, path), timeout=10)
            assert refused.value.code == status
        for raw in (b"POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
                    b"GET /metrics HTTP/1.1\r\n" + b"X: " + b"y" * 70000 + b"\r\n\r\n",
                    b"\x16\x03\x01garbage\r\n\r\n", b"GET /metrics HTTP/1.1\r\n"):  # never ends
            with socket.create_connection(("127.0.0.1", metrics_port), timeout=15) as sock:
                sock.sendall(raw)
                assert not sock.recv(100).startswith(b"HTTP/1.1 200"), raw[:30]
        # What the registry port sees counts: a handshake that is not TLS, one that never
        # comes, a request never finished, an idle keep-alive connection.
        for send in (b"GET / HTTP/1.1\r\n\r\n", b""):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(send)
                with contextlib.suppress(ConnectionResetError):
                    sock.recv(100)
        context = ssl.create_default_context(cafile=tls["ca"])
        for send in (b"GET /v2/ HTTP/1.1\r\nHost: x\r\n", b"GET /v2/ HTTP/1.1\r\n\r\n"):
            with context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                                     server_hostname="127.0.0.1") as sock:
                sock.sendall(send)
                while sock.recv(4096):
                    pass
        samples, deadline = scrape(metrics_port), time.monotonic() + 10
        while samples["embedded_registry_connections_open", ""] and time.monotonic() < deadline:
            time.sleep(0.05)  # a connection's thread counts it closed just after the close
            samples = scrape(metrics_port)
        assert samples["embedded_registry_tls_handshake_failures_total",
                       'reason="protocol"'] == 1
        assert samples["embedded_registry_tls_handshake_failures_total", 'reason="timeout"'] == 1
        assert samples["embedded_registry_timeouts_total", 'kind="handshake"'] == 1
        assert samples["embedded_registry_timeouts_total", 'kind="header"'] == 1
        assert samples["embedded_registry_timeouts_total", 'kind="idle"'] == 1
        assert samples["embedded_registry_connections_open", ""] == 0
        assert samples["embedded_registry_connections_total", ""] == 4
        assert process.poll() is None


def test_metrics_flags_are_checked(fixture, tmp_path):
    for flags, message in ((["--metrics-listen", "nowhere"], "--metrics-listen 'nowhere'"),
                           (["--metrics-listen", "70000"], "--metrics-listen '70000'"),
                           (["--wait-for-cert", "5"], "--wait-for-cert needs --cert"),
                           (["--pin-workers", "sometimes"], "--pin-workers: invalid choice"),
                           (["--cert", "a", "--key", "b", "--wait-for-cert", "nan"],
                            "--wait-for-cert must be")):
        result = subprocess.run([sys.executable, os.path.join(HERE, "embedded_registry.py"),
                                 "--root", fixture.root] + flags, stderr=subprocess.PIPE,
                                universal_newlines=True, timeout=30)
        assert result.returncode == 2 and message in result.stderr, (flags, result.stderr)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = subprocess.run([sys.executable, os.path.join(HERE, "embedded_registry.py"),
                                 "--root", fixture.root, "--listen", "127.0.0.1:0",
                                 "--metrics-listen", str(taken.getsockname()[1])],
                                stderr=subprocess.PIPE, universal_newlines=True, timeout=30)
    assert result.returncode == 2 and "cannot listen on --metrics-listen" in result.stderr


def test_a_replaced_worker_s_counts_are_kept(fixture):
    metrics_port = free_port()
    with server_process("--root", fixture.root, "--workers", "2", "--metrics-listen",
                        str(metrics_port), drain=True) as (process, url):
        for _ in range(20):
            assert https_or_http_status(url, "/v2/library/multi/manifests/v1", None) == 200
        key = ("embedded_registry_http_requests_total",
               'route="manifest",method="GET",code="200"')
        assert scrape(metrics_port)[key] == 20
        workers = child_pids(process.pid, 2)
        os.kill(workers[0], signal.SIGKILL)
        deadline = time.monotonic() + 15
        while workers[0] in child_pids(process.pid):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        child_pids(process.pid, 2)
        for _ in range(5):
            assert https_or_http_status(url, "/v2/library/multi/manifests/v1", None) == 200
        samples = scrape(metrics_port)
        assert samples[key] == 25  # nothing the dead worker counted is lost
        assert samples["embedded_registry_connections_open", ""] >= 0
        assert samples["process_resident_memory_bytes", ""] > 3 * 10 ** 6


def test_odd_tags_beside_an_image_are_told_apart(upstream, fixture, crane_double, tmp_path):
    """A fallback tag holding a manifest, a cosign tag naming another subject, and cosign
    tags that point at the image itself: nothing is miscounted, the tree stays sound."""
    skopeo = need("skopeo")
    run([skopeo, "copy", "--preserve-digests", "--src-tls-verify=false",
         "--dest-tls-verify=false", "docker://%s/a/b/c/d:1.0" % upstream.host,
         "docker://%s/odd/app:1" % upstream.host])
    body = upstream.raw("odd/app:1", skopeo)
    image = {"mediaType": json.loads(body)["mediaType"], "digest": sha256(body),
             "size": len(body)}
    push = Pusher(upstream.host)
    tag = "sha256-" + image["digest"][7:]
    empty = push.blob("odd/app", EMPTY_CONFIG, OCI_EMPTY)
    layer = push.blob("odd/app", b"odd", "application/octet-stream")
    other = {"mediaType": er.OCI_MANIFEST, "digest": "sha256:" + "ab" * 32, "size": 1}
    push.manifest("odd/app", {"schemaVersion": 2, "mediaType": er.OCI_MANIFEST,
                              "config": empty, "layers": [layer], "subject": other}, tag + ".sig")
    for suffix in (".att", ".sbom"):
        urllib.request.urlopen(urllib.request.Request(
            "%s/v2/odd/app/manifests/%s%s" % (push.base, tag, suffix), method="PUT",
            data=body, headers={"Content-Type": image["mediaType"]}))
    # A fallback tag that holds a manifest with a "manifests" member of the wrong shape.
    odd = json.dumps({"schemaVersion": 2, "mediaType": er.OCI_MANIFEST, "config": empty,
                      "layers": [layer], "manifests": ["x"]}).encode()
    proxy = ReferrersUpstream(upstream.host, {}, answer=(404, b"{}"), token="t",
                              served={"/v2/odd/app/manifests/" + tag: odd})
    extra = tmp_path / "extra.txt"
    extra.write_text("%s/odd/app:1\n%s/library/multi:v1\n" % (proxy.host, upstream.host))
    root = tmp_path / "registry"
    auth = tmp_path / "config.json"
    auth.write_text("[" * 100000)  # the tool's auth file, nested past any parser's depth
    try:
        result = downloader(["-d", str(root), "-s", "-f", str(extra), "--insecure", "--tool",
                             "crane"], path_prefix=crane_double,
                            env_extra={"DOCKER_CONFIG": str(tmp_path)})
    finally:
        proxy.stop()
    assert result.returncode == 0, result.stderr
    assert "the fallback tag %s holds a manifest, not an index of referrers; left out" % tag \
        in result.stderr
    assert "the tag %s.sig names another subject, %s; left out" % (tag, other["digest"]) \
        in result.stderr
    assert "with them" not in result.stdout  # the image is no referrer of itself
    manifests = root / "odd" / "app" / "manifests"
    assert os.readlink(str(manifests / (tag + ".sbom"))) == image["digest"]
    assert not (manifests / (tag + ".sig")).exists() and not (manifests / tag).exists()
    assert check(root, "--deep").returncode == 0


def test_a_trickling_answer_is_cut_at_the_deadline():
    class Trickle(io.RawIOBase):  # a response that yields a byte a read, forever
        def read(self, size=-1):
            time.sleep(0.01)
            return b"x"
    started = time.monotonic()
    with pytest.raises(socket.timeout):
        dsi.read_until(Trickle(), 10 ** 6, time.monotonic() + 0.2)
    assert time.monotonic() - started < 1
    assert dsi.read_until(io.BytesIO(b"abc"), 2, time.monotonic() + 1) == b"ab"


def test_what_a_line_calls_an_index_of_artifacts():
    child = {"mediaType": er.OCI_MANIFEST, "digest": "sha256:" + "1" * 64, "size": 1}
    assert dsi.describe({"mediaType": er.OCI_INDEX, "manifests": [child]}, 1) == "artifact"
    child["platform"] = {"os": "linux", "architecture": "amd64"}
    assert dsi.describe({"mediaType": er.OCI_INDEX, "manifests": [child, child]}, 2) == \
        "2 platforms"


# --- Prepared answers: the fast path keeps every behaviour of the slow one ----------------

def head_and_body(answer):
    head, _, body = answer.partition(b"\r\n\r\n")
    return re.sub(rb"\r\nDate: [^\r]*", b"", head), body


def test_a_prepared_answer_is_the_slow_path_s_answer(tmp_path):
    builder = TreeBuilder(tmp_path)
    _, index, _ = builder.index("rancher/app", "1", ["amd64", "arm64"])
    request = b"%s /v2/rancher/app/manifests/1%s HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n"
    with serving(tmp_path) as server:
        for method in (b"GET", b"HEAD"):
            for query in (b"", b"?ns=docker.io"):
                first = raw_exchange(server, request % (method, query) + b"")
                assert (method.decode(), "/v2/rancher/app/manifests/1" + query.decode()) in \
                    server.answers._answers  # prepared by the first answer
                second = raw_exchange(server, request % (method, query))
                assert head_and_body(first) == head_and_body(second)
                assert first.startswith(b"HTTP/1.1 200 OK\r\n")
                assert (b"Docker-Content-Digest: " + index.encode()) in second
                assert (head_and_body(second)[1] == b"") == (method == b"HEAD")


def test_a_prepared_answer_sees_every_change_at_once(tmp_path):
    builder = TreeBuilder(tmp_path)
    _, first = builder.image("app", "amd64", tag="1")
    _, second = builder.image("app", "amd64", extra=b"2")
    tag = tmp_path / "app" / "manifests" / "1"
    get = b"GET /v2/app/manifests/1%s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"

    def digest_served(query=b""):
        answer = raw_exchange(server, get % query)
        match = re.search(rb"Docker-Content-Digest: (\S+)", answer)
        return match.group(1).decode() if match else answer.split(b" ", 2)[1].decode()

    with serving(tmp_path) as server:
        assert digest_served() == digest_served() == first
        os.remove(str(tag))
        os.symlink(second, str(tag))  # the tag re-pointed
        assert digest_served() == second
        body = (tmp_path / "app" / "manifests" / second).read_bytes()
        os.remove(str(tag))
        tag.write_bytes(body)  # the tag a file
        assert digest_served() == second
        os.remove(str(tag))  # the tag gone
        assert digest_served() == "404"
        os.symlink(first, str(tag))
        assert digest_served(b"?ns=docker.io") == digest_served(b"?ns=docker.io") == first
        # The same name appears under the namespace, which is looked at first.
        os.makedirs(str(tmp_path / "docker.io" / "app" / "manifests"))
        os.symlink("../../blobs", str(tmp_path / "docker.io" / "blobs"))
        os.symlink("../blobs", str(tmp_path / "docker.io" / "app" / "blobs"))
        shutil.copy(str(tmp_path / "app" / "manifests" / second),
                    str(tmp_path / "docker.io" / "app" / "manifests" / "1"))
        assert digest_served(b"?ns=docker.io") == second
        # A manifest damaged in place: refused on the next request, never served again.
        damaged = tmp_path / "app" / "manifests" / first
        assert digest_served() == first
        flip_a_bit(damaged)
        assert digest_served() == "404"


def test_an_answer_that_ends_its_connection_says_so(tmp_path):
    """A client that asks to close, or speaks HTTP/1.0, is told Connection: close in the
    answer (RFC 9112), on the prepared path as on the slow one; keep-alive answers are not."""
    TreeBuilder(tmp_path).image("app", "amd64", tag="1")
    closing = b"%s %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with serving(tmp_path) as server:
        for method in (b"GET", b"HEAD"):
            slow = raw_exchange(server, closing % (method, b"/v2/app/manifests/1"))
            prepared = raw_exchange(server, closing % (method, b"/v2/app/manifests/1"))
            assert head_and_body(slow) == head_and_body(prepared)
            assert slow.startswith(b"HTTP/1.1 200 OK\r\n")
        for request in (closing % (b"GET", b"/v2/app/manifests/1"),
                        closing % (b"GET", b"/v2/"), closing % (b"GET", b"/v2/app/manifests/2"),
                        closing % (b"GET", b"/v2/app/blobs/sha256:" + b"0" * 64),
                        closing % (b"PUT", b"/v2/app/manifests/1"),
                        b"GET /v2/app/manifests/1 HTTP/1.0\r\n\r\n"):
            head = raw_exchange(server, request).partition(b"\r\n\r\n")[0]
            assert head.count(b"\r\nConnection: close") == 1, (request, head)
            assert b"\r\nServer: embedded-registry/%s\r\n" % er.__version__.encode() in head
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
        for _ in range(3):  # the slow answer, then prepared ones, on one connection
            status, headers, _ = fetch(conn, "GET", "/v2/app/manifests/1")
            assert status == 200 and headers.get("Connection") is None
        conn.close()


def test_connection_threads_are_kept_for_the_next_connection():
    threads = er.ConnectionThreads(None, keep=3, linger=0.3)
    served, done = [], threading.Semaphore(0)

    def serve(job):
        served.append((job, threading.get_ident()))
        done.release()

    threads.serve = serve
    before = threading.active_count()
    for job in range(20):
        threads.run(job)
        assert done.acquire(timeout=10)
        deadline = time.monotonic() + 10
        while threads._free < 1:  # the thread is back, waiting
            assert time.monotonic() < deadline
            time.sleep(0.001)
    assert [job for job, _ in served] == list(range(20))
    assert len({ident for _, ident in served}) == 1  # one thread served them all
    # Jobs at once each get a thread: none waits for another to end.
    gate = threading.Barrier(9, timeout=10)
    threads.serve = lambda job: gate.wait()
    for job in range(8):
        threads.run(job)
    gate.wait()  # would time out (BrokenBarrierError) if a job were queued behind another
    deadline = time.monotonic() + 10
    while threading.active_count() > before + 3:  # beyond keep, threads end at once
        assert time.monotonic() < deadline
        time.sleep(0.01)
    while threading.active_count() > before:  # and the kept ones after lingering
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert threads._free == 0


@pytest.mark.parametrize("workers, allowed, policy, cpus", [
    (2, {0, 1}, "auto", [0, 1]),
    (2, {3, 1, 7}, "auto", [1, 3]),
    (1, {0, 1}, "auto", None),  # a lone worker keeps every core for its TLS and hashing
    (3, {0, 1}, "auto", None),  # more workers than CPUs: the kernel balances them
    (2, {0, 1}, "never", None),
    (1, {0, 1}, "always", [0]),
    (3, {4, 5}, "always", [4, 5, 4]),
    (2, set(), "always", None),
])
def test_which_cpu_each_worker_is_kept_on(workers, allowed, policy, cpus):
    assert er.worker_cpus(workers, allowed, policy) == cpus


def sockets_of(pid):
    count = 0
    for fd in os.listdir("/proc/%d/fd" % pid):
        with contextlib.suppress(OSError):
            count += os.readlink("/proc/%d/fd/%s" % (pid, fd)).startswith("socket:")
    return count


def test_workers_share_new_connections_evenly(fixture):
    """Each worker accepts on a listening socket of its own (SO_REUSEPORT), so a burst of
    connections is spread over them, where on one shared socket one could take all."""
    with server_process("--root", fixture.root, "--workers", "2") as (process, url):
        workers = child_pids(process.pid, 2)
        before = [sockets_of(pid) for pid in workers]
        port = int(url.rsplit(":", 1)[1])
        connections = [http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                       for _ in range(32)]
        for conn in connections:
            assert fetch(conn, "GET", "/v2/library/multi/manifests/v1")[0] == 200
        taken = [sockets_of(pid) - count for pid, count in zip(workers, before)]
        assert sum(taken) == 32 and min(taken) >= 4, taken  # 1 in 400,000 to fail by chance
        for conn in connections:
            conn.close()


def test_a_taken_port_is_refused_with_workers(fixture):
    """SO_REUSEPORT must not let a second server share the port of another, or of any
    program listening there."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        taken = other.getsockname()[1]
        with server_process("--root", fixture.root, "--workers", "2") as (process, url):
            ours = int(url.rsplit(":", 1)[1])
            for port in (taken, ours):
                result = subprocess.run(
                    [sys.executable, os.path.join(HERE, "embedded_registry.py"), "--root",
                     fixture.root, "--listen", "127.0.0.1:%d" % port, "--workers", "2"],
                    stderr=subprocess.PIPE, universal_newlines=True, timeout=30)
                assert result.returncode == 2, result.stderr
                assert "cannot listen on 127.0.0.1:%d" % port in result.stderr
            assert https_or_http_status(url, "/v2/library/multi/manifests/v1", None) == 200


def test_workers_are_kept_on_cpus_of_their_own(fixture):
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("needs 2 CPUs to keep 2 workers apart; this machine allows %s" % allowed)
    with server_process("--root", fixture.root, "--workers", "2") as (process, url):
        workers = child_pids(process.pid, 2)
        assert sorted(cpus_allowed(pid) for pid in workers) == [str(c) for c in allowed[:2]]
        assert cpus_allowed(process.pid) == cpus_allowed(os.getpid())  # not the supervisor
        lost = cpus_allowed(workers[0])
        os.kill(workers[0], signal.SIGKILL)
        deadline = time.monotonic() + 15
        while workers[0] in child_pids(process.pid):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        replacement = (set(child_pids(process.pid, 2)) - set(workers)).pop()
        assert cpus_allowed(replacement) == lost  # the dead worker's CPU, not a shared one
        assert https_or_http_status(url, "/v2/library/multi/manifests/v1", None) == 200
    for flags, pinned in ((["--workers", "2", "--pin-workers", "never"], False),
                          (["--pin-workers", "always"], True)):
        with server_process("--root", fixture.root, *flags) as (process, url):
            for pid in child_pids(process.pid, 2 if "--workers" in flags else 0) or [process.pid]:
                assert (cpus_allowed(pid) != cpus_allowed(os.getpid())) == pinned, flags
            assert https_or_http_status(url, "/v2/library/multi/manifests/v1", None) == 200
    # Fewer CPUs allowed than workers: auto leaves them to the kernel, and says nothing.
    taskset = need("taskset")
    argv = [taskset, "-c", str(allowed[0]), sys.executable,
            os.path.join(HERE, "embedded_registry.py"), "--root", fixture.root,
            "--listen", "127.0.0.1:0", "--workers", "2"]
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, universal_newlines=True)
    try:
        line = process.stderr.readline()
        assert "with 2 workers" in line and "CPU" not in line, line
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
        process.stderr.close()


@pytest.mark.parametrize("unusual", [
    b"GET /v2/app/manifests/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    b"GET /v2/app/manifests/1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET /v2/app/manifests/1 HTTP/1.1\r\nHost: x\r\nContent-Length : 0\r\n\r\n",
    b"GET /v2/app/manifests/1 HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
    b"GET /v2/app/manifests/1 HTTP/1.0\r\n\r\n",
    b"GET /v2/app/manifests/1\r\n\r\n",
    b"get /v2/app/manifests/1 HTTP/1.1\r\n\r\n",
    b"GET /v2/app/manifests/1 HTTP/1.1\r\nX: \xff\r\n\r\n",
])
def test_unusual_requests_take_the_base_class_s_way(unusual, tmp_path):
    TreeBuilder(tmp_path).image("app", "amd64", tag="1")
    with serving(tmp_path) as server:
        plain = b"GET /v2/app/manifests/1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        assert raw_exchange(server, plain).startswith(b"HTTP/1.1 200")
        assert raw_exchange(server, plain).startswith(b"HTTP/1.1 200")  # prepared
        slow = raw_exchange(server, unusual)
        server.answers._answers.clear()
        assert raw_exchange(server, unusual).split(b"\r\n")[0] == slow.split(b"\r\n")[0]


def test_access_lines_are_those_logging_writes(tmp_path):
    """The access log written straight to the file descriptor matches, line for line, what
    logging writes with main()'s formats, in text and in JSON."""
    TreeBuilder(tmp_path).image("app", "amd64", tag="1")
    for json_lines in (False, True):
        read_end, write_end = os.pipe()
        with os.fdopen(write_end, "w") as stream:
            handler = logging.StreamHandler(stream)
            handler.setFormatter(er.JsonLogFormatter() if json_lines else logging.Formatter(
                "%(asctime)s %(levelname)s %(message)s"))
            er.log.addHandler(handler)
            er.log.setLevel(logging.INFO)
            try:
                with serving(tmp_path) as server:
                    for direct in (False, True):
                        server.access_log = er.AccessLog(stream, json_lines) if direct else None
                        raw_exchange(server, b"GET /v2/app/manifests/1?ns=a.io HTTP/1.1\r\n"
                                             b"Connection: close\r\n\r\n")
            finally:
                er.log.removeHandler(handler)
                er.log.setLevel(logging.NOTSET)
        with os.fdopen(read_end) as lines:
            logged, direct = [line for line in lines if "manifests/1" in line]
        if json_lines:
            logged, direct = json.loads(logged), json.loads(direct)
            for entry in (logged, direct):
                entry["time"], entry["seconds"] = "T", 0
            assert logged == direct and direct["ns"] == "a.io"
        else:
            pattern = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO 127.0.0.1 GET " \
                      r"/v2/app/manifests/1\?ns=a\.io 200 \d+ \d\.\d{3}s\n"
            assert re.fullmatch(pattern, logged) and re.fullmatch(pattern, direct)


def test_access_lines_keep_their_order_with_other_lines():
    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "w") as stream:
        access_log = er.AccessLog(stream)
        handler = logging.StreamHandler(stream)
        handler.addFilter(access_log)
        logger = logging.getLogger("order-test")
        logger.addHandler(handler)
        logger.propagate = False
        access_log.write("first request", None)
        access_log.write("second request", None)
        logger.error("a blob is corrupt")  # after the requests that came before it
        access_log.write("third request", None)
        access_log.flush()
        logger.removeHandler(handler)
    with os.fdopen(read_end) as lines:
        text = lines.read()
    assert re.findall(r"^.*(first request|second request|a blob is corrupt|third request)$",
                      text, re.M) == ["first request", "second request", "a blob is corrupt",
                                      "third request"]
