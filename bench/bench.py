#!/usr/bin/env python3
"""bench: embedded_registry.py against CNCF distribution and nginx, in one run.

Usage (from the repository root; see README.md, "Benchmark"):

    make bench                     # or: python3 bench/bench.py [--keep DIR] [--seconds 10]

Every server gets the same content, over TLS, on a free loopback port, and is started
and stopped here. Needs: docker-registry (CNCF distribution), nginx, wrk, curl, openssl,
containerd and ctr. Nothing is installed by this script.

The servers run side by side and each measurement is taken from them in turns, so
the machine's drift falls on all of them alike. Printed: one row per measurement, with
each server's figure and our ratio to distribution and to nginx (higher is better for
rates, lower for times and memory), and whether our figure meets its target.
"""

import argparse
import gzip
import hashlib
import http.client
import io
import json
import os
import platform
import queue
import re
import shutil
import socket
import ssl
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER = os.path.join(os.path.dirname(HERE), "embedded_registry.py")

BIG_BLOB = 256 * 1024 * 1024
IMAGES = 10
BASE_LAYER = 30 * 1000 * 1000  # shared by every image, as k3s images share base layers
OWN_LAYER = 22 * 1000 * 1000  # per image: ~250 MB in all
MANY_MANIFESTS = 5000
STREAMS = 8
LEAK_REQUESTS = 10000
PULLS = 5
FLOOR_THREADS = 64  # more than the 16 connections of a wrk run
METRICS_ROUNDS = 10  # wrk runs of each server, with and without --metrics-listen
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
ACCEPT = ", ".join(["application/vnd.docker.distribution.manifest.v2+json",
                    "application/vnd.docker.distribution.manifest.list.v2+json",
                    OCI_MANIFEST, "application/vnd.oci.image.index.v1+json", "*/*"])
MIRROR = "bootstrap-registry.airgap"
TOOLS = ["docker-registry", "nginx", "wrk", "httperf", "curl", "openssl", "containerd", "ctr"]


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def run(argv, **kwargs):
    return subprocess.run(argv, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, **kwargs)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- Content: one tree for us and nginx, the same blobs in distribution's layout ------

class Content:
    """A registry tree (as download_system_images.py writes it) with the bench images."""

    def __init__(self, root):
        self.root = root
        self.blobs = {}  # digest -> path
        self.repos = {}  # repo -> [(tag, manifest digest, [blob digests])]
        os.makedirs(os.path.join(root, "blobs"))

    def blob(self, data, media_type):
        digest = sha256(data)
        path = os.path.join(self.root, "blobs", digest)
        with open(path, "wb") as f:
            f.write(data)
        self.blobs[digest] = path
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def image(self, repo, tag, layers, diff_ids):
        config = json.dumps({"architecture": "amd64", "os": "linux",
                             "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
        descriptors = [self.blob(config, "application/vnd.oci.image.config.v1+json")]
        descriptors += layers
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": descriptors[0], "layers": descriptors[1:]}).encode()
        digest = sha256(body)
        manifests = os.path.join(self.root, repo, "manifests")
        os.makedirs(manifests, exist_ok=True)
        with open(os.path.join(manifests, digest), "wb") as f:
            f.write(body)
        os.symlink(digest, os.path.join(manifests, tag))
        parts = repo.split("/")
        for depth in range(len(parts), 0, -1):
            link = os.path.join(self.root, *parts[:depth], "blobs")
            if not os.path.lexists(link):
                os.symlink("../blobs", link)
        self.repos.setdefault(repo, []).append(
            (tag, digest, body, [d["digest"] for d in descriptors]))
        return digest


def random_layer(size):
    """A gzip (stored, level 0) tar holding one random file: (descriptor data, diff_id)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("data/%s" % os.urandom(4).hex())
        info.size = size
        tar.addfile(info, io.BytesIO(os.urandom(size)))
    return gzip.compress(raw.getvalue(), compresslevel=0, mtime=0), sha256(raw.getvalue())


def make_content(directory):
    content = Content(os.path.join(directory, "registry"))
    layer_type = "application/vnd.oci.image.layer.v1.tar+gzip"
    base, base_diff = random_layer(BASE_LAYER)
    base_descriptor = content.blob(base, layer_type)
    for number in range(IMAGES):
        own, own_diff = random_layer(OWN_LAYER)
        content.image("rancher/bench-%d" % number, "1",
                      [base_descriptor, content.blob(own, layer_type)], [base_diff, own_diff])
    big = content.blob(os.urandom(BIG_BLOB), layer_type)
    content.image("bench/big", "1", [big], [big["digest"]])
    content.big = big["digest"]
    return content


def make_many_manifests(directory, count):
    """A tree of count tiny manifests in count/10 repositories: start-up must not scan it."""
    root = os.path.join(directory, "many")
    for number in range(count):
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "n": number,
                           "config": {}, "layers": []}).encode()
        manifests = os.path.join(root, "repo%d" % (number // 10), "manifests")
        os.makedirs(manifests, exist_ok=True)
        with open(os.path.join(manifests, sha256(body)), "wb") as f:
            f.write(body)
    return root


def distribution_storage(content, directory):
    """The same blobs and manifests in distribution's filesystem layout (hard links)."""
    base = os.path.join(directory, "distribution", "docker", "registry", "v2")

    def write(path, text):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)

    def store(digest, source=None, data=None):
        path = os.path.join(base, "blobs", "sha256", digest[7:9], digest[7:], "data")
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path))
            if source:
                os.link(source, path)
            else:
                write(path, data.decode())

    for digest, path in content.blobs.items():
        store(digest, source=path)
    for repo, images in content.repos.items():
        repo_dir = os.path.join(base, "repositories", repo)
        for tag, digest, body, blobs in images:
            store(digest, data=body)
            hexdigest = digest[7:]
            write(os.path.join(repo_dir, "_manifests/revisions/sha256", hexdigest, "link"), digest)
            write(os.path.join(repo_dir, "_manifests/tags", tag, "current/link"), digest)
            write(os.path.join(repo_dir, "_manifests/tags", tag, "index/sha256", hexdigest,
                               "link"), digest)
            for blob in blobs:
                write(os.path.join(repo_dir, "_layers/sha256", blob[7:], "link"), blob)
    return os.path.join(directory, "distribution")


KEY_KINDS = {"ecdsa": ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
             "rsa": ["-newkey", "rsa:2048"]}


def make_certificates(directory, kind="ecdsa"):
    """A CA and a server certificate for 127.0.0.1: ECDSA P-256 as k3s issues them, or
    RSA-2048 for comparison."""
    directory = os.path.join(directory, "certs-" + kind)
    os.makedirs(directory, exist_ok=True)
    paths = {k: os.path.join(directory, k) for k in ("ca.key", "ca.crt", "server.key",
                                                    "server.csr", "server.crt", "san.ext")}
    run(["openssl", "req", "-x509"] + KEY_KINDS[kind] + ["-nodes", "-days", "2", "-subj",
         "/CN=bench CA", "-keyout", paths["ca.key"], "-out", paths["ca.crt"]])
    run(["openssl", "req"] + KEY_KINDS[kind] + ["-nodes", "-subj", "/CN=bench",
         "-keyout", paths["server.key"], "-out", paths["server.csr"]])
    with open(paths["san.ext"], "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run(["openssl", "x509", "-req", "-in", paths["server.csr"], "-CA", paths["ca.crt"],
         "-CAkey", paths["ca.key"], "-CAcreateserial", "-days", "2", "-extfile",
         paths["san.ext"], "-out", paths["server.crt"]])
    return paths


# --- The servers under test --------------------------------------------------------------

class Server:
    """One server process on a free loopback port; figures are collected into .results."""

    def __init__(self, name, directory, certs):
        self.name = name
        self.directory = directory
        self.certs = certs
        self.port = free_port()
        self.url = "%s://127.0.0.1:%d" % ("https" if certs else "http", self.port)
        self.process = None
        self.results = {}

    def argv(self):
        raise NotImplementedError

    def pids(self):
        """The server's process and its children (nginx and --workers fork workers)."""
        children = subprocess.run(["pgrep", "-P", str(self.process.pid)],
                                  stdout=subprocess.PIPE, universal_newlines=True).stdout
        return [self.process.pid] + [int(pid) for pid in children.split()]

    def start(self):
        started = time.monotonic()
        log = open(os.path.join(self.directory, self.name + ".log"), "a")
        self.process = subprocess.Popen(self.argv(), stdout=log, stderr=log)
        log.close()
        wait_for_base(self.url, self.certs and self.certs["ca.crt"], self.process)
        return time.monotonic() - started

    def stop(self):
        self.process.terminate()
        self.process.wait(30)

    def cpu_seconds(self):
        """User and system CPU time of the server's processes together."""
        ticks = 0
        for pid in self.pids():
            with open("/proc/%d/stat" % pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")

    def unique_memory(self):
        """MiB of memory the server's processes hold, a page shared between them (as a
        forked worker shares its parent's) counted once: the sum of their Pss."""
        total = 0
        for pid in self.pids():
            with open("/proc/%d/smaps_rollup" % pid) as f:
                total += int(re.search(r"^Pss:\s+(\d+) kB", f.read(), re.M).group(1))
        return total / 1024.0

    def memory(self, field):
        """VmHWM (peak) or VmRSS in MiB of each of the server's processes."""
        sizes = []
        for pid in self.pids():
            with open("/proc/%d/status" % pid) as f:
                sizes.append(int(re.search(r"^%s:\s+(\d+) kB" % field, f.read(),
                                           re.M).group(1)) / 1024.0)
        return sizes


class Ours(Server):
    def __init__(self, directory, certs, root, workers=1, flags=()):
        super().__init__("embedded-registry", directory, certs)
        self.root = root
        self.workers = workers
        self.flags = list(flags)

    def argv(self):
        tls = ["--cert", self.certs["server.crt"], "--key", self.certs["server.key"]] if \
            self.certs else []
        return [sys.executable, SERVER, "--root", self.root, "--listen",
                "127.0.0.1:%d" % self.port, "--workers", str(self.workers)] + tls + self.flags


class Distribution(Server):
    def __init__(self, directory, certs, storage):
        super().__init__("distribution", directory, certs)
        self.config = os.path.join(directory, "distribution.yml")
        with open(self.config, "w") as f:
            f.write("version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n"
                    "storage:\n  filesystem:\n    rootdirectory: %s\n  cache:\n"
                    "    blobdescriptor: inmemory\n  maintenance:\n    uploadpurging:\n"
                    "      enabled: false\n  redirect:\n    disable: true\n"
                    "http:\n  addr: 127.0.0.1:%d\n  tls:\n    certificate: %s\n    key: %s\n"
                    % (storage, self.port, certs["server.crt"], certs["server.key"]))

    def argv(self):
        return [shutil.which("docker-registry"), "serve", self.config]


class Nginx(Server):
    """The tree as static files: the ceiling for serving them, blobs and pulls alike.

    Manifests go out with the manifest media type (the bench's are all OCI image
    manifests), which is all containerd needs to pull. nginx cannot name a tag's
    digest, so containerd follows each HEAD of a tag with a GET of it.

    TLS 1.3 is named: nginx before 1.23.4 (Debian 12 has 1.22) offers only up to
    TLS 1.2 unless told, while the other servers and every client here speak 1.3.
    A resumed TLS 1.2 session skips the key exchange that a TLS 1.3 handshake
    always makes, so the handshake rows would compare different work.
    """

    def __init__(self, directory, certs, root, protocols="TLSv1.2 TLSv1.3"):
        super().__init__("nginx", directory, certs)
        self.config = os.path.join(directory, "nginx.conf")
        temp = os.path.join(directory, "nginx-temp")
        os.makedirs(temp, exist_ok=True)
        with open(self.config, "w") as f:
            f.write("""daemon off; user root; worker_processes auto;
pid %(d)s/nginx.pid; error_log %(d)s/nginx-error.log;
events { worker_connections 4096; }
http {
  access_log %(d)s/nginx-access.log; sendfile on; tcp_nopush on; tcp_nodelay on;
  keepalive_requests 1000000; default_type application/octet-stream;
  client_body_temp_path %(t)s; proxy_temp_path %(t)s; fastcgi_temp_path %(t)s;
  uwsgi_temp_path %(t)s; scgi_temp_path %(t)s;
  server {
    listen 127.0.0.1:%(port)d%(tls)s
    location = /v2/ { return 200 '{}'; }
    location /v2/ { alias %(root)s/; }
    location ~ ^/v2/(.+/manifests/[^/]+)$ {
      alias %(root)s/$1; types { } default_type %(manifest)s;
    }
  }
}
""" % {"d": directory, "t": temp, "port": self.port, "root": root, "manifest": OCI_MANIFEST,
       "tls": " ssl;\n    ssl_protocols %s;\n    ssl_certificate %s; "
              "ssl_certificate_key %s;" % (protocols, certs["server.crt"], certs["server.key"])
              if certs else ";"})

    def argv(self):
        return [shutil.which("nginx"), "-c", self.config, "-e", os.path.join(
            self.directory, "nginx-error.log")]


class Floor(Server):
    """The floor of this design in this interpreter: serve_floor() below. Its processes
    are kept on CPUs of their own as ours are (--pin-workers auto), unless pin says."""

    def __init__(self, directory, certs, manifest, workers, pin=None):
        super().__init__("floor", directory, certs)
        self.manifest = manifest
        self.workers = workers
        self.pin = workers >= 2 if pin is None else pin

    def argv(self):
        tls = [self.certs["server.crt"], self.certs["server.key"]] if self.certs else []
        return [sys.executable, __file__, "--serve-floor", str(self.port), str(self.workers),
                "pin" if self.pin else "free", self.manifest] + tls

    def stop(self):
        for pid in self.pids():
            os.kill(pid, signal.SIGKILL)
        self.process.wait(30)


def serve_floor(port, workers, pin, manifest, cert=None, key=None):
    """A thread for each connection that only receives a request and sends back one manifest's
    bytes, prepared once, over the same transport, in as many processes: no parsing, no
    lookup, no log. What CPython itself costs, which no handler can go below."""
    with open(manifest, "rb") as f:
        body = f.read()
    head = b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n" % (
        OCI_MANIFEST.encode(), len(body))
    answer, closing = head + b"\r\n" + body, head + b"Connection: close\r\n\r\n" + body
    context = None
    if cert:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", port))
    process = 0  # the parent; the children are 1 to workers - 1
    for number in range(1, workers):
        if os.fork() == 0:
            process = number
            break
    if pin:
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[process % len(cpus)]})

    def serve(conn):
        try:
            if context:
                conn = context.wrap_socket(conn, server_side=True)
            while True:
                request = conn.recv(65536)
                if not request:
                    break
                if b"Connection: close" in request:
                    conn.sendall(closing)
                    break
                conn.sendall(answer)
        except OSError:
            pass
        finally:
            conn.close()

    connections = queue.SimpleQueue()  # threads kept, as the server keeps them

    def serve_in_turn():
        while True:
            serve(connections.get())

    for _ in range(FLOOR_THREADS):
        threading.Thread(target=serve_in_turn, daemon=True).start()
    while True:
        connections.put(listener.accept()[0])


def wait_for_base(url, ca, process, timeout=30):
    """Poll GET /v2/ until it answers 200."""
    context = ssl.create_default_context(cafile=ca) if ca else None
    host, port = url.rsplit("/", 1)[-1].rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = http.client.HTTPSConnection(host, int(port), context=context, timeout=5) \
                if context else http.client.HTTPConnection(host, int(port), timeout=5)
            conn.request("GET", "/v2/")
            if conn.getresponse().status == 200:
                conn.close()
                return
        except OSError:
            pass
        if process.poll() is not None:
            raise SystemExit("bench: %s exited at start-up" % process.args[0])
        if time.monotonic() > deadline:
            raise SystemExit("bench: %s did not answer /v2/" % process.args[0])
        time.sleep(0.002)


# --- Measurements ----------------------------------------------------------------------------

def curl_speeds(url, ca, streams):
    """Bytes per second of each of several simultaneous curl downloads, and the wall time."""
    argv = ["curl", "-s", "-f", "--http1.1", "-o", "/dev/null", "--cacert", ca, "-w",
            "%{speed_download}", url]
    started = time.monotonic()
    processes = [subprocess.Popen(argv, stdout=subprocess.PIPE, universal_newlines=True)
                 for _ in range(streams)]
    outputs = [p.communicate()[0] for p in processes]
    wall = time.monotonic() - started
    if any(p.returncode for p in processes):
        raise SystemExit("bench: curl %s failed" % url)
    return [float(out) for out in outputs], wall


def wrk_rate(url, ca, seconds, close=False, connections=16):
    """Requests per second of wrk against url: 2 threads and 16 connections, or one
    thread for a single connection."""
    headers = ["-H", "Accept: " + ACCEPT] + (["-H", "Connection: close"] if close else [])
    result = run(["wrk", "-t%d" % min(2, connections), "-c%d" % connections,
                  "-d%ds" % seconds, "--latency"] + headers + [url])
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", result.stdout).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", result.stdout)
    if errors:
        raise SystemExit("bench: wrk %s got %s error answers" % (url, errors.group(1)))
    return rate


def httperf_rate(server, path, method, connections=16, calls=5000):
    """Requests per second of httperf: wrk cannot read the answer to a HEAD, httperf can.
    Each connection makes its calls one after another, keep-alive."""
    argv = ["httperf", "--server", "127.0.0.1", "--port", str(server.port), "--uri", path,
            "--method", method, "--num-conns", str(connections), "--num-calls", str(calls),
            "--rate", "0", "--add-header", "Accept: %s\r\n" % ACCEPT]
    result = run(argv + (["--ssl"] if server.certs else []))
    replies = re.search(r"Reply status: 1xx=\d+ 2xx=(\d+)", result.stdout)
    if not replies or int(replies.group(1)) != connections * calls:
        raise SystemExit("bench: httperf %s %s got error answers:\n%s" % (
            method, path, result.stdout[-400:]))
    return float(re.search(r"Request rate: ([\d.]+) req/s", result.stdout).group(1))


def keep_alive_requests(server, path, count, per_connection=100):
    context = ssl.create_default_context(cafile=server.certs["ca.crt"])
    for _ in range(count // per_connection):
        conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=context)
        for _ in range(per_connection):
            conn.request("GET", path, headers={"Accept": ACCEPT})
            response = conn.getresponse()
            response.read()
            assert response.status == 200, (server.name, path, response.status)
        conn.close()


class Containerd:
    """A private containerd with a fresh content store, configured like k3s through hosts.toml."""

    def __init__(self, directory):
        self.base = tempfile.mkdtemp(prefix="containerd-", dir=directory)
        self.socket = os.path.join(self.base, "containerd.sock")
        self.hosts = os.path.join(self.base, "hosts")
        config = os.path.join(self.base, "config.toml")
        with open(config, "w") as f:
            f.write('version = 2\nroot = "%s/root"\nstate = "%s/state"\n'
                    'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
                    '[grpc]\n  address = "%s"\n' % (self.base, self.base, self.socket))
        self.log = open(os.path.join(self.base, "containerd.log"), "w")
        self.process = subprocess.Popen([shutil.which("containerd"), "--config", config],
                                        stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while subprocess.run(["ctr", "--address", self.socket, "version"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise SystemExit("bench: containerd did not start; see %s" % self.log.name)
            time.sleep(0.1)

    def ctr(self, *args):
        return run(["ctr", "--address", self.socket, "--namespace", "bench"] + list(args))

    def mirror_to(self, url, ca):
        directory = os.path.join(self.hosts, MIRROR)
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "hosts.toml"), "w") as f:
            f.write('server = "%s"\n\n[host."%s"]\n  capabilities = ["pull", "resolve"]\n'
                    '  ca = "%s"\n' % (url, url, ca))

    def stop(self):
        self.process.terminate()
        self.process.wait(30)
        self.log.close()
        shutil.rmtree(self.base, ignore_errors=True)


def image_refs():
    return ["%s/rancher/bench-%d:1" % (MIRROR, n) for n in range(IMAGES)]


def cold_pull(server, directory):
    containerd = Containerd(directory)
    try:
        containerd.mirror_to(server.url, server.certs["ca.crt"])
        started = time.monotonic()
        for ref in image_refs():
            containerd.ctr("images", "pull", "--hosts-dir", containerd.hosts,
                           "--snapshotter", "native", ref)
        return time.monotonic() - started
    finally:
        containerd.stop()


def import_tarball(server, directory):
    """The status quo: `ctr images import` of the same images as one tarball (k3s's airgap
    tarball), into a fresh containerd. The tarball is made by containerd itself."""
    tarball = os.path.join(directory, "images.tar")
    source = Containerd(directory)
    try:
        source.mirror_to(server.url, server.certs["ca.crt"])
        for ref in image_refs():
            source.ctr("images", "pull", "--hosts-dir", source.hosts, "--snapshotter", "native",
                       ref)
        source.ctr("images", "export", tarball, *image_refs())
    finally:
        source.stop()
    target = Containerd(directory)
    try:
        started = time.monotonic()
        target.ctr("images", "import", "--snapshotter", "native", tarball)
        return time.monotonic() - started
    finally:
        target.stop()
        os.unlink(tarball)


def make_large_tree(directory, manifests=5000, blobs_each=4):
    """A tree of `manifests` tagged images of `blobs_each` small blobs each, in 100
    repositories: the size --check --json and --gc are measured on."""
    root = os.path.join(directory, "large")
    os.makedirs(os.path.join(root, "blobs"))
    os.makedirs(os.path.join(root, "team"))
    os.symlink("../blobs", os.path.join(root, "team", "blobs"))
    for number in range(manifests):
        repo = "team/repo%d" % (number % 100)
        descriptors = []
        for _ in range(blobs_each):
            data = os.urandom(64)
            with open(os.path.join(root, "blobs", sha256(data)), "wb") as f:
                f.write(data)
            descriptors.append({"mediaType": "application/octet-stream",
                                "digest": sha256(data), "size": len(data)})
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": descriptors[0], "layers": descriptors[1:]}).encode()
        manifests_dir = os.path.join(root, repo, "manifests")
        if not os.path.isdir(manifests_dir):
            os.makedirs(manifests_dir)
            os.symlink("../blobs", os.path.join(root, repo, "blobs"))
        with open(os.path.join(manifests_dir, sha256(body)), "wb") as f:
            f.write(body)
        os.symlink(sha256(body), os.path.join(manifests_dir, "t%d" % number))
    return root


# Run in a small interpreter of its own: a child forked from the bench itself would
# count the bench's own memory (the content it made) in its peak.
MEASURE = """import resource, subprocess, sys, time
started = time.monotonic()
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
print(code, time.monotonic() - started,
      resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0)
"""


def timed_run(argv):
    """(seconds, peak RSS in MiB) of one command, which must succeed."""
    result = run([sys.executable, "-c", MEASURE] + argv)
    code, seconds, peak = result.stdout.split()
    if code != "0":
        raise SystemExit("bench: %s failed (exit code %s)" % (" ".join(argv), code))
    return float(seconds), float(peak)


def offline_times(directory):
    """--check --json and --gc (keeping half the images) on 5,000 manifests, 20,000 blobs."""
    root = make_large_tree(directory)
    keep = os.path.join(directory, "keep.txt")
    with open(keep, "w") as f:
        f.writelines("team/repo%d:t%d\n" % (n % 100, n) for n in range(0, 5000, 2))
    check = timed_run([sys.executable, SERVER, "--check", "--json", "--root", root])
    gc = timed_run([sys.executable, SERVER, "--gc", "--keep", keep, "--root", root])
    return check, gc


def start_up_times(directory, certs, root, runs=5):
    """Seconds from process start to the first 200 from /v2/, median of runs."""
    times = []
    for _ in range(runs):
        server = Ours(directory, certs, root)
        times.append(server.start())
        server.stop()
    return statistics.median(times)


def best_of(rounds, servers, key, measurement, better=max):
    """Each server's best figure of several rounds, taken in turns so that the machine's
    drift (other load, caches, clock) falls on every server alike."""
    figures = {server.name: [] for server in servers}
    for _ in range(rounds):
        for server in servers:
            figures[server.name].append(measurement(server))
    for server in servers:
        server.results[key] = better(figures[server.name])
        server.results[key + " runs"] = figures[server.name]


def blob_streams(servers, content):
    """Rows 1 and 2: the big blob to one client, then to STREAMS at once, best of 3."""
    big = "/v2/bench/big/blobs/" + content.big

    def one_stream(server):
        return curl_speeds(server.url + big, server.certs["ca.crt"], 1)[0][0] / 1e6

    def all_streams(server):
        wall = curl_speeds(server.url + big, server.certs["ca.crt"], STREAMS)[1]
        return STREAMS * BIG_BLOB / wall / 1e6

    best_of(3, servers, "single", one_stream)
    best_of(3, servers, "multi", all_streams)


def named(name, server):
    """A server under another name, to tell apart two of a kind in one comparison."""
    server.name = name
    return server


def small_requests(directory, certs, rsa_certs, root, workers, seconds):
    """The figures of small requests against nginx and against the floor, each pair
    measured in turns: plain HTTP, HEAD, RSA handshakes, and one worker by connections."""
    manifest = "/v2/rancher/bench-0/manifests/1"
    figures = {}

    def rates(servers, key, **wrk):
        for server in servers:
            server.start()
        try:
            for server in servers:
                figures[server.name, key] = wrk_rate(server.url + manifest, None, seconds,
                                                     **wrk)
        finally:
            for server in servers:
                server.stop()

    tree_manifest = os.path.join(root, "rancher", "bench-0", "manifests", "1")
    rates([Ours(directory, None, root, workers), Nginx(directory, None, root),
           Floor(directory, None, tree_manifest, workers)], "plain")
    # Plain HTTP: httperf writes a request's line and headers as two TLS records, which
    # no client of a registry does, and which this server reads the base class's way.
    servers = [Ours(directory, None, root, workers), Nginx(directory, None, root)]
    for server in servers:
        server.start()
    try:
        for server in servers:
            for method in ("GET", "HEAD"):
                figures[server.name, method] = httperf_rate(server, manifest, method)
    finally:
        for server in servers:
            server.stop()
    rates([Ours(directory, rsa_certs, root, workers), Nginx(directory, rsa_certs, root)],
          "rsa handshakes", close=True)
    rates([named("nginx TLS 1.2", Nginx(directory, certs, root, "TLSv1.2"))], "tls close",
          close=True)
    rates([Floor(directory, certs, tree_manifest, workers)], "tls")
    rates([Floor(directory, certs, tree_manifest, workers)], "tls close", close=True)
    for connections in (1, 4, 16):
        rates([Ours(directory, None, root, 1),
               named("ours on one CPU", Ours(directory, None, root, 1,
                                             ["--pin-workers", "always"])),
               Floor(directory, None, tree_manifest, 1),
               named("floor on one CPU", Floor(directory, None, tree_manifest, 1, pin=True))],
              "one worker, %d" % connections, connections=connections)
    return figures


def metrics_cost(directory, certs, root, seconds):
    """(req/s with metrics, req/s without, CPU time a request with, without): two servers
    that differ only in --metrics-listen, under the keep-alive manifest load, in turns,
    in ABBA order. CPU time per request, read from /proc, is what counting costs, and
    steadier than the rate. Each server is one worker kept on one CPU, so that wrk has
    the other core: two workers and wrk sharing two cores move a server's CPU time a
    request by a few percent from round to round, the size of what is measured. Each
    figure is the median of its server's rounds."""
    pinned = ["--pin-workers", "always"]
    metered = Ours(directory, certs, root, 1, pinned + ["--metrics-listen", str(free_port())])
    plain = Ours(directory, certs, root, 1, pinned)
    rates, costs = {metered: [], plain: []}, {metered: [], plain: []}
    for server in rates:
        server.start()
    try:
        for round_number in range(METRICS_ROUNDS):
            order = (metered, plain) if round_number % 2 == 0 else (plain, metered)
            for server in order:
                before = server.cpu_seconds()
                rate = wrk_rate(server.url + "/v2/rancher/bench-0/manifests/1",
                                certs["ca.crt"], seconds)
                rates[server].append(rate)
                costs[server].append((server.cpu_seconds() - before) / (rate * seconds))
    finally:
        for server in rates:
            server.stop()
    return (statistics.median(rates[metered]), statistics.median(rates[plain]),
            statistics.median(costs[metered]) * 1e6, statistics.median(costs[plain]) * 1e6)


def measure(servers, content, directory, seconds):
    for server in servers:
        server.results["start"] = server.start()
    manifest = "/v2/rancher/bench-0/manifests/1"
    blob_streams(servers, content)
    for server in servers:
        server.results["manifest_rps"] = wrk_rate(server.url + manifest, server.certs["ca.crt"],
                                                  seconds)
        server.results["handshake_rps"] = wrk_rate(server.url + manifest,
                                                   server.certs["ca.crt"], seconds, close=True)
    best_of(PULLS, servers, "pull", lambda server: cold_pull(server, directory), min)
    for server in servers:
        r = server.results
        r["peak_rss"] = max(server.memory("VmHWM"))
        r["peak_rss_all"] = sum(server.memory("VmHWM"))
        if isinstance(server, Ours):
            r["unique_memory"] = server.unique_memory()
        before = sum(server.memory("VmRSS"))
        keep_alive_requests(server, manifest, LEAK_REQUESTS)
        r["rss_growth"] = sum(server.memory("VmRSS")) - before
        if isinstance(server, Ours):
            r["import"] = import_tarball(server, directory)
        server.stop()


# --- The table -------------------------------------------------------------------------------

# (key, label, unit, higher is better, target for ours as (against, ratio or absolute))
ROWS = [
    ("single", "1. 256 MiB blob, 1 stream, best of 3", "MB/s", True, ("nginx", 1.0)),
    ("multi", "2. 256 MiB blob, %d streams, best of 3" % STREAMS, "MB/s", True,
     ("nginx", 1.0)),
    ("manifest_rps", "3. manifest GET, keep-alive (wrk)", "req/s", True, ("nginx", 0.25)),
    ("handshake_rps", "4. manifest GET, new TLS conn each", "req/s", True, ("nginx", 0.5)),
    ("pull", "5. cold ctr pull, %d images, best of %d" % (IMAGES, PULLS), "s", False,
     ("distribution", 1.0)),
    ("peak_rss", "6. peak RSS during 1-5, per process", "MiB", False, ("absolute", 64)),
    ("rss_growth", "6. RSS growth, %d requests" % LEAK_REQUESTS, "MiB", False,
     ("absolute", 2)),
]


def ratio(ours, other, higher_better):
    if ours is None or not other or ours <= 0 or other <= 0:
        return "-"  # growth near zero (or negative) has no meaningful ratio
    return "%.2fx" % (ours / other if higher_better else other / ours if ours else 0)


def meets(values, target, higher_better):
    """Whether our figure meets its target: a ratio to another server, or an absolute bound."""
    against, limit = target
    ours = values["ours"]
    if ours is None:
        return "-"
    if against == "absolute":
        return "yes" if ours < limit else "NO"
    other = values[against]
    if not other:
        return "-"
    return "yes" if (ours / other >= limit if higher_better else ours <= other * limit) else "NO"


def table(results, extra):
    row = "%-38s %-6s %12s %12s %12s %9s %9s %7s"
    header = row % ("measurement", "unit", "ours", "distribution", "nginx", "vs dist",
                    "vs nginx", "target")
    lines = [header, "-" * len(header)]
    for key, label, unit, higher, target in ROWS:
        values = {name: r.get(key) for name, r in results.items()}
        lines.append(row % (
            label, unit, fmt(values["ours"]), fmt(values["distribution"]), fmt(values["nginx"]),
            ratio(values["ours"], values["distribution"], higher),
            ratio(values["ours"], values["nginx"], higher), meets(values, target, higher)))
    return "\n".join(lines + extra)


def fmt(value):
    if value is None:
        return "n/a"
    return "%.0f" % value if value >= 100 else "%.2f" % value


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve-floor"]:  # Floor's own process
        port, workers, pin, manifest = int(argv[1]), int(argv[2]), argv[3] == "pin", argv[4]
        return serve_floor(port, workers, pin, manifest, *argv[5:7])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10, help="duration of each wrk run")
    parser.add_argument("--workers", type=int, default=2,
                        help="embedded_registry.py --workers for the main column (default 2)")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (else a temp dir)")
    args = parser.parse_args(argv)
    missing = [tool for tool in TOOLS if not (shutil.which(tool) or shutil.which(
        tool, path="/usr/sbin:/sbin"))]
    if missing:
        raise SystemExit("bench: missing %s; on Debian: apt-get install docker-registry "
                         "nginx-light wrk httperf curl openssl containerd" % ", ".join(missing))
    os.environ["PATH"] += os.pathsep + "/usr/sbin:/sbin"
    directory = args.keep or tempfile.mkdtemp(prefix="embedded-registry-bench-")
    os.makedirs(directory, exist_ok=True)
    try:
        print("bench: making content in %s ..." % directory, file=sys.stderr)
        certs = make_certificates(directory)
        rsa_certs = make_certificates(directory, "rsa")
        content = make_content(directory)
        storage = distribution_storage(content, directory)
        servers = {"ours": Ours(directory, certs, content.root, args.workers),
                   "distribution": Distribution(directory, certs, storage),
                   "nginx": Nginx(directory, certs, content.root)}
        print("bench: measuring %s in turns ..." % ", ".join(servers), file=sys.stderr)
        measure(list(servers.values()), content, directory, args.seconds)
        results = {name: server.results for name, server in servers.items()}
        ours = results["ours"]
        single = Ours(directory, certs, content.root, workers=1)
        single.start()
        manifest_url = "%s/v2/rancher/bench-0/manifests/1" % single.url
        one_worker = (wrk_rate(manifest_url, certs["ca.crt"], args.seconds),
                      wrk_rate(manifest_url, certs["ca.crt"], args.seconds, close=True))
        single.stop()
        metered = metrics_cost(directory, certs, content.root, args.seconds)
        small = small_requests(directory, certs, rsa_certs, content.root, args.workers,
                               args.seconds)
        always = Ours(directory, certs, content.root, args.workers, ["--verify", "always"])
        always.start()
        blob_streams([always], content)  # every GET hashed: the cost of --verify always
        always.stop()
        many = make_many_manifests(directory, MANY_MANIFESTS)
        empty = os.path.join(directory, "empty")
        os.makedirs(empty)
        start_many = start_up_times(directory, certs, many)
        start_empty = start_up_times(directory, certs, empty)
        check, gc = offline_times(directory)
        extra = [
            "   ours is --workers %d; with --workers 1: 3. %.0f req/s, 4. %.0f req/s" % (
                args.workers, one_worker[0], one_worker[1]),
            "   all our processes together (supervisor and workers): peaks %.1f MiB summed, "
            "which counts each page they share once a process; after rows 1-6 they hold "
            "%.1f MiB, shared pages once (Pss; target < 64: %s)" % (
                ours["peak_rss_all"], ours["unique_memory"],
                "yes" if ours["unique_memory"] < 64 else "NO"),
            "   ours with --verify always (every GET hashed): 1. %.0f MB/s (%.2fx of first), "
            "2. %.0f MB/s (%.2fx)" % (
                always.results["single"], always.results["single"] / ours["single"],
                always.results["multi"], always.results["multi"] / ours["multi"]),
            "10. with --metrics-listen, one worker on one CPU: keep-alive manifest GET %.0f "
            "req/s and %.1f us of CPU a request, without: %.0f req/s and %.1f us (medians of "
            "%d rounds each, in turns; "
            "the metrics cost %.1f%% of the rate and %+.1f%% CPU, target <= 5%% of both: %s)" % (
                metered[0], metered[2], metered[1], metered[3], METRICS_ROUNDS,
                100 * (1 - metered[0] / metered[1]), 100 * (metered[2] / metered[3] - 1),
                "yes" if metered[0] >= 0.95 * metered[1] and metered[2] <= 1.05 * metered[3]
                else "NO"),
            "11. manifest GET, keep-alive, plain HTTP, --workers %d: ours %.0f req/s, nginx "
            "%.0f (%.2fx, target >= 0.40: %s); the floor (receive, send, nothing else; %d "
            "processes) %.0f, ours %.0f%% of it" % (
                args.workers, small["embedded-registry", "plain"], small["nginx", "plain"],
                small["embedded-registry", "plain"] / small["nginx", "plain"],
                "yes" if small["embedded-registry", "plain"] >= 0.4 * small["nginx", "plain"]
                else "NO", args.workers, small["floor", "plain"],
                100 * small["embedded-registry", "plain"] / small["floor", "plain"]),
            "    over TLS (row 3): the floor %.0f req/s, ours %.0f%% of it" % (
                small["floor", "tls"], 100 * ours["manifest_rps"] / small["floor", "tls"]),
            "12. manifest by tag, keep-alive, plain HTTP, httperf (16 connections): HEAD ours %.0f "
            "req/s, GET %.0f (HEAD %.2fx of GET, target on par: %s); nginx HEAD %.0f, GET "
            "%.0f" % (small["embedded-registry", "HEAD"], small["embedded-registry", "GET"],
                      small["embedded-registry", "HEAD"] / small["embedded-registry", "GET"],
                      "yes" if small["embedded-registry", "HEAD"] >=
                      0.9 * small["embedded-registry", "GET"] else "NO",
                      small["nginx", "HEAD"], small["nginx", "GET"]),
            "13. new TLS connection per request: with ECDSA P-256 (row 4) the floor "
            "(handshake, receive, send, close) %.0f/s, ours %.0f%% of it; with RSA-2048 ours "
            "%.0f/s, nginx %.0f/s (%.2fx)" % (
                small["floor", "tls close"],
                100 * ours["handshake_rps"] / small["floor", "tls close"],
                small["embedded-registry", "rsa handshakes"], small["nginx", "rsa handshakes"],
                small["embedded-registry", "rsa handshakes"] / small["nginx", "rsa handshakes"]),
            "    nginx offering at most TLS 1.2, as Debian 12's does unless told (wrk resumes "
            "its sessions, which in TLS 1.2 skips the key exchange): %.0f/s" % (
                small["nginx TLS 1.2", "tls close"]),
            "14. one worker, plain HTTP, keep-alive connections 1 / 4 / 16: ours %s req/s, "
            "kept on one CPU (--pin-workers always) %s; the floor %s, on one CPU %s" % tuple(
                " / ".join("%.0f" % small[name, "one worker, %d" % c] for c in (1, 4, 16))
                for name in ("embedded-registry", "ours on one CPU", "floor",
                             "floor on one CPU")),
            "7. start-up to first /v2/ answer: %.0f ms with %d manifests, %.0f ms with an "
            "empty tree (target < 300 ms, independent of size: %s)" % (
                start_many * 1000, MANY_MANIFESTS, start_empty * 1000,
                "yes" if start_many < 0.3 and start_many < start_empty * 1.5 + 0.02 else "NO"),
            "   (distribution's start-up with the bench content: %.0f ms)" % (
                results["distribution"]["start"] * 1000),
            "9. 5,000 manifests and 20,000 blobs: --check --json %.1f s, %.0f MiB peak; "
            "--gc keeping half %.1f s, %.0f MiB peak" % (check + gc),
            "   5. every pull, in turns: %s" % "; ".join(
                "%s %s" % (name, " ".join("%.2f" % t for t in result["pull runs"]))
                for name, result in results.items()),
            "8. status quo, `ctr images import` of the same %d images as one tarball: %.2f s; "
            "cold pull from us: %.2f s (%.2fx)" % (IMAGES, ours["import"], ours["pull"],
                                                  ours["import"] / ours["pull"]),
        ]
        print("\nembedded-registry bench, %s, nproc %d, Python %s, %s" % (
            time.strftime("%Y-%m-%d"), os.cpu_count(), platform.python_version(),
            platform.machine()))
        print(table(results, extra))
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
