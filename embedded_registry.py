#!/usr/bin/env python3
"""embedded_registry: a read-only container registry served from a plain directory.

It lets containerd on an air-gapped k3s node *pull* its bootstrap images from a
directory tree instead of importing image tarballs at every start.

Usage (on the node):

    python3 embedded_registry.py --root /var/lib/rancher/k3s/server/registry \\
        --cert /etc/embedded-registry/server.crt --key /etc/embedded-registry/server.key

    python3 embedded_registry.py --root ./registry          # plain HTTP, loopback

then point containerd at https://127.0.0.1:5443 through /etc/rancher/k3s/registries.yaml
(see README.md). Offline, beside a running server:

    python3 embedded_registry.py --check --deep --json --root ROOT  # soundness, inventory
    python3 embedded_registry.py --gc --keep images.txt --root ROOT  # shed what is not kept

The tree it serves (what download_system_images.py writes):

    ROOT/<repo>/manifests/<tag>              a tag: a file, or a relative symlink to ...
    ROOT/<repo>/manifests/sha256:<hex>       ... every manifest, named by its digest
    ROOT/<repo>/blobs/sha256:<hex>           config and layer blobs
    ROOT/<repo>/blobs -> ../blobs            usually a symlink chain to one ROOT/blobs

<repo> has one or more path components (rancher/mirrored-pause). When containerd
pulls through a mirror it adds ?ns=<upstream host>; ROOT/<ns>/<repo> is looked up
first, then ROOT/<repo>, so trees with and without the registry host both serve.

The protocol is the pull half of the OCI distribution spec: GET/HEAD of /v2/,
manifests and blobs (with single byte ranges), tags/list, _catalog and the OCI 1.1
referrers API. Every write method is refused with 405: the server never changes the
tree.

Security: every name from a request or from the tree is checked against the
distribution grammars before it becomes part of a path, the resolved real path of
anything served must lie inside the real root, and only regular files are opened. A
digest-named manifest whose bytes do not hash to its name is not served (404, logged
once): a corrupt tree must not poison a node. A blob is hashed on its first whole GET
(on every one with --verify always) and its final chunk held back unless the digest
matches; a corrupt one is cut short, logged and answered 404 from then on. No
directory is listed. Signal handlers only record; the serving loop acts.
"""

import argparse
import base64
import bisect
import calendar
import collections
import contextlib
import email.utils
import errno
import hashlib
import http.client
import http.server
import io
import ipaddress
import itertools
import json
import logging
import mmap
import os
import queue
import re
import resource
import signal
import socket
import socketserver
import ssl
import stat
import sys
import threading
import time
import urllib.parse
from http import HTTPStatus

__all__ = [
    "RegistryError", "Route", "parse_route", "media_type_of", "parse_range",
    "Tree", "RegistryHandler", "RegistryServer", "TlsCredentials", "make_tls_context", "main",
]
__version__ = "0.1.0"

log = logging.getLogger("embedded_registry")

# --- Constants and grammars ---------------------------------------------------------

DEFAULT_ROOT = "./registry"
# 5443: clear of k3s's own 6443 (supervisor), 6444 (apiserver), 9345 (rke2), 10250 (kubelet).
DEFAULT_LISTEN = "127.0.0.1:5443"

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
API_VERSION_HEADER = ("Docker-Distribution-API-Version", "registry/2.0")

# containerd refuses manifests over 4 MiB; reading a larger file would only waste memory.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_NAME_LENGTH = 255
MAX_LIST_ENTRIES = 1000
MAX_LIST_BYTES = 16 * 1024 * 1024  # a --keep image list
# A request's line and headers together: enough for any registry client, and it keeps a
# thousand connections that send headers of the largest size to ~64 MiB in all.
MAX_REQUEST_HEAD = 64 * 1024
# A byte position longer than this is beyond any file (and int() of 4,300 digits fails).
MAX_POSITION_DIGITS = 18
# ROOT/<ns>/<repo>/manifests is the deepest path a request can name: the tree walker
# never descends below it, however deep a directory chain on disk goes.
MAX_TREE_PATH = 2 * MAX_NAME_LENGTH + 1 + len("/manifests")
# How often, and how far apart, a missing tag is looked for again while its folder is
# being written to (a bundle unpacking): tar leaves it missing for microseconds.
TAG_LOOKUPS = 4
TAG_LOOKUP_PAUSE = 0.01
# Large reads let OpenSSL encrypt big records with the GIL released.
COPY_CHUNK = 1024 * 1024
# Where a blob's copy buffer starts within its memory page; see page_offset_buffer().
BUFFER_PAGE_OFFSET = 2048

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(r"%s(?:/%s)*" % (_COMPONENT, _COMPONENT))
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
DIGEST_RE = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
DIGEST_HEX_LENGTHS = {"sha256": 64, "sha512": 128}
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOST_RE = re.compile(r"%s(?:\.%s)*(?::[0-9]{1,5})?" % (_LABEL, _LABEL))
# RFC 6838: type/subtype, restricted names; what goes into a Content-Type header.
_RESTRICTED_NAME = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
MEDIA_TYPE_RE = re.compile(r"%s/%s" % (_RESTRICTED_NAME, _RESTRICTED_NAME))
# A header line's field name (RFC 9110 token); anything else makes the request invalid.
TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
POSITION_RE = re.compile(r"[0-9]*")
COUNT_RE = re.compile(r"[0-9]{1,9}")
ZERO_RE = re.compile(r"0+")

# One pattern per route; <name> is greedy so a repo may itself contain "manifests".
ROUTES = [
    ("base", re.compile(r"/v2/?")),
    ("catalog", re.compile(r"/v2/_catalog")),
    ("tags", re.compile(r"/v2/(?P<name>.+)/tags/list")),
    ("manifest", re.compile(r"/v2/(?P<name>.+)/manifests/(?P<reference>[^/]+)")),
    ("blob", re.compile(r"/v2/(?P<name>.+)/blobs/(?P<reference>[^/]+)")),
    ("referrers", re.compile(r"/v2/(?P<name>.+)/referrers/(?P<reference>[^/]+)")),
]
# Prometheus metrics (--metrics-listen): the label values a series may take, fixed so
# that every worker's counters have the same place in one shared table.
METRIC_ROUTES = ("base", "manifest", "blob", "tags", "catalog", "referrers", "other")
METRIC_METHODS = ("GET", "HEAD", "other")
METRIC_CODES = ("200", "206", "304", "400", "401", "403", "404", "405", "408", "413", "414",
                "416", "431", "500", "503", "other")
# From a 1 ms manifest to a 30 s blob, and past it.
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
HANDSHAKE_FAILURES = ("timeout", "closed", "protocol", "certificate")
# The request a node makes most, whole in what one read brought: GET or HEAD over
# HTTP/1.1, headers that are plain `token: printable` lines. Only such a request may be
# answered from a prepared answer; anything else is the base class's to parse.
SIMPLE_REQUEST_RE = re.compile(
    rb"(GET|HEAD) (/v2/[!-~]{1,2048}) HTTP/1\.1\r\n"
    rb"((?:[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}:[ \t]*[ -~]{0,8192}\r\n){0,100})\r\n")
# Headers that ask for more than a plain answer: a body, an expectation, a condition.
UNUSUAL_HEADER_RE = re.compile(
    rb"(?im)^(?:content-length|transfer-encoding|expect|if-[a-z-]+|range):")
CONNECTION_CLOSE_RE = re.compile(rb"(?im)^connection:[ \t]*close[ \t]*\r$")
MAX_PREPARED_ANSWERS = 4096
PLAIN_LOG_TEXT_RE = re.compile(r"[ -\[\]-~]*")  # printable ASCII but the backslash
TIMEOUT_KINDS = ("handshake", "header", "idle", "send")
PIN_POLICIES = ("auto", "always", "never")  # --pin-workers
PEM_CERTIFICATE_RE = re.compile(
    rb"-----BEGIN CERTIFICATE-----([A-Za-z0-9+/=\s]+)-----END CERTIFICATE-----")

# Tags that name the manifest they belong to: the OCI 1.1 referrers fallback tag
# (sha256-<hex>) and cosign's signature, attestation and SBOM tags.
ARTIFACT_TAG_RE = re.compile(r"(sha256)-([a-f0-9]{64})(?:\.(?:sig|att|sbom))?")

# The base class answers an unknown method with 501 and an HTTP/2 request line with 505.
# Both are the client's doing, so they go out as 4xx: a 5xx reads as this server's fault,
# to containerd (an error to remember) and to an operator's alert on the 5xx rate.
CLIENT_FAULT_STATUS = {HTTPStatus.NOT_IMPLEMENTED: HTTPStatus.METHOD_NOT_ALLOWED,
                       HTTPStatus.HTTP_VERSION_NOT_SUPPORTED: HTTPStatus.BAD_REQUEST}
# Status codes the base class raises on its own, and the OCI code that fits each.
GENERIC_ERROR_CODES = {
    HTTPStatus.METHOD_NOT_ALLOWED: "UNSUPPORTED",
    HTTPStatus.NOT_IMPLEMENTED: "UNSUPPORTED",
    HTTPStatus.NOT_FOUND: "NOT_FOUND",
    HTTPStatus.REQUEST_URI_TOO_LONG: "NAME_INVALID",
}


# --- Pure functions: errors, routing, media types, ranges ----------------------------

class RegistryError(Exception):
    """A request the registry answers with an OCI error body."""

    def __init__(self, status, code, message, detail=None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail


def oci_error_body(code, message, detail=None):
    error = {"code": code, "message": message}
    if detail is not None:
        error["detail"] = detail
    return json.dumps({"errors": [error]}).encode()


Route = collections.namedtuple("Route", "kind name reference ns query")


def parse_route(raw_path):
    """Map a request target to a Route, or raise RegistryError.

    The path is matched raw, never percent-decoded: no registry name, tag or digest
    contains '%', so an encoded dot or slash simply fails the grammar.
    """
    try:
        split = urllib.parse.urlsplit(raw_path)
        query = urllib.parse.parse_qs(split.query, keep_blank_values=True)
    except ValueError:  # an absolute-form target with a broken authority: http://[::1/v2/
        raise RegistryError(HTTPStatus.BAD_REQUEST, "UNSUPPORTED", "malformed request target")
    for kind, pattern in ROUTES:
        match = pattern.fullmatch(split.path)
        if match:
            break
    else:
        raise RegistryError(HTTPStatus.NOT_FOUND, "NOT_FOUND", "no such endpoint")
    groups = match.groupdict()
    name = groups.get("name")
    if name is not None:
        check_name(name)
    reference = groups.get("reference")
    if kind == "manifest":
        check_reference(reference)
    elif kind in ("blob", "referrers"):
        check_digest(reference)
    ns = query.get("ns", [None])[-1]
    if ns is not None and (len(ns) > MAX_NAME_LENGTH or not HOST_RE.fullmatch(ns)):
        ns = None  # ns is only a hint; a malformed one falls back to the plain tree.
    return Route(kind, name, reference, ns, query)


def check_name(name):
    if len(name) > MAX_NAME_LENGTH or not NAME_RE.fullmatch(name):
        raise RegistryError(HTTPStatus.BAD_REQUEST, "NAME_INVALID",
                            "invalid repository name", {"name": name[:MAX_NAME_LENGTH]})


def check_reference(reference):
    """A manifest reference is a tag or a digest; anything else is simply unknown."""
    if TAG_RE.fullmatch(reference):
        return
    if DIGEST_RE.fullmatch(reference):
        check_digest(reference)
        return
    raise RegistryError(HTTPStatus.NOT_FOUND, "MANIFEST_UNKNOWN", "manifest unknown",
                        {"reference": reference[:MAX_NAME_LENGTH]})


def is_digest(reference):
    return ":" in reference


def check_digest(digest):
    if not is_valid_digest(digest):
        raise RegistryError(HTTPStatus.BAD_REQUEST, "DIGEST_INVALID",
                            "invalid or unsupported digest", {"digest": digest[:200]})


def is_valid_digest(digest):
    """A sha256 or sha512 digest in lowercase hex: the only digests that name files here."""
    if not isinstance(digest, str):
        return False
    algorithm, _, encoded = digest.partition(":")
    length = DIGEST_HEX_LENGTHS.get(algorithm)
    return (length is not None and len(encoded) == length
            and not encoded.strip("0123456789abcdef") and DIGEST_RE.fullmatch(digest) is not None)


def digest_of(data, algorithm="sha256"):
    return "%s:%s" % (algorithm, hashlib.new(algorithm, data).hexdigest())


def digest_of_file(f, algorithm="sha256"):
    """The digest of an open file's contents from its current position on."""
    h = hashlib.new(algorithm)
    buffer = page_offset_buffer(COPY_CHUNK)
    for count in iter(lambda: f.readinto(buffer), 0):
        h.update(buffer[:count])
    return "%s:%s" % (algorithm, h.hexdigest())


def page_offset_buffer(size):
    """A writable buffer of size bytes that starts in the middle of a memory page.

    The kernel copies file pages into it and OpenSSL copies it into its record buffer.
    With `rep movsb` (AMD Zen, measured here) a copy runs 3-7 times slower when source
    and target lie at almost the same offset within their 4 KiB pages, and page
    cache pages, OpenSSL's record buffer and malloc's large blocks all start at or just
    past a page boundary. Mid-page, the blob copy loop costs a third less CPU.
    """
    area = mmap.mmap(-1, BUFFER_PAGE_OFFSET + size)
    return memoryview(area)[BUFFER_PAGE_OFFSET:]


def media_type_of(document):
    """The media type of a parsed manifest: its own field, else inferred from its shape."""
    declared = document.get("mediaType")
    if declared is not None:  # it becomes a response header: only a media type will do
        return declared if isinstance(declared, str) and MEDIA_TYPE_RE.fullmatch(declared) \
            else None
    if document.get("schemaVersion") == 1:
        return DOCKER_SCHEMA1_SIGNED if "signatures" in document else DOCKER_SCHEMA1
    if "manifests" in document:
        return OCI_INDEX
    if "config" in document and "layers" in document:
        return OCI_MANIFEST
    return None


class ManifestProblem(Exception):
    """Why a manifest file cannot be served or trusted; the message reads after its path."""


def document_references(document):
    """(child manifest descriptors, blob descriptors) of a parsed manifest or index.

    The gate for what a manifest names: every descriptor must be an object with a valid
    digest and a whole size before its digest may become part of a path. Foreign layers
    (with urls) have no blob here. Raises ManifestProblem naming the first bad field.
    """
    children = document.get("manifests", [])
    if not isinstance(children, list):
        raise ManifestProblem("has a manifests field that is not a list")
    for number, child in enumerate(children):
        check_descriptor(child, "manifests[%d]" % number)
        platform = child.get("platform", {})
        if not isinstance(platform, dict) or not all(
                isinstance(platform.get(k, ""), str) for k in ("os", "architecture", "variant")):
            raise ManifestProblem("has manifests[%d].platform that is not an object of "
                                  "strings" % number)
    layers = document.get("layers", [])
    if not isinstance(layers, list):
        raise ManifestProblem("has a layers field that is not a list")
    blobs = [] if document.get("config") is None else [("config", document["config"])]
    blobs += [("layers[%d]" % number, layer) for number, layer in enumerate(layers)]
    for field, descriptor in blobs:
        check_descriptor(descriptor, field)
    if "subject" in document:
        check_descriptor(document["subject"], "subject")
    return children, [d for _, d in blobs if not d.get("urls")]


def subject_of(document):
    """The digest a manifest refers to (its OCI 1.1 subject), or None."""
    subject = document.get("subject")
    return subject["digest"] if isinstance(subject, dict) and is_valid_digest(
        subject.get("digest")) else None


def referrer_descriptor(manifest, document):
    """How the referrers API lists a manifest: its descriptor, with its artifactType (its
    own, else its config's media type) and its annotations."""
    descriptor = {"mediaType": manifest.media_type, "digest": manifest.digest,
                  "size": len(manifest.body)}
    artifact_type = document.get("artifactType")
    if artifact_type is None and isinstance(document.get("config"), dict):
        artifact_type = document["config"].get("mediaType")
    if isinstance(artifact_type, str) and MEDIA_TYPE_RE.fullmatch(artifact_type):
        descriptor["artifactType"] = artifact_type
    annotations = document.get("annotations")
    if isinstance(annotations, dict) and all(isinstance(v, str) for v in annotations.values()):
        descriptor["annotations"] = annotations
    return descriptor


def check_descriptor(descriptor, field):
    if not isinstance(descriptor, dict):
        raise ManifestProblem("has %s that is not a descriptor object" % field)
    if not is_valid_digest(descriptor.get("digest")):
        raise ManifestProblem("has %s with an invalid digest %s" % (
            field, escape_for_log(repr(descriptor.get("digest")), 100)))
    size = descriptor.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ManifestProblem("has %s with an invalid size %s" % (
            field, escape_for_log(repr(size), 100)))
    if not isinstance(descriptor.get("mediaType", ""), str):
        raise ManifestProblem("has %s with a mediaType that is not a string" % field)
    urls = descriptor.get("urls", [])
    if not isinstance(urls, list) or not all(isinstance(url, str) for url in urls):
        raise ManifestProblem("has %s with urls that are not a list of strings" % field)


def parse_range(header, size):
    """Return (first, last) for a single satisfiable byte range, None to send it all.

    A header this function does not understand, or one asking for several ranges, is
    ignored (RFC 9110 allows a 200 then); an unsatisfiable one raises RegistryError 416.
    Positions are ASCII digits only: str.isdigit() would take '²', and int() refuses
    4,300 digits.
    """
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash or not POSITION_RE.fullmatch(first) or not POSITION_RE.fullmatch(last):
        return None
    if first == "":
        if last == "":
            return None
        length = byte_position(last)
        if length == 0 or size == 0:
            raise range_not_satisfiable(size)
        return max(size - length, 0), size - 1
    start = byte_position(first)
    if last != "" and byte_position(last) < start:
        return None  # syntactically invalid: ignore, per RFC 9110
    if start >= size:
        raise range_not_satisfiable(size)
    end = size - 1 if last == "" else min(byte_position(last), size - 1)
    return start, end


def byte_position(digits):
    """A range position; one too long for any file stands for 'beyond the end'."""
    return int(digits) if len(digits) <= MAX_POSITION_DIGITS else 10 ** MAX_POSITION_DIGITS


def range_not_satisfiable(size):
    error = RegistryError(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, "BLOB_UNKNOWN",
                          "requested range not satisfiable", {"size": size})
    error.headers = [("Content-Range", "bytes */%d" % size)]
    return error


def blob_unknown(name, digest):
    return RegistryError(HTTPStatus.NOT_FOUND, "BLOB_UNKNOWN", "blob unknown to registry",
                         {"name": name, "digest": digest})


def paginate(names, query):
    """Apply the spec's n/last pagination to sorted names; return (page, more)."""
    last = query.get("last", [""])[-1]
    if last:
        names = [n for n in names if n > last]
    n = query.get("n", [str(MAX_LIST_ENTRIES)])[-1]
    if not COUNT_RE.fullmatch(n):
        raise RegistryError(HTTPStatus.BAD_REQUEST, "PAGINATION_NUMBER_INVALID",
                            "n must be a whole number")
    limit = min(int(n), MAX_LIST_ENTRIES)
    return names[:limit], len(names) > limit


def malformed_header(headers):
    """The first header that is not one 'token: value' line (a space before the colon, a
    control character, a folded continuation), else None. Such a header could hide a
    Content-Length or Transfer-Encoding from the checks below. The parser stops at a
    line it cannot read as a header and notes a defect: the lines after it are lost."""
    if headers.defects:
        return type(headers.defects[0]).__name__
    for name, value in headers.items():
        if not TOKEN_RE.fullmatch(name) or "\r" in value or "\n" in value:
            return name
    return None


def carries_body(headers):
    """Whether a request announces a body: any Transfer-Encoding, or a Content-Length
    other than zero (or one that is not a number at all)."""
    if headers.get("Transfer-Encoding") is not None:
        return True
    return any(not ZERO_RE.fullmatch(value.strip())
               for value in headers.get_all("Content-Length") or [])


KeptImage = collections.namedtuple("KeptImage", "repositories tag digest where")


def parse_kept_image(text, where):
    """A line of an image list (the downloader's -f format) as what --gc must keep: the
    tree repositories it may live in (the registry host trimmed, as by default, or kept,
    as with -n), and its tag or digest. ValueError says what is wrong with the line."""
    if text.startswith("oci://"):  # a Helm chart's reference, as Helm writes it
        text = text[len("oci://"):]
    name, _, digest = text.partition("@")
    if digest and not is_valid_digest(digest):
        raise ValueError("invalid digest %r" % digest)
    tag = None
    if name.rfind(":") > name.rfind("/"):
        name, _, tag = name.rpartition(":")
        if not TAG_RE.fullmatch(tag):
            raise ValueError("invalid tag %r" % tag)
    host, slash, rest = name.partition("/")
    if slash and ("." in host or ":" in host or host == "localhost" or host.lower() != host):
        if not HOST_RE.fullmatch(host):
            raise ValueError("invalid registry host %r" % host)
    else:
        host, rest = "docker.io", name
    if host in ("docker.io", "index.docker.io"):
        host, rest = "docker.io", rest if "/" in rest else "library/" + rest
    if not NAME_RE.fullmatch(rest) or len(rest) > MAX_NAME_LENGTH:
        raise ValueError("invalid repository name %r" % rest)
    return KeptImage((rest, "%s/%s" % (host, rest)), tag or (None if digest else "latest"),
                     digest or None, where)


def parse_image_lists(named_texts):
    """[KeptImage] of every line of every (file name, text); ValueError lists every bad
    line with its file and line number."""
    kept, problems = [], []
    for source, text in named_texts:
        for number, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            where = "%s:%d" % (source, number)
            try:
                kept.append(parse_kept_image(line, where))
            except ValueError as error:
                problems.append("%s: %s" % (where, error))
    if problems:
        raise ValueError("bad image references:\n  " + "\n  ".join(problems))
    return kept


def ns_of(target):
    """The ?ns= of a request target, as the access log records it (None without one)."""
    with contextlib.suppress(ValueError):
        return urllib.parse.parse_qs(urllib.parse.urlsplit(target).query).get("ns", [None])[-1]
    return None


class JsonLogFormatter(logging.Formatter):
    """--log-format json: one JSON object a line, for Loki or Elasticsearch. An access
    line carries its request's fields; any other line its message, as "error" when it
    is a warning or worse."""

    def format(self, record):
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) +
                 ".%03dZ" % record.msecs, "level": record.levelname.lower()}
        entry.update(getattr(record, "access", None) or {
            "error" if record.levelno >= logging.WARNING else "message": record.getMessage()})
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def der_items(data, start, end):
    """(tag, content start, content end) of each DER element in data[start:end]."""
    while start < end:
        tag, length, start = data[start], data[start + 1], start + 2
        if length & 0x80:
            count = length & 0x7F
            length, start = int.from_bytes(data[start:start + count], "big"), start + count
        if start + length > end:
            raise ValueError("a DER element runs past its container")
        yield tag, start, start + length
        start += length


def certificate_not_after(pem):
    """The notAfter of the first certificate in PEM bytes, in seconds since the epoch;
    ValueError if there is none to read. (The ssl module decodes only peers' certificates.)"""
    match = PEM_CERTIFICATE_RE.search(pem)
    if not match:
        raise ValueError("no PEM certificate")
    try:
        der = base64.b64decode(b"".join(match.group(1).split()), validate=True)
        _, start, end = next(der_items(der, 0, len(der)))  # Certificate
        _, start, end = next(der_items(der, start, end))  # TBSCertificate
        fields = list(der_items(der, start, end))
        if fields[0][0] == 0xA0:  # [0] version
            fields = fields[1:]
        _, start, end = fields[3]  # serial, signature, issuer, validity
        (_, _, _), (tag, start, end) = list(der_items(der, start, end))[:2]
        text = der[start:end].decode("ascii")
        if tag == 0x17:  # UTCTime: YYMMDDHHMMSSZ, years 1950-2049
            year = int(text[:2])
            text = str(1900 + year if year >= 50 else 2000 + year) + text[2:]
        when = time.strptime(text, "%Y%m%d%H%M%SZ")
    except (StopIteration, IndexError, ValueError, UnicodeDecodeError) as error:
        raise ValueError("cannot read the certificate's notAfter: %s" % error)
    return calendar.timegm(when)


def metric_value(value):
    return "%d" % value if value == int(value) else repr(value)


def handshake_failure(error):
    """The reason label of a failed TLS handshake's error."""
    if isinstance(error, socket.timeout):
        return "timeout"
    if isinstance(error, (ssl.SSLEOFError, ssl.SSLZeroReturnError)) or not isinstance(
            error, ssl.SSLError):
        return "closed"
    return "certificate" if "CERTIFICATE" in str(error.reason).upper() else "protocol"


def label_value(value):
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def exposition(families):
    """The Prometheus text format (0.0.4) of [(name, type, help, samples)], where each
    sample is (name suffix, ((label, value), ...), value): a histogram's _bucket, _sum
    and _count are samples of its family."""
    lines = []
    for name, kind, text, samples in families:
        lines += ["# HELP %s %s" % (name, text), "# TYPE %s %s" % (name, kind)]
        for suffix, labels, value in samples:
            shown = ",".join('%s="%s"' % (key, label_value(val)) for key, val in labels)
            lines.append("%s%s%s %s" % (name, suffix, "{%s}" % shown if shown else "",
                                        metric_value(value)))
    return ("\n".join(lines) + "\n").encode()


def worker_cpus(workers, allowed, policy):
    """The CPU each worker is kept on, by its number, or None to leave them free.

    A worker's threads take turns holding the interpreter lock. On one core each hand-off
    is a plain switch; across cores it wakes another core and moves the cache, and a
    worker's rate falls as its connections grow. Keeping workers on CPUs of their own
    needs as many CPUs as workers ("auto"); "always" also keeps a single worker on
    one, and shares CPUs in turn when workers outnumber them."""
    allowed = sorted(allowed)
    if policy == "never" or not allowed or (
            policy == "auto" and not 2 <= workers <= len(allowed)):
        return None
    return [allowed[n % len(allowed)] for n in range(workers)]


def escape_for_log(text, limit=400):
    """Control characters escaped and absurd lengths cut, so a log line stays one line."""
    if len(text) <= limit and PLAIN_LOG_TEXT_RE.fullmatch(text):
        return text  # the common case, which escaping would leave as it is
    text = text.encode("unicode_escape", "backslashreplace").decode("ascii")
    return text if len(text) <= limit else "%s...(%d chars)" % (text[:limit], len(text))


# --- Storage: the tree, looked up safely, with a manifest cache ---------------------

Manifest = collections.namedtuple("Manifest", "body media_type digest")
# An open blob file and what is known of it: verified once it has hashed to its name.
Blob = collections.namedtuple("Blob", "file size path identity digest verified")


def lies_within(root, real_path):
    """Whether a resolved path is root itself or lies beneath it."""
    return real_path == root or real_path.startswith(root + os.sep)


class NotRegularFile(OSError):
    """A FIFO, device, socket or directory where a file is expected: never read."""


def open_regular(path):
    """(file, stat) of path opened for reading, only if it is a regular file.

    Looked at before opening, so a device is never opened (some act on open); opened
    non-blocking, so a FIFO swapped in cannot hang the open; and checked again after
    opening (fstat), so what is read is what was checked.
    """
    if not stat.S_ISREG(os.stat(path).st_mode):  # a device is never even opened
        raise NotRegularFile(errno.EINVAL, "not a regular file")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(errno.EINVAL, "not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=0), st
    except BaseException:
        os.close(fd)
        raise


def load_manifest(path):
    """(Manifest, parsed document) for the file at path, or ManifestProblem."""
    try:
        f, _ = open_regular(path)
        with f:
            body = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as error:
        raise ManifestProblem("cannot be read: %s" % error.strerror)
    return parse_manifest(body, os.path.realpath(path))


def parse_manifest(body, real_path):
    """(Manifest, parsed document) for a manifest file's bytes, or ManifestProblem.

    The one judgement of what is servable, shared by the server and --check: at most
    MAX_MANIFEST_BYTES of JSON with a media type, and a file named by a digest (after
    symlinks) must hash to that name.
    """
    if len(body) > MAX_MANIFEST_BYTES:
        raise ManifestProblem("is over the %d-byte manifest limit" % MAX_MANIFEST_BYTES)
    try:
        document = json.loads(body)
    except RecursionError:
        raise ManifestProblem("is not a JSON manifest: nested too deeply")
    except ValueError as error:
        raise ManifestProblem("is not a JSON manifest: %s" % error)
    media_type = media_type_of(document) if isinstance(document, dict) else None
    if media_type is None:
        raise ManifestProblem("has no valid mediaType and no recognisable manifest shape")
    digest = digest_of(body)
    own_name = os.path.basename(real_path)
    if own_name.startswith("sha256:") and own_name != digest:
        raise ManifestProblem("hashes to %s, not to its name" % digest)
    return Manifest(body, media_type, digest), document


def stat_identity(st):
    """What must stay the same for what was learned of a file to hold. The inode change
    time is in it because no tool can set it back: a file replaced under a reused inode,
    or written in place with its mtime restored, is looked at anew."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def file_identity(path):
    try:
        return stat_identity(os.stat(path))
    except OSError:
        return None


class IdentityCache:
    """A bounded LRU map from a real path to what was learned of that file.

    An entry holds only while the file keeps its identity (see stat_identity):
    a replaced, rewritten or re-pointed file is looked at anew, never trusted blindly.
    """

    MISSING = object()

    def __init__(self, size):
        self._entries = collections.OrderedDict()  # real path -> (identity, value)
        self._size = size
        self._lock = threading.Lock()

    def get(self, path, identity):
        with self._lock:
            entry = self._entries.get(path)
            if entry is None or entry[0] != identity:
                return self.MISSING
            self._entries.move_to_end(path)
            return entry[1]

    def put(self, path, identity, value):
        with self._lock:
            self._entries[path] = (identity, value)
            self._entries.move_to_end(path)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)


class SharedVerdicts:
    """What hashing showed of each blob file (sound, corrupt, or not yet known), shared
    by every --workers process: each blob is hashed once, and a corrupt one is refused
    by every worker as soon as one has found it out.

    A verdict says "this file's bytes hash to this digest": it is bound to the digest
    asked for as well as to the file, so a link that puts blob B's file under A's name
    gets a verdict of its own and never lends B's, or takes it away.

    A direct-mapped table in an anonymous shared mapping, made before the workers fork.
    A slot holds a hash of (digest, path, identity, verdict), so a slot taken over by
    another file, or read while another process writes it, reads as "not yet known":
    never as a wrong verdict, and no lock is needed.
    """

    SLOT_BYTES = 16

    def __init__(self, slots=16384):
        self._slots = slots
        self._table = mmap.mmap(-1, slots * self.SLOT_BYTES)

    def _slot(self, digest, path, identity):
        key = repr((digest, path, identity)).encode()
        index = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")
        return key, (index % self._slots) * self.SLOT_BYTES

    def _tag(self, key, sound):
        return hashlib.blake2b(key, digest_size=self.SLOT_BYTES,
                               person=b"sound" if sound else b"corrupt").digest()

    def get(self, digest, path, identity):
        """True (sound), False (corrupt) or None (not yet known)."""
        key, start = self._slot(digest, path, identity)
        held = self._table[start:start + self.SLOT_BYTES]
        for sound in (True, False):
            if held == self._tag(key, sound):
                return sound
        return None

    def put(self, digest, path, identity, sound):
        key, start = self._slot(digest, path, identity)
        self._table[start:start + self.SLOT_BYTES] = self._tag(key, sound)


def real_path(path):
    """os.path.realpath(path), or None where a chain of links is too long to follow
    (the kernel gives up after 40 links; Python's own resolver would recurse on)."""
    try:
        return os.path.realpath(path)
    except (RecursionError, OSError):
        return None


def is_directory(entry):
    """Whether a DirEntry is a directory itself, not a link to one (False if unknowable)."""
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def walk_tree(root, descend, on_problem):
    """Every directory of the tree, root first, as (path, its DirEntry list by name).

    The one way the tree is walked, by _catalog and --check alike: iterative, so a chain
    of directories thousands deep costs no recursion; a directory is entered only if
    descend(entry) says so, never through a symlink, and never deeper than MAX_TREE_PATH;
    a directory that cannot be listed goes to on_problem(path, message) and is skipped.
    """
    pending = [root]
    while pending:
        top = pending.pop()
        try:
            with os.scandir(top) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError as error:
            on_problem(top, "cannot be listed: %s" % error.strerror)
            continue
        yield top, entries
        for entry in reversed(entries):
            if not is_directory(entry) or not descend(entry):
                continue
            if len(entry.path) - len(root) > MAX_TREE_PATH:
                on_problem(entry.path, "lies deeper than any repository name reaches; "
                                       "not looked at")
                continue
            pending.append(entry.path)


def find_repositories(root, on_problem):
    """(name, directory) of every repository in the tree: a directory with a manifests
    folder, whose path below root is a repository name (with or without a registry host)."""
    for top, entries in walk_tree(root, names_a_repository_part, on_problem):
        if any(entry.name == "manifests" for entry in entries):
            name = os.path.relpath(top, root).replace(os.sep, "/")
            if NAME_RE.fullmatch(name) or _namespaced(name):
                yield name, top


def blob_store(root, repo):
    """Where a repository's blobs are: its blobs folder (usually a link to root/blobs),
    or root/blobs itself while there is none. GNU tar unpacks a link whose target has
    '..' as an empty placeholder file until the end of the archive, so a bundle unpacked
    beside the server leaves a repository without its blobs folder for a while."""
    own = os.path.join(repo, "blobs")
    return own if os.path.isdir(own) else os.path.join(root, "blobs")


def names_a_repository_part(entry):
    """Directories that can hold repositories: not a repository's own folders, and not
    the hidden work folders of the downloader."""
    return entry.name not in ("manifests", "blobs") and not entry.name.startswith(".")


class Tree:
    """Read-only lookups in a registry tree; nothing outside the real root is served."""

    def __init__(self, root, cache_size=4096):
        self.root = os.path.realpath(root)
        self._manifests = IdentityCache(cache_size)  # Manifest, or None if unservable
        self._blob_verdicts = SharedVerdicts()
        self._told = IdentityCache(cache_size)  # what was logged of which file
        self._referrers = IdentityCache(256)  # manifests folder -> {subject: [descriptor]}
        self.metrics = NoMetrics()  # counts verdicts and refusals for --metrics-listen

    def contains(self, real_path):
        return lies_within(self.root, real_path)

    def warn_once(self, key, identity, level, message, *args):
        """Log a refusal once for as long as the file at fault keeps its identity, so a
        client that asks again and again does not flood the log."""
        if self._told.get(key, identity) is IdentityCache.MISSING:
            self._told.put(key, identity, True)
            log.log(level, message, *args)

    def repo_dirs(self, name, ns=None):
        """The existing repository directories for name, the namespaced one first."""
        return [real for _, real in self._repo_candidates(name, ns) if real]

    def _repo_candidates(self, name, ns):
        """[(path, its real path if it is a repository directory inside the root, or None)]
        where name is looked up, the namespaced one first; NAME_UNKNOWN if none is one."""
        candidates = [os.path.join(self.root, ns, name)] if ns else []
        candidates.append(os.path.join(self.root, name))
        found = []
        for candidate in candidates:
            real = self._resolve(candidate)
            found.append((candidate, real if real and os.path.isdir(real) else None))
        if not any(real for _, real in found):
            raise RegistryError(HTTPStatus.NOT_FOUND, "NAME_UNKNOWN",
                                "repository name not known to registry", {"name": name})
        return found

    def _resolve(self, path):
        """The real path behind path if it lies inside the root, else None (logged once
        for the link at fault, whatever name a client asked for beneath it)."""
        real = real_path(path)
        if real is not None and self.contains(real):
            return real
        culprit, target = self._escaping_part(path)
        if target is None:
            self.warn_once(("loop", culprit), None, logging.WARNING,
                           "refusing %s: too many levels of symbolic links", culprit)
        else:
            self.warn_once(("outside", culprit), target, logging.WARNING,
                           "refusing %s: it resolves outside the root to %s", culprit, target)
        return None

    def _escaping_part(self, path):
        """(the shortest part of path that leaves the root, where it leads or None)."""
        parts = os.path.relpath(path, self.root).split(os.sep)
        for depth in range(1, len(parts) + 1):
            prefix = os.path.join(self.root, *parts[:depth])
            real = real_path(prefix)
            if real is None or not self.contains(real):
                return prefix, real
        return path, None

    def manifests_dir(self, repo):
        """A repository's manifests directory, if it is one and lies inside the root."""
        real = self._resolve(os.path.join(repo, "manifests"))
        return real if real and os.path.isdir(real) else None

    def manifest(self, name, reference, ns=None):
        return self.locate_manifest(name, reference, ns)[0]

    def locate_manifest(self, name, reference, ns=None):
        """(Manifest, the path it was read from, the identity of the file read, and the
        paths that, were they to appear, would be looked at before it)."""
        candidates = self._repo_candidates(name, ns)
        repos = [repo for _, repo in candidates if repo]
        for attempt in range(TAG_LOOKUPS):
            passed = []
            for candidate, repo in candidates:
                path = os.path.join(repo or candidate, "manifests", reference)
                if repo is None:
                    passed.append(path)
                    continue
                real = self._resolve(path)
                found, identity = self._load_manifest(real) if real else (None, None)
                if found and is_digest(reference) and not self._matches(found, reference):
                    self.warn_once(("mismatch", real, reference), found.digest, logging.ERROR,
                                   "manifest %s does not hash to %s; not served", real,
                                   reference)
                    found = None
                if found:
                    return found, path, identity, passed
                passed.append(path)
            if is_digest(reference) or not any(map(self._being_written, repos)):
                break
            # tar replaces a tag by removing it and then making the new one: a tag missing
            # from a folder that is being written to may be back in a moment.
            time.sleep(TAG_LOOKUP_PAUSE)
        raise RegistryError(HTTPStatus.NOT_FOUND, "MANIFEST_UNKNOWN", "manifest unknown",
                            {"name": name, "reference": reference})

    @staticmethod
    def _being_written(repo):
        try:
            changed = os.stat(os.path.join(repo, "manifests")).st_mtime
        except OSError:
            return False
        return abs(time.time() - changed) < 2

    @staticmethod
    def _matches(found, digest):
        algorithm = digest.partition(":")[0]
        return found.digest == digest or digest_of(found.body, algorithm) == digest

    def _load_manifest(self, real):
        """(The Manifest at real, None if missing or unservable; the identity of the file
        it was read from), cached by file identity.

        A regular file whose identity is cached costs one stat; only a file not seen
        before, or changed, is opened (as a regular file, checked again) and read.
        """
        try:
            st = os.stat(real)
        except OSError:
            return None, None
        identity = stat_identity(st)
        manifest = self._manifests.get(real, identity) if stat.S_ISREG(
            st.st_mode) else IdentityCache.MISSING
        if manifest is not IdentityCache.MISSING:
            return manifest, identity
        try:
            f, st = open_regular(real)
        except NotRegularFile:
            self.warn_once(("irregular", real), None, logging.ERROR,
                           "manifest %s is not a regular file; not served", real)
            self.metrics.add(("manifests_refused",))
            return None, None
        except OSError:
            return None, None
        with f:
            manifest = self._read_manifest(f, real)
        self._manifests.put(real, stat_identity(st), manifest)
        return manifest, stat_identity(st)

    def _read_manifest(self, f, real):
        try:
            return parse_manifest(f.read(MAX_MANIFEST_BYTES + 1), real)[0]
        except OSError as error:
            problem = "cannot be read: %s" % error.strerror
        except ManifestProblem as error:
            problem = str(error)
        log.error("manifest %s %s; not served", real, problem)  # once: the result is cached
        self.metrics.add(("manifests_refused",))
        return None

    def open_blob(self, name, digest, ns=None):
        """The Blob, open, or RegistryError BLOB_UNKNOWN (also for one known to be corrupt)."""
        for repo in self.repo_dirs(name, ns):
            real = self._resolve(os.path.join(blob_store(self.root, repo), digest))
            if not real:
                continue
            try:
                f, st = open_regular(real)
            except NotRegularFile:
                self.warn_once(("irregular", real), None, logging.ERROR,
                               "blob %s is not a regular file; not served", real)
                continue
            except OSError:
                continue
            identity = stat_identity(st)
            verdict = self._blob_verdicts.get(digest, real, identity)
            if verdict is not False:
                return Blob(f, st.st_size, real, identity, digest, verdict is True)
            self.warn_once(("corrupt", real, digest), identity, logging.WARNING,
                           "blob %s does not hash to %s; not served", real, digest)
            f.close()
        raise blob_unknown(name, digest)

    def record_verdict(self, blob, actual_digest):
        """Remember whether blob hashed to its name; a corrupt one is not served again."""
        sound = actual_digest == blob.digest
        self._blob_verdicts.put(blob.digest, blob.path, blob.identity, sound)
        self.metrics.add(("verifications", "sound" if sound else "corrupt"))
        if not sound:
            self.warn_once(("corrupt", blob.path, blob.digest), blob.identity, logging.ERROR,
                           "blob %s hashes to %s, not to %s: corrupt, no longer served",
                           blob.path, actual_digest, blob.digest)
        return sound

    def verify_blob(self, blob):
        """Hash a whole blob now (for small ones, before any byte is sent)."""
        algorithm = blob.digest.partition(":")[0]
        blob.file.seek(0)
        sound = self.record_verdict(blob, digest_of_file(blob.file, algorithm))
        blob.file.seek(0)
        return sound

    def referrers(self, name, digest, ns=None):
        """Descriptors of every manifest of the repository whose subject is digest."""
        found = {}
        for repo in self.repo_dirs(name, ns):
            manifests = self.manifests_dir(repo)
            for descriptor in self._referrer_index(manifests).get(digest, []) if manifests \
                    else []:
                found.setdefault(descriptor["digest"], descriptor)
        return [found[d] for d in sorted(found)]

    def _referrer_index(self, manifests):
        """{subject digest: [descriptor]} of a manifests folder. Built once per identity of
        the folder, whose mtime changes whenever a manifest is added, removed or renamed
        in it: a request costs one stat, not a scan of thousands of manifests."""
        identity = file_identity(manifests)
        index = self._referrers.get(manifests, identity)
        if index is IdentityCache.MISSING:
            index = collections.defaultdict(list)
            for name in sorted(os.listdir(manifests)) if identity else []:
                real = is_valid_digest(name) and self._resolve(os.path.join(manifests, name))
                manifest = real and self._load_manifest(real)[0]
                document = json.loads(manifest.body) if manifest else {}
                if isinstance(document, dict) and subject_of(document):
                    index[subject_of(document)].append(referrer_descriptor(manifest, document))
            self._referrers.put(manifests, identity, index)
        return index

    def tags(self, name, ns=None):
        """Every tag of the repository; NAME_UNKNOWN if none of its directories has a
        manifests folder inside the root that can be listed."""
        tags, listed = set(), False
        for repo in self.repo_dirs(name, ns):
            manifests = self.manifests_dir(repo)
            try:
                entries = os.listdir(manifests) if manifests else None
            except OSError as error:
                self.warn_once(("unlisted", manifests), None, logging.WARNING,
                               "cannot list %s: %s", manifests, error.strerror)
                continue
            if entries is not None:
                listed = True
                tags.update(e for e in entries if TAG_RE.fullmatch(e))
        if not listed:
            raise RegistryError(HTTPStatus.NOT_FOUND, "NAME_UNKNOWN",
                                "repository name not known to registry", {"name": name})
        return sorted(tags)

    def repositories(self):
        """Every repository whose manifests folder lies inside the root, by name."""
        return sorted(name for name, top in find_repositories(self.root, self._walk_problem)
                      if self.manifests_dir(top))

    def _walk_problem(self, path, message):
        self.warn_once(("walk", path), None, logging.WARNING, "%s %s", path, message)


def _namespaced(name):
    host, _, rest = name.partition("/")
    return bool(rest) and HOST_RE.fullmatch(host) and NAME_RE.fullmatch(rest)


# --- Offline integrity check (--check) ---------------------------------------------------

class TreeCheck:
    """Verify a whole tree without serving it: what an operator runs after extracting it."""

    def __init__(self, root, deep=False):
        self.root = os.path.realpath(root)
        self.deep = deep
        self.problems = []
        self.counts = collections.Counter()
        self._blobs_seen = {}
        self._manifests_seen = {}  # real path -> whether it is sound
        # What is present and sound: digest -> repositories, and digest -> size.
        self.inventory = {"manifests": collections.defaultdict(set), "blobs": {}}

    def problem(self, path, message):
        self.problems.append({"path": path, "problem": message})

    def run(self):
        for top, entries in walk_tree(self.root, self._descend, self.problem):
            for entry in entries:
                self._check_entry(entry.path, entry.name)
            if any(entry.name == "manifests" for entry in entries):
                self._check_repository(top)
        return self

    def _repository_name(self, repo_dir):
        """The name a repository is served by, or None: a path part named blobs or
        manifests is the tree's own folder, which the server never looks into."""
        name = os.path.relpath(repo_dir, self.root).replace(os.sep, "/")
        if {"blobs", "manifests"} & set(name.split("/")):
            return None
        return name if NAME_RE.fullmatch(name) or _namespaced(name) else None

    @staticmethod
    def _descend(entry):
        # A repository's manifests/ is listed by _check_repository; hidden folders are
        # the downloader's work folders, reported by _check_entry.
        return entry.name != "manifests" and not entry.name.startswith(".")

    def _check_entry(self, path, name):
        if name.startswith(".") and (name.endswith(".tmp") or name.startswith(".incoming-")):
            self.problem(path, "temporary file left by an interrupted download; remove it")
        elif os.path.islink(path) and not os.path.exists(path):
            self.problem(path, "dangling symlink to %s" % os.readlink(path))
        elif os.path.islink(path) and not lies_within(self.root, real_path(path) or ""):
            self.problem(path, "symlink leads outside the root; the server will not follow it")

    def _check_repository(self, repo_dir):
        manifests = os.path.join(repo_dir, "manifests")
        if not lies_within(self.root, real_path(manifests) or ""):
            return  # reported by _check_entry as a link leading outside
        repository = self._repository_name(repo_dir)
        if repository is None:
            self.problem(repo_dir, "holds manifests but is not a valid repository name "
                                   "(lowercase, digits, separators): never served")
            return
        try:
            names = sorted(os.listdir(manifests))
        except OSError as error:
            self.problem(manifests, "cannot be listed: %s" % error.strerror)
            return
        self.counts["repositories"] += 1
        for name in names:
            path = os.path.join(manifests, name)
            self._check_entry(path, name)
            if name.startswith(".") or not self._reachable(path):
                continue
            if TAG_RE.fullmatch(name):
                self.counts["tags"] += 1
            elif is_valid_digest(name):
                self.counts["manifests"] += 1
            else:
                self.problem(path, "neither a tag nor a digest: never served")
                continue
            # A manifest is judged once per repository: its blobs are looked up in each
            # repository's own blobs folder.
            seen = (repo_dir, real_path(path))
            if seen not in self._manifests_seen:  # else a tag naming one checked already
                self._manifests_seen[seen] = self._check_manifest(repo_dir, path)
            if self._manifests_seen[seen] and is_valid_digest(name):
                self.inventory["manifests"][name].add(repository)

    def _reachable(self, path):
        """Whether path can be looked up; a missing target or a loop is reported by
        _check_entry, anything else (a folder that may be listed but not searched) here."""
        try:
            os.stat(path)
            return True
        except OSError as error:
            if error.errno not in (errno.ENOENT, errno.ELOOP):
                self.problem(path, "cannot be read: %s" % error.strerror)
            return False

    def _check_manifest(self, repo_dir, path):
        """Whether the manifest at path is sound; what it names is checked as well."""
        try:
            document = load_manifest(path)[1]
            children, blobs = document_references(document)
        except ManifestProblem as problem:
            self.problem(path, str(problem))
            return False
        subject = subject_of(document)
        if subject and not os.path.isfile(os.path.join(repo_dir, "manifests", subject)):
            self.problem(path, "refers to subject %s, which is not in the repository" % subject)
        self._check_children(repo_dir, path, children)
        return all([self._check_blob(repo_dir, path, descriptor) for descriptor in blobs])

    def _check_children(self, repo_dir, path, children):
        # The downloader keeps only the requested platforms' children: absent ones are
        # counted, and only an index with none of its children is a problem.
        present = [c for c in children
                   if os.path.isfile(os.path.join(repo_dir, "manifests", c["digest"]))]
        self.counts["platforms not downloaded"] += len(children) - len(present)
        if children and not present:
            self.problem(path, "none of the index's child manifests is in the tree (%s)" % (
                ", ".join(describe_platform(c.get("platform")) for c in children)))

    def _check_blob(self, repo_dir, path, descriptor):
        digest = descriptor["digest"]
        blob = real_path(os.path.join(blob_store(self.root, repo_dir), digest)) or ""
        if (blob, digest) not in self._blobs_seen:  # a verdict holds for one digest only
            self._blobs_seen[blob, digest] = self._verify_blob(blob, descriptor)
            self.counts["blobs"] += 1
        if self._blobs_seen[blob, digest]:
            self.problem(path, "blob %s %s" % (digest, self._blobs_seen[blob, digest]))
            return False
        self.inventory["blobs"][digest] = descriptor["size"]
        return True

    def _verify_blob(self, blob, descriptor):
        """None if the blob is sound, else what is wrong with it."""
        if not lies_within(self.root, blob):
            return "is missing"
        try:
            f, st = open_regular(blob)
        except FileNotFoundError:
            return "is missing"
        except OSError as error:
            return "cannot be read: %s" % error.strerror
        with f:
            if st.st_size != descriptor["size"]:
                return "is %d bytes, %s declared" % (st.st_size, descriptor["size"])
            if not self.deep:
                return None
            try:
                actual = digest_of_file(f, descriptor["digest"].partition(":")[0])
            except OSError as error:
                return "cannot be read: %s" % error.strerror
        return None if actual == descriptor["digest"] else "does not hash to its digest (damaged)"

    def report(self):
        lines = ["%s: %s" % (p["path"], p["problem"]) for p in self.problems]
        lines.append("checked %d repositories, %d tags, %d manifests, %d blobs%s "
                     "(%d platforms not downloaded): %s" % (
            self.counts["repositories"], self.counts["tags"], self.counts["manifests"],
            self.counts["blobs"], " (hashed)" if self.deep else "",
            self.counts["platforms not downloaded"],
            "%d problems" % len(self.problems) if self.problems else "no problems"))
        return "\n".join(lines)

    def as_json(self):
        inventory = {
            "manifests": {digest: sorted(repositories) for digest, repositories
                          in sorted(self.inventory["manifests"].items())},
            "blobs": dict(sorted(self.inventory["blobs"].items()))}
        return json.dumps({"root": self.root, "ok": not self.problems, "deep": self.deep,
                           "counts": dict(self.counts), "problems": self.problems,
                           "inventory": inventory}, indent=2)


def describe_platform(platform):
    platform = platform if isinstance(platform, dict) else {}
    return "/".join(platform[k] for k in ("os", "architecture", "variant")
                    if platform.get(k)) or "no platform"


# --- Garbage collection (--gc) ----------------------------------------------------------

# What --gc needs of a manifest: its digest and the digests it names.
ManifestLinks = collections.namedtuple("ManifestLinks", "digest subject children blobs")
# One repository's manifests folder, under every name (and folder) that leads to it.
Repository = collections.namedtuple("Repository", "names directories tags digests")


class GarbageCollection:
    """Remove what no kept image needs: tags no kept reference names (with --keep), then
    manifests no remaining tag reaches, then blobs no remaining manifest names, then
    repositories left empty.

    Only deletions, in that order, and a manifest only after every manifest that points
    to it (an index before its children, a signature before what it signs), so the
    tree is sound at every step: killed at any point, it passes --check, and running it
    again completes the work. What is reached is judged by real file, so a link from one
    repository into another keeps what it leads to. A blob that is being served keeps
    streaming to its client after its name is removed (POSIX unlink).
    """

    def __init__(self, root, keep=None, dry_run=False):
        self.root = os.path.realpath(root)
        self.keep = keep  # [KeptImage], or None to keep every tag
        self.dry_run = dry_run
        self.removed = []  # {"kind", "path", "bytes"}
        self.warnings = []
        self._kept_digests = []  # (Repository, digest) kept by a reference by digest
        self._read = {}  # path -> ManifestLinks, or the ManifestProblem it has

    def run(self):
        repositories = self._repositories()
        if self.keep is not None:
            self._remove_tags(repositories)
        live, blobs, unreadable = self._reachable(repositories)
        if self.keep is not None:
            self._remove_artifact_tags(repositories, live)
        self._remove_manifests(repositories, live)
        if unreadable:  # what an unreadable manifest names is unknown: keep every blob
            self.warnings.append("blobs kept: %d manifests a tag reaches cannot be read (%s)"
                                 % (len(unreadable), unreadable[0]))
        else:
            self._remove_blobs(repositories, blobs)
        for repository in repositories:
            if not repository.tags and not repository.digests:
                for directory in repository.directories:
                    self._remove_repository(directory)
        if not self.dry_run:
            self._remove_empty_folders()
        return self

    def _repositories(self):
        by_folder = collections.OrderedDict()
        for name, top in find_repositories(self.root, self._warn):
            manifests = real_path(os.path.join(top, "manifests"))
            if not lies_within(self.root, manifests or ""):
                continue
            if manifests in by_folder:  # another name for the same folder
                by_folder[manifests].names.append(name)
                by_folder[manifests].directories.append(top)
                continue
            try:
                entries = sorted(os.listdir(manifests))
            except OSError as error:
                self._warn(manifests, "cannot be listed: %s" % error.strerror)
                continue
            by_folder[manifests] = Repository(
                [name], [top],
                {e: os.path.join(manifests, e) for e in entries if TAG_RE.fullmatch(e)},
                {e: os.path.join(manifests, e) for e in entries if is_valid_digest(e)})
        return list(by_folder.values())

    def _warn(self, path, message):
        self.warnings.append("%s %s" % (path, message))

    def _remove_tags(self, repositories):
        by_name = {name: r for r in repositories for name in r.names}
        kept = set()  # (id of a Repository, tag)
        for image in self.keep:
            reference = image.tag or image.digest
            present = [by_name[name] for name in image.repositories if name in by_name and
                       reference in (by_name[name].tags if image.tag else by_name[name].digests)]
            if not present:
                self.warnings.append("kept image %s%s%s (%s) is not in the tree" % (
                    image.repositories[0], ":" if image.tag else "@", reference, image.where))
            for repository in present:
                kept.add((id(repository), reference))
                if not image.tag:
                    self._kept_digests.append((repository, reference))
        for repository in repositories:
            for tag in list(repository.tags):
                # A signature's or SBOM's tag goes with the manifest it names (below).
                if (id(repository), tag) not in kept and not ARTIFACT_TAG_RE.fullmatch(tag):
                    self._remove("tag", repository.tags.pop(tag))

    def _remove_artifact_tags(self, repositories, live):
        """Tags of signatures, attestations, SBOMs and referrer indexes whose manifest
        is no longer kept."""
        for repository in repositories:
            for tag in list(repository.tags):
                match = ARTIFACT_TAG_RE.fullmatch(tag)
                target = match and repository.digests.get("%s:%s" % match.groups())
                if match and real_path(target or "") not in live:
                    self._remove("tag", repository.tags.pop(tag))

    def _reachable(self, repositories):
        """({real manifest file}, {real blob file}, [unreadable manifest]) of everything
        the remaining tags, and the digests kept by reference, reach; and of what refers
        to what is reached (a signature, an SBOM, a signature on that)."""
        pending = [(r, path) for r in repositories for tag, path in r.tags.items()
                   if self.keep is None or not ARTIFACT_TAG_RE.fullmatch(tag)]
        pending += [(r, r.digests[digest]) for r, digest in self._kept_digests]
        referrers = {id(r): self._referrers_by_subject(r) for r in repositories}
        live, blobs, unreadable = set(), set(), []
        while pending:
            repository, path = pending.pop()
            real = real_path(path)
            if (id(repository), real) in live:
                continue
            live.add((id(repository), real))
            try:
                links = self._manifest(path)
            except ManifestProblem as problem:
                unreadable.append("%s %s" % (path, problem))
                continue
            pending += [(repository, repository.digests[child]) for child in links.children
                        if child in repository.digests]
            for digest in {links.digest, os.path.basename(real or "")}:
                pending += [(repository, p) for p in referrers[id(repository)].get(digest, [])]
            for directory in repository.directories:
                store = blob_store(self.root, directory)
                blobs.update(real_path(os.path.join(store, d)) for d in links.blobs)
        return {real for _, real in live}, blobs, unreadable

    def _manifest(self, path):
        """What the manifest at path links to, read once however many steps ask (and
        only that is kept: a tree's manifests need not all be in memory at once);
        ManifestProblem if it cannot be served."""
        if path not in self._read:
            try:
                manifest, document = load_manifest(path)
                children, descriptors = document_references(document)
                self._read[path] = ManifestLinks(
                    manifest.digest, subject_of(document), [c["digest"] for c in children],
                    [d["digest"] for d in descriptors])
            except ManifestProblem as problem:
                self._read[path] = problem
        if isinstance(self._read[path], ManifestProblem):
            raise self._read[path]
        return self._read[path]

    def _referrers_by_subject(self, repository):
        """{subject digest: [paths]}: manifests with an OCI 1.1 subject, and those an
        artifact tag (sha256-<hex>.sig, ...) names, by the manifest they are of."""
        found = collections.defaultdict(list)
        for tag, path in repository.tags.items():
            match = ARTIFACT_TAG_RE.fullmatch(tag)
            if match:
                found["%s:%s" % match.groups()].append(path)
        for path in repository.digests.values():
            with contextlib.suppress(ManifestProblem):
                subject = self._manifest(path).subject
                if subject:
                    found[subject].append(path)
        return found

    def _remove_manifests(self, repositories, live):
        """Every digest-named manifest no remaining tag reaches, each only once no other
        one about to go points to it."""
        for repository in repositories:
            doomed = {digest: path for digest, path in repository.digests.items()
                      if real_path(path) not in live}
            points_to = {digest: self._points_to(path) for digest, path in doomed.items()}
            while doomed:
                pointed_at = set().union(*(points_to[d] for d in doomed))
                ready = sorted(d for d in doomed if d not in pointed_at) or sorted(doomed)
                for digest in ready:
                    self._remove("manifest", repository.digests.pop(digest))
                    del doomed[digest]

    def _points_to(self, path):
        """The digests a manifest names as children or as its subject."""
        try:
            links = self._manifest(path)
        except ManifestProblem:
            return set()
        return set(links.children) | {links.subject} - {None}

    def _remove_blobs(self, repositories, live):
        stores = {real_path(blob_store(self.root, directory))
                  for r in repositories for directory in r.directories}
        # Only folders that are blob stores: a blobs link that leads elsewhere (into a
        # manifests folder, say) names no blobs to remove.
        for store in sorted(s for s in stores if s and lies_within(self.root, s)
                            and os.path.basename(s) == "blobs"):
            try:
                names = sorted(os.listdir(store))
            except OSError as error:
                self._warn(store, "cannot be listed: %s" % error.strerror)
                continue
            for name in names:
                path = os.path.join(store, name)
                if is_valid_digest(name) and real_path(path) not in live:
                    self._remove("blob", path)

    def _remove(self, kind, path):
        """Unlink one name (a link itself, never what it points to); record it."""
        try:
            st = os.lstat(path)
            if not self.dry_run:
                os.unlink(path)
        except OSError as error:
            self._warn(path, "cannot be removed: %s" % error.strerror)
            return
        size = st.st_size if stat.S_ISREG(st.st_mode) and st.st_nlink <= 1 else 0
        self.removed.append({"kind": kind, "path": path, "bytes": size})

    def _remove_repository(self, directory):
        """A repository with no manifests left: its manifests folder goes (the rest with
        the empty folders, next)."""
        manifests = os.path.join(directory, "manifests")
        try:
            if not self.dry_run:
                os.rmdir(manifests)  # only if empty: a file written meanwhile keeps it
        except OSError as error:
            self._warn(manifests, "cannot be removed: %s" % error.strerror)
            return
        self.removed.append({"kind": "repository", "path": directory, "bytes": 0})

    def _remove_empty_folders(self):
        """Folders that hold nothing but a blobs link, deepest first: what a removed
        repository leaves, and what an interrupted run left behind."""
        folders = [top for top, _ in walk_tree(self.root, names_a_repository_part, self._warn)]
        for folder in reversed(folders[1:]):  # children before their parents; not the root
            with contextlib.suppress(OSError):
                link = os.path.join(folder, "blobs")
                entries = os.listdir(folder)
                if entries == ["blobs"] and os.path.islink(link):
                    os.unlink(link)
                    entries = []
                if not entries:
                    os.rmdir(folder)

    def counts(self):
        return collections.Counter(item["kind"] for item in self.removed)

    def freed(self):
        return sum(item["bytes"] for item in self.removed)

    def report(self):
        verb = "would remove" if self.dry_run else "removed"
        lines = ["%s %s %s" % (verb, item["kind"], item["path"]) for item in self.removed]
        lines += ["warning: %s" % warning for warning in self.warnings]
        counts = self.counts()
        lines.append("gc: %s %d tags, %d manifests, %d blobs, %d repositories: %s freed" % (
            verb, counts["tag"], counts["manifest"], counts["blob"], counts["repository"],
            human_bytes(self.freed())))
        return "\n".join(lines)

    def as_json(self):
        return json.dumps({"root": self.root, "dry_run": self.dry_run,
                           "counts": dict(self.counts()), "bytes_freed": self.freed(),
                           "removed": self.removed, "warnings": self.warnings}, indent=2)


def human_bytes(count):
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return "%.1f %s" % (count, unit) if unit != "B" else "%d B" % count
        count /= 1000.0


# --- The HTTP handler: one request, one route ----------------------------------------

class BlobError(Exception):
    """A blob cannot be sent whole and sound; the connection is cut before its end."""


class BlobBody:
    """A byte range of an open blob, sent by copyfile().

    With a tree to report to, the whole blob is hashed as it streams and the final
    chunk is released only if the digest matches: no client receives a complete
    corrupt blob, and the verdict is remembered for the file.
    """

    def __init__(self, blob, start, length, verify_for=None):
        self.blob = blob
        self.remaining = length
        self.sent = 0
        self.tree = verify_for
        self.hash = hashlib.new(blob.digest.partition(":")[0]) if verify_for else None
        if start:
            blob.file.seek(start)

    def send(self, out, sock):
        """Send the range through out, the buffered writer over sock."""
        if self.remaining and self.hash is None and not isinstance(sock, ssl.SSLSocket):
            out.flush()  # the headers go first
            # Plain HTTP, nothing to hash: the kernel sends straight from the page cache.
            start = self.blob.file.tell()
            try:
                sock.sendfile(self.blob.file, start, self.remaining)
            finally:  # sendfile leaves the file just past what it sent, even when cut
                self.sent = self.blob.file.tell() - start
                self.remaining -= self.sent
        else:
            self.copy_to(out)
        if self.remaining:
            raise BlobError("blob %s ended %d bytes early (truncated while served)" % (
                self.blob.path, self.remaining))

    def copy_to(self, out):
        # One buffer reused for the whole blob: no allocation or page faults per chunk.
        buffer = page_offset_buffer(max(1, min(COPY_CHUNK, self.remaining)))
        while self.remaining:
            count = self.blob.file.readinto(buffer[:min(len(buffer), self.remaining)])
            if not count:
                return
            self.remaining -= count
            if self.hash:
                self.hash.update(buffer[:count])
                if not self.remaining and not self.tree.record_verdict(
                        self.blob, "%s:%s" % (self.hash.name, self.hash.hexdigest())):
                    raise BlobError("blob %s is corrupt; its final chunk was held back" %
                                    self.blob.path)
            out.write(buffer[:count])
            self.sent += count

    def close(self):
        self.blob.file.close()


@contextlib.contextmanager
def corked(sock):
    """While a blob streams, TCP sends only full segments. OpenSSL writes each 16 KiB TLS
    record on its own, so an uncorked socket makes every record a packet of its own,
    for both ends to handle; leaving the block (or failing) sends what is held."""
    tcp = sock.family in (socket.AF_INET, socket.AF_INET6) and hasattr(socket, "TCP_CORK")

    def cork(on):
        if tcp:
            with contextlib.suppress(OSError):  # a reset shows at the next send instead
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, on)

    cork(1)
    try:
        yield
    finally:
        cork(0)


class DeadlineReader(io.RawIOBase):
    """A connection's read side. While a deadline is set, each receive gets only the
    time left, so a request trickled in a byte at a time (slow loris) still times out."""

    def __init__(self, sock):
        self.sock = sock
        self.deadline = None
        self.timed_out = False  # the last deadline passed: a header timeout
        self.timeout = sock.gettimeout()
        # A plain socket's descriptor, read without a poll() while data is waiting.
        self.fd = None if isinstance(sock, ssl.SSLSocket) else sock.fileno()
        self.before_waiting = None  # called when a read is about to wait for the client

    def readable(self):
        return True

    def set_timeout(self, seconds):
        """The connection's timeout, set only when it changes: socket.settimeout() makes a
        system call and lets another thread take the GIL, on every call."""
        if seconds != self.timeout:
            self.sock.settimeout(seconds)
            self.timeout = seconds

    def readinto(self, buffer):
        try:
            if self.deadline is not None:
                left = self.deadline - time.monotonic()
                if left <= 0:
                    raise socket.timeout("request headers not complete in time")
                self.set_timeout(left)
            if self.fd is not None:  # what has arrived is taken in one system call
                with contextlib.suppress(BlockingIOError):
                    return os.readv(self.fd, [buffer])
            if self.before_waiting:
                self.before_waiting()
            return self.sock.recv_into(buffer)
        except socket.timeout:
            self.timed_out = self.deadline is not None
            raise


class HeadReader(io.BufferedReader):
    """A connection's buffered read side. While head_left is set (a request's headers are
    being read), the lines read may not add up to more: past it, LineTooLong, which the
    base class answers with 431. Headers of many long lines cannot pile up in memory."""

    head_left = None

    def readline(self, limit=-1):
        if self.head_left is None:
            return super().readline(limit)
        cap = self.head_left + 1 if limit is None or limit < 0 else min(limit, self.head_left + 1)
        line = super().readline(max(cap, 0))
        self.head_left -= len(line)
        if self.head_left < 0:
            raise http.client.LineTooLong("request line and headers over %d bytes"
                                          % MAX_REQUEST_HEAD)
        return line


class SecondCache:
    """A text that changes once a second (a Date header, a log line's time), made once
    a second instead of once a request."""

    def __init__(self, make):
        self._make = make
        self._made = (None, "")

    def __call__(self, now):
        second = int(now)
        made = self._made  # one read: threads may replace it meanwhile
        if made[0] != second:
            made = self._made = (second, self._make(second))
        return made[1]


HTTP_DATE = SecondCache(lambda second: email.utils.formatdate(second, usegmt=True))


class AccessLog(logging.Filter):
    """The access log, written straight to the log's file descriptor: the very line that
    logging, as main() sets it up, would write, without a LogRecord, a handler lock and
    a flush per request.

    Lines wait while requests keep coming: they are written when a connection is about
    to wait for its next request (so never later than the client could notice), when
    many have gathered, at shutdown, and before any other line that logging writes (as
    the filter of its handler), so the log keeps its order.
    """

    MAX_PENDING = 256

    def __init__(self, stream, json_lines=False):
        super().__init__()
        self.fd = stream.fileno()
        self.json_lines = json_lines
        self._pending = []
        self._lock = threading.Lock()
        self._local_time = SecondCache(
            lambda second: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second)))
        self._utc_time = SecondCache(
            lambda second: time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))

    def filter(self, record):
        self.flush()
        return True

    def write(self, message, fields):
        now = time.time()
        msecs = int((now - int(now)) * 1000)  # as logging.LogRecord computes them
        if self.json_lines:
            entry = {"time": "%s.%03dZ" % (self._utc_time(now), msecs), "level": "info"}
            entry.update(fields)
            line = json.dumps(entry)
        else:
            line = "%s,%03d INFO %s" % (self._local_time(now), msecs, message)
        with self._lock:
            self._pending.append(line)
            full = len(self._pending) >= self.MAX_PENDING
        if full:
            self.flush()

    def flush(self):
        if not self._pending:
            return
        with self._lock:
            lines, self._pending = self._pending, []
        data = ("\n".join(lines) + "\n").encode("utf-8", "backslashreplace")
        with contextlib.suppress(OSError):  # as logging, a log that cannot be written
            while data:
                data = data[os.write(self.fd, data):]


# An answer to GET or HEAD of one manifest, whole but for its Date header: valid while
# the file it was read from keeps its identity and no path looked at before it appears.
PreparedAnswer = collections.namedtuple(
    "PreparedAnswer", "path identity passed head_start head_end body")


class PreparedAnswers:
    """The prepared answers of one server, by method and request target."""

    def __init__(self, size=MAX_PREPARED_ANSWERS):
        self._answers = {}
        self._size = size

    def get(self, method, target):
        """The answer, if it still holds: one stat of its file, one lstat per path passed."""
        answer = self._answers.get((method, target))
        if answer is None:
            return None
        try:
            identity = stat_identity(os.stat(answer.path))
        except OSError:
            return None
        if identity != answer.identity or any(map(os.path.lexists, answer.passed)):
            return None
        return answer

    def put(self, method, target, answer):
        if len(self._answers) >= self._size:
            self._answers.clear()  # a tree of more manifests than this: start over
        self._answers[method, target] = answer


class RegistryHandler(http.server.SimpleHTTPRequestHandler):
    """Answers registry reads; SimpleHTTPRequestHandler's do_GET/do_HEAD call send_head()."""

    protocol_version = "HTTP/1.1"
    server_version = "embedded-registry/" + __version__
    sys_version = ""
    # A buffered writer sends a manifest's headers and body in one segment; blob chunks
    # larger than the buffer go straight to the socket.
    wbufsize = 64 * 1024

    def __init__(self, *args, slot, **kwargs):
        self.slot = slot  # this connection's place among --max-connections
        self.requests = 0
        self.connection_announced = False  # whether this answer has a Connection header
        super().__init__(*args, **kwargs)

    def setup(self):
        self.connection = self.request
        # The server's family: the socket's .family builds an enum on every call.
        if self.server.address_family in (socket.AF_INET, socket.AF_INET6):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = DeadlineReader(self.connection)
        if self.server.access_log:
            self.reader.before_waiting = self.server.access_log.flush
        self.rfile = HeadReader(self.reader)
        self.wfile = self.connection.makefile("wb", self.wbufsize)
        self.slot.sock = self.connection

    def finish(self):
        try:
            super().finish()
        finally:
            if self.server.access_log:  # the connection's last lines, before it is gone
                self.server.access_log.flush()

    # Timeouts: a first request within the header deadline, idle between requests, a
    # deadline for the headers, then sending ------------------------------------------

    def handle_one_request(self):
        # A new connection has only the header deadline to begin: a socket that never
        # speaks must not hold a slot for the idle time a keep-alive client has earned.
        wait = self.server.idle_timeout if self.requests else self.server.header_timeout
        self.reader.set_timeout(wait)
        self.slot.waiting = True  # may be closed to make room, or at shutdown
        try:
            if not self.rfile.peek(1):
                self.close_connection = True
                return
        except socket.timeout:
            self.close_connection = True  # idle too long: a normal end, not worth a log line
            self.server.metrics.add(("timeouts", "idle" if self.requests else "header"))
            return
        except OSError:
            self.close_connection = True
            return
        finally:
            self.slot.waiting = False
        self.requests += 1
        self.reader.deadline = time.monotonic() + self.server.header_timeout
        self.route_kind, self.observed = "other", False
        self.response_status = self.response_bytes = 0
        if self.answer_prepared():
            return
        super().handle_one_request()
        if self.reader.timed_out:
            self.server.metrics.add(("timeouts", "header"))
        elif self.response_status and not self.observed:  # refused before any route
            self.server.metrics.observe_request("other", self.command or "other",
                                                self.response_status, 0.0, 0)

    def parse_request(self):
        self.rfile.head_left = MAX_REQUEST_HEAD - len(self.raw_requestline)
        try:
            if not super().parse_request():
                return False
        finally:
            self.rfile.head_left = self.reader.deadline = None
            self.reader.set_timeout(self.server.send_timeout)
        if self.request_version == "HTTP/0.9":  # "GET /v2/" alone: no client of ours
            self.send_error(HTTPStatus.BAD_REQUEST, "HTTP/0.9 is not supported")
            return False
        malformed = malformed_header(self.headers)
        if malformed is not None:
            self.send_error(HTTPStatus.BAD_REQUEST, "malformed header %r" % malformed[:100])
            return False
        if self.command in ("GET", "HEAD") and carries_body(self.headers):
            # Never read on as if the body were the next request (request smuggling).
            self.send_error(HTTPStatus.BAD_REQUEST, "a GET or HEAD request carries no body")
            return False
        return True

    def answer_prepared(self):
        """Answer a simple request for a manifest from its prepared answer, and say so;
        anything else is left, unread, to the base class."""
        buffered = self.rfile.peek(1)
        end = buffered.find(b"\r\n\r\n")
        match = end > 0 and SIMPLE_REQUEST_RE.fullmatch(buffered, 0, end + 4)
        if not match or UNUSUAL_HEADER_RE.search(match.group(3)):
            return False
        method, target = match.group(1).decode(), match.group(2).decode()
        answer = self.server.answers.get(method, target)
        if answer is None:
            return False
        started = time.monotonic()
        self.rfile.read(end + 4)
        self.command, self.path, self.request_version = method, target, "HTTP/1.1"
        self.close_connection = bool(CONNECTION_CLOSE_RE.search(match.group(3)))
        self.reader.deadline = None
        self.reader.set_timeout(self.server.send_timeout)
        self.route_kind, self.response_status = "manifest", HTTPStatus.OK.value
        self.response_bytes = len(answer.body) if method == "GET" else 0
        head_end = answer.head_end
        if self.close_connection:  # as end_headers() does: the last header before the blank line
            head_end = head_end[:-2] + b"Connection: close\r\n\r\n"
        data = answer.head_start + self.date_time_string().encode() + head_end
        try:
            self.send_at_once(data + answer.body if method == "GET" else data)
        except socket.timeout:  # the client stopped reading: as on the slow path
            self.server.metrics.add(("timeouts", "send"))
            raise
        if self.server.stopping:
            self.close_connection = True
        self.log_access(time.monotonic() - started)
        return True

    def send_at_once(self, data):
        """Send data, most often in one system call: a plain socket's descriptor (never
        blocking while the socket has a timeout) takes what fits at once, without the
        poll() that socket.send() makes first; the rest is sent within the timeout."""
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.sendall(data)
            return
        try:
            sent = os.write(self.connection.fileno(), data)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            self.connection.sendall(memoryview(data)[sent:])

    def date_time_string(self, timestamp=None):
        return HTTP_DATE(time.time() if timestamp is None else timestamp)

    # Dispatch ---------------------------------------------------------------------

    def do_GET(self):
        self._timed(super().do_GET)

    def do_HEAD(self):
        self._timed(super().do_HEAD)

    def refuse_write(self):
        def refuse():
            body = self.send_oci_error(RegistryError(
                HTTPStatus.METHOD_NOT_ALLOWED, "UNSUPPORTED", "this registry is read-only"))
            self.copyfile(body, self.wfile)
        self._timed(refuse)

    do_PUT = do_POST = do_PATCH = do_DELETE = refuse_write

    def send_head(self):
        try:
            route = parse_route(self.path)
            self.route_kind = route.kind
            return getattr(self, "serve_" + route.kind)(route)
        except RegistryError as error:
            return self.send_oci_error(error)

    # Routes -----------------------------------------------------------------------

    def serve_base(self, route):
        return self.send_bytes(HTTPStatus.OK, b"{}", "application/json")

    def serve_manifest(self, route):
        manifest, path, identity, passed = self.server.tree.locate_manifest(
            route.name, route.reference, route.ns)
        digest = route.reference if is_digest(route.reference) else manifest.digest
        headers = [("Docker-Content-Digest", digest), ("ETag", '"%s"' % digest)]
        body = self.send_bytes(HTTPStatus.OK, manifest.body, manifest.media_type, headers)
        # The next such request is answered with the same bytes, without the steps above.
        head_start, head_end = self.prepared_head(HTTPStatus.OK, manifest.media_type,
                                                  len(manifest.body), headers)
        self.server.answers.put(self.command, self.path, PreparedAnswer(
            path, identity, passed, head_start, head_end, manifest.body))
        return body

    def serve_blob(self, route):
        tree = self.server.tree
        blob = tree.open_blob(route.name, route.reference, route.ns)
        try:
            span = parse_range(self.headers.get("Range"), blob.size)
            # A whole GET, or a range that is the whole blob, hashes it: the first one,
            # or every one with --verify always. A small blob before its headers are sent.
            whole = span is None or span == (0, blob.size - 1)
            verify = (self.command == "GET" and whole
                      and (self.server.verify_always or not blob.verified))
            if verify and blob.size <= COPY_CHUNK:
                if not tree.verify_blob(blob):
                    raise blob_unknown(route.name, route.reference)
                verify = False
        except RegistryError:
            blob.file.close()
            raise
        size = blob.size
        headers = [("Docker-Content-Digest", route.reference), ("Accept-Ranges", "bytes"),
                   ("ETag", '"%s"' % route.reference)]
        if span is None:
            status, start, length = HTTPStatus.OK, 0, size
        else:
            status, start, length = HTTPStatus.PARTIAL_CONTENT, span[0], span[1] - span[0] + 1
            headers.append(("Content-Range", "bytes %d-%d/%d" % (span[0], span[1], size)))
        self.send_headers(status, "application/octet-stream", length, headers)
        return BlobBody(blob, start, length, tree if verify else None)

    def serve_tags(self, route):
        tags, more = paginate(self.server.tree.tags(route.name, route.ns), route.query)
        return self.send_listing({"name": route.name, "tags": tags}, more, tags)

    def serve_referrers(self, route):
        descriptors = self.server.tree.referrers(route.name, route.reference, route.ns)
        headers = []
        if "artifactType" in route.query:
            wanted = route.query["artifactType"][-1]
            descriptors = [d for d in descriptors if d.get("artifactType") == wanted]
            headers.append(("OCI-Filters-Applied", "artifactType"))
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                           "manifests": descriptors}).encode()
        return self.send_bytes(HTTPStatus.OK, body, OCI_INDEX, headers)

    def serve_catalog(self, route):
        names, more = paginate(self.server.tree.repositories(), route.query)
        return self.send_listing({"repositories": names}, more, names)

    # Responses --------------------------------------------------------------------

    def version_string(self):
        return self.server_version  # the base class appends sys_version after a space

    def send_header(self, keyword, value):
        super().send_header(keyword, value)
        if keyword.lower() == "connection":
            self.connection_announced = True

    def end_headers(self):
        # A client that asked to close (or a server about to) is told so in the answer,
        # as RFC 9112 asks: else the client sends its next request into a closed socket.
        if self.close_connection and not self.connection_announced:
            super().send_header("Connection", "close")
        self.connection_announced = False
        super().end_headers()

    def send_headers(self, status, content_type, length, headers=()):
        self.send_response(status)
        for key, value in self.header_list(content_type, length, headers):
            self.send_header(key, value)
        self.end_headers()

    @staticmethod
    def header_list(content_type, length, headers):
        return [("Content-Type", content_type), ("Content-Length", str(length)),
                API_VERSION_HEADER] + list(headers)

    def prepared_head(self, status, content_type, length, headers):
        """The bytes send_headers() sends, in two parts either side of the Date's value,
        which a prepared answer puts in anew each time."""
        start = "%s %d %s\r\nServer: %s\r\nDate: " % (
            self.protocol_version, status, status.phrase, self.version_string())
        end = "".join("\r\n%s: %s" % pair
                      for pair in self.header_list(content_type, length, headers))
        return start.encode("latin-1"), (end + "\r\n\r\n").encode("latin-1")

    def send_bytes(self, status, body, content_type, headers=()):
        self.send_headers(status, content_type, len(body), headers)
        return io.BytesIO(body)

    def send_listing(self, document, more, page):
        headers = []
        if more and page:
            split = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(split.query)
            query["last"] = [page[-1]]
            link = "%s?%s" % (split.path, urllib.parse.urlencode(query, doseq=True))
            headers.append(("Link", '<%s>; rel="next"' % link))
        return self.send_bytes(HTTPStatus.OK, json.dumps(document).encode(),
                               "application/json", headers)

    def send_oci_error(self, error):
        body = oci_error_body(error.code, error.message, error.detail)
        headers = list(getattr(error, "headers", []))
        if error.status == HTTPStatus.METHOD_NOT_ALLOWED:
            # The unread request body would corrupt the next request on this connection.
            headers += [("Allow", "GET, HEAD"), ("Connection", "close")]
        return self.send_bytes(error.status, body, "application/json", headers)

    def send_error(self, code, message=None, explain=None):
        """The base class's own errors (bad request line, 501, ...) as OCI JSON, closing."""
        self.log_error("code %d, message %s", code, message)
        self.send_closing_error(CLIENT_FAULT_STATUS.get(code, code), message)

    def send_closing_error(self, code, message=None):
        self.close_connection = True
        # Garbage parses as an HTTP/0.9 request, whose answers have no status line.
        self.request_version = "HTTP/1.1"
        status = HTTPStatus(code)
        body = oci_error_body(GENERIC_ERROR_CODES.get(status, "UNSUPPORTED"),
                              message or status.phrase)
        self.send_response(code, message)
        self.send_header("Connection", "close")
        if status == HTTPStatus.METHOD_NOT_ALLOWED:
            self.send_header("Allow", "GET, HEAD")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and code >= 200 and code not in (204, 304):
            self.wfile.write(body)
        self.response_bytes = len(body)

    def copyfile(self, source, outputfile):
        try:
            if isinstance(source, BlobBody):
                try:
                    with corked(self.connection):
                        source.send(outputfile, self.connection)
                finally:
                    self.response_bytes = source.sent  # what went out, if it was cut
            else:
                outputfile.write(source.getvalue())
                self.response_bytes = len(source.getvalue())
        except BlobError as error:
            log.error("%s %s", self.client_address[0], error)
            self.close_connection = True  # short of Content-Length: the client sees the cut

    # Logging ----------------------------------------------------------------------

    def _timed(self, method):
        started = time.monotonic()
        self.response_status = self.response_bytes = 0
        try:
            method()
        except socket.timeout:  # (TimeoutError since Python 3.10)
            self.server.metrics.add(("timeouts", "send"))
            raise  # the base class logs it and closes the connection
        except (ConnectionError, TimeoutError, ssl.SSLError):
            raise  # the client is gone: the server logs the closed connection
        except Exception as error:
            self.answer_failure(error)
        finally:
            if self.server.stopping:
                self.close_connection = True
            self.log_access(time.monotonic() - started)

    def log_access(self, seconds):
        """The request's access line, and its count in the metrics."""
        access_log = self.server.access_log
        message = "%s %s %s %s %d %.3fs" % (
            self.client_address[0], self.command, escape_for_log(self.path),
            self.response_status, self.response_bytes, seconds)
        fields = None
        if access_log is None or access_log.json_lines:  # only JSON lines show them apart
            fields = {"client": self.client_address[0], "method": self.command,
                      "path": self.path, "ns": ns_of(self.path),
                      "status": self.response_status, "bytes": self.response_bytes,
                      "seconds": round(seconds, 6)}
        if access_log:
            access_log.write(message, fields)
        else:
            log.info("%s", message, extra={"access": fields})
        self.observed = True
        self.server.metrics.observe_request(self.route_kind, self.command,
                                            self.response_status or 500, seconds,
                                            self.response_bytes)

    def answer_failure(self, error):
        """A fault of ours while answering: a 500 if no answer has begun, one log line
        with the cause, and the connection closed, since its state is unknown."""
        log.error("%s %s %s failed: %r", self.client_address[0], self.command,
                  escape_for_log(self.path), error, exc_info=log.isEnabledFor(logging.DEBUG))
        if self.response_status:
            self.close_connection = True
        else:
            self.send_closing_error(HTTPStatus.INTERNAL_SERVER_ERROR)

    def log_request(self, code="-", size="-"):
        self.response_status = int(code)

    def log_message(self, format, *args):
        # The base class reports clients' faults here (bad request lines, timeouts).
        log.info("%s %s", self.client_address[0], escape_for_log(format % args))


# --- The server: sockets, TLS, lifecycle -----------------------------------------------

class Slot:
    """One accepted connection's place among --max-connections.

    It is waiting while the connection has yet to send a first byte, of its TLS
    handshake or of its next request: only then may it be closed to make room for a
    new connection (as nginx reuses idle keep-alive connections) or at shutdown.
    """

    def __init__(self, sock):
        self.sock = sock
        self.waiting = True
        self.closed = False
        self.opened = time.monotonic()

    def close_under(self):
        """Shut the socket down under its reader, which then ends the connection."""
        self.closed = True
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)


class ConnectionThreads:
    """A thread for each connection, kept for a while once its connection ends: a new
    connection is then given to a waiting thread, not to a new one, whose start costs
    about as much as a small request."""

    keep = 16  # at most this many threads wait
    linger = 10.0  # seconds a thread waits before it ends

    def __init__(self, serve, keep=keep, linger=linger):
        self.serve = serve  # serve(*job), in a thread of its own
        self.keep = keep
        self.linger = linger
        self._jobs = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._free = 0  # threads that wait and have not been promised a job

    def run(self, *job):
        with self._lock:
            if self._free:
                self._free -= 1  # promised: the job is that thread's
                self._jobs.put(job)
                return
        threading.Thread(target=self._work, args=job, daemon=True).start()

    def _work(self, *job):
        while job:
            self.serve(*job)
            job = self._next_job()

    def _next_job(self):
        """The next job, or () when this thread should end."""
        with self._lock:
            if self._free >= self.keep:
                return ()
            self._free += 1
        while True:
            try:
                return self._jobs.get(timeout=self.linger)
            except queue.Empty:
                with self._lock:
                    if self._free:  # there are unpromised threads: one of them may end
                        self._free -= 1
                        return ()
                # every waiting thread is promised a job: this one's is on its way


class RegistryServer(http.server.ThreadingHTTPServer):
    """Owns the listening sockets, the TLS context and the tree; a thread per connection,
    kept for the next one."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address, tree, tls=None, *, max_connections=1024,
                 handshake_timeout=10.0, header_timeout=10.0, idle_timeout=60.0,
                 send_timeout=60.0, verify_always=False, handler_class=RegistryHandler,
                 metrics=None, workers=1):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.workers = workers
        self.listeners = []  # with workers, a listening socket for each (open_listeners)
        self.tree = tree
        self.tls = tls
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.send_timeout = send_timeout
        self.verify_always = verify_always
        self.metrics = metrics or NoMetrics()
        self.metrics_server = None  # the --metrics-listen server, if any
        self.answers = PreparedAnswers()
        self.access_log = None  # an AccessLog, where main() has set up the log
        self.stopping = False  # shutdown() was asked for: no new slot, no more keep-alive
        self._slots = set()
        self._slots_changed = threading.Condition()
        self._room_told = float("-inf")
        self.connection_threads = ConnectionThreads(self.process_request_thread)
        super().__init__(address, handler_class)

    def server_bind(self):
        if self.workers > 1:
            self._check_port_is_free()
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        # HTTPServer.server_bind() resolves the host name, which can hang without DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]
        if self.workers > 1:
            self.open_listeners()

    def _check_port_is_free(self):
        """Fail as a lone server does when the port is taken: SO_REUSEPORT would let this
        server share the port with another that set it too, and each get half the
        connections. A port of 0 becomes the free port found here."""
        with socket.socket(self.address_family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(self.server_address)
            self.server_address = probe.getsockname()

    def open_listeners(self):
        """A listening socket for each worker on the one port (SO_REUSEPORT): the kernel
        spreads new connections evenly over them, where on one shared socket a worker
        that wakes first may take them all. They are made here, before any worker, so
        the port answers from the start, and the supervisor keeps them, so a worker's
        replacement takes over the connections waiting on its socket."""
        self.listeners = [self.socket]
        for _ in range(self.workers - 1):
            listener = socket.socket(self.address_family, socket.SOCK_STREAM)
            self.listeners.append(listener)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            listener.bind(self.server_address)
            listener.listen(self.request_queue_size)

    def listen_on(self, row):
        """In worker row: accept on its own listening socket only."""
        self.socket = self.listeners[row]
        for listener in self.listeners:
            if listener is not self.socket:
                listener.close()

    def server_close(self):
        super().server_close()
        for listener in self.listeners:
            listener.close()

    @property
    def url(self):
        host, port = self.server_address[:2]
        host = "[%s]" % host if ":" in host else host
        return "%s://%s:%d" % ("https" if self.tls else "http", host, port)

    # Slots: at most max_connections at once, room made from waiting ones --------------

    def process_request(self, request, client_address):
        slot = self._take_slot(request)
        if slot is None:  # stopping
            self.shutdown_request(request)
            return
        self.connection_threads.run(request, client_address, slot)

    def _take_slot(self, request):
        """A slot for a new connection, or None once stopping; never waits past that."""
        with self._slots_changed:
            while len(self._slots) >= self.max_connections:
                if self.stopping:
                    return None
                self._make_room()
                self._slots_changed.wait(0.05)
            slot = Slot(request)
            self._slots.add(slot)
        self.metrics.add(("connections_total",))
        self.metrics.add(("connections_open",))
        return slot

    def _make_room(self):
        """Close the oldest connection that waits for a first byte; with none waiting,
        the new connection waits for a busy one to finish."""
        waiting = [slot for slot in self._slots if slot.waiting and not slot.closed]
        if not waiting:
            return
        now = time.monotonic()
        if now >= self._room_told + 60:  # under a flood, one line a minute
            self._room_told = now
            log.warning("all %d connections taken: closing those that have not sent a "
                        "request (see --max-connections)", self.max_connections)
        min(waiting, key=lambda slot: slot.opened).close_under()

    def process_request_thread(self, request, client_address, slot):
        try:
            self.finish_request(request, client_address, slot)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            with self._slots_changed:
                self._slots.discard(slot)
                self._slots_changed.notify_all()
            self.metrics.add(("connections_open",), -1)

    def finish_request(self, request, client_address, slot):
        """Runs in the connection's own thread, so a slow TLS handshake stalls no one else."""
        if self.tls is None:
            self.RequestHandlerClass(request, client_address, self, directory=self.tree.root,
                                     slot=slot)
            return
        request.settimeout(self.handshake_timeout)
        try:
            if not request.recv(1, socket.MSG_PEEK):  # waiting, until the first byte
                return
            slot.waiting = False
            tls = self.tls.current().wrap_socket(request, server_side=True)
        except (OSError, ValueError) as error:
            if not slot.closed:
                log.info("%s TLS handshake failed: %s", client_address[0], error)
                self.metrics.add(("handshake_failures", handshake_failure(error)))
                if isinstance(error, socket.timeout):
                    self.metrics.add(("timeouts", "handshake"))
            return
        try:
            self.RequestHandlerClass(tls, client_address, self, directory=self.tree.root,
                                     slot=slot)
        finally:
            self.shutdown_request(tls)

    # Shutdown: stop accepting, close waiting connections, let requests finish ---------

    def shutdown(self):
        with self._slots_changed:
            self.stopping = True
            self._slots_changed.notify_all()  # an accept loop waiting for a slot gives up
        super().shutdown()

    def drain(self, timeout):
        """After shutdown(): close waiting connections, let requests in flight finish;
        returns how many were still busy when the time was up."""
        self.stopping = True
        deadline = time.monotonic() + timeout
        while True:
            with self._slots_changed:
                slots = list(self._slots)
            if not slots or time.monotonic() >= deadline:
                return len(slots)
            for slot in slots:
                if slot.waiting:
                    slot.close_under()
            time.sleep(0.05)

    def handle_error(self, request, client_address):
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError, socket.timeout, ssl.SSLError)):
            log.info("%s connection closed: %s", client_address[0], error)
        else:
            log.error("%s request failed: %r", client_address[0], error,
                      exc_info=log.isEnabledFor(logging.DEBUG))


# --- Metrics (--metrics-listen): counters shared by the workers, served to Prometheus ----

class NoMetrics:
    """Without --metrics-listen: counting is one empty call."""

    def add(self, key, amount=1):
        pass

    def observe_request(self, route, method, code, seconds, sent):
        pass


class Metrics(NoMetrics):
    """The server's counters, every --workers process included.

    One anonymous shared mapping, made before the workers fork, holds a row of numbers
    for each process. A process adds to its own row only, under a lock of its own (its
    threads share the row), and a scrape, answered by whichever process accepts it, sums
    the rows. A worker that replaces another takes over its row, so counters never go
    back. Every series has its place in the row from the start: the label values are
    the fixed sets METRIC_ROUTES, METRIC_METHODS, METRIC_CODES and the like.
    """

    def __init__(self, processes=1):
        keys = [("requests", route, method, code) for route in METRIC_ROUTES
                for method in METRIC_METHODS for code in METRIC_CODES]
        for route in METRIC_ROUTES:
            keys += [("duration_bucket", route, n) for n in range(len(DURATION_BUCKETS) + 1)]
            keys += [("duration_sum", route), ("bytes", route)]
        keys += [("handshake_failures", reason) for reason in HANDSHAKE_FAILURES]
        keys += [("timeouts", kind) for kind in TIMEOUT_KINDS]
        keys += [("verifications", "sound"), ("verifications", "corrupt"),
                 ("manifests_refused",), ("tls_reloads", "success"), ("tls_reloads", "failure"),
                 ("connections_open",), ("connections_total",), ("pid",)]
        self._index = {key: n for n, key in enumerate(keys)}
        self._width, self._rows = len(keys), processes
        self._table = mmap.mmap(-1, processes * len(keys) * 8)
        self._values = memoryview(self._table).cast("d")
        self._base = 0
        self._lock = threading.Lock()
        self.started = time.time()
        self.supervisor = None  # the --workers parent, whose process figures count too
        self.tls = None  # the TlsCredentials whose certificate's expiry is shown
        self.take_row(0)

    def take_row(self, row):
        """Count in row from now on: a worker just forked, perhaps in a dead one's place,
        whose open connections ended with it."""
        self._base = row * self._width
        self._places = {}  # (route, method, code) -> where its request counts in the row
        self._lock = threading.Lock()  # one copied across a fork may have been held
        self._values[self._base + self._index["connections_open", ]] = 0
        self._values[self._base + self._index["pid", ]] = os.getpid()

    def add(self, key, amount=1):
        with self._lock:
            self._values[self._base + self._index[key]] += amount

    def observe_request(self, route, method, code, seconds, sent):
        places = self._places.get((route, method, code))
        if places is None:
            places = self._places[route, method, code] = self._request_places(
                route, method, code)
        requests, first_bucket, duration_sum, sent_bytes = places
        bucket = first_bucket + bisect.bisect_left(DURATION_BUCKETS, seconds)  # first le >=
        values, lock = self._values, self._lock
        # acquire() and release(), not a with statement: in a worker with 16 busy threads
        # the with statement cost a request 2 µs more (bench row 10's comparison).
        lock.acquire()
        try:
            values[requests] += 1
            values[bucket] += 1
            values[duration_sum] += seconds
            values[sent_bytes] += sent
        finally:
            lock.release()

    def _request_places(self, route, method, code):
        """The places in this process's row that one request of a kind adds to."""
        code, index, base = str(int(code)), self._index, self._base
        requests = index["requests", route, method if method in METRIC_METHODS else "other",
                         code if code in METRIC_CODES else "other"]
        return (base + requests, base + index["duration_bucket", route, 0],
                base + index["duration_sum", route], base + index["bytes", route])

    def _totals(self):
        """{key: the sum over every process's row}."""
        values = self._values.tolist()
        return {key: sum(values[row * self._width + n] for row in range(self._rows))
                for key, n in self._index.items()}

    def _pids(self):
        rows = self._values.tolist()[self._index["pid", ]::self._width]
        return [int(pid) for pid in rows if pid] + ([self.supervisor] if self.supervisor else [])

    def scrape(self):
        """The exposition of every metric, as of now."""
        totals = self._totals()

        def by(family, label, values, skip_zero=False):
            return [("", ((label, value),), totals[family, value]) for value in values
                    if totals[family, value] or not skip_zero]

        requests = [("", (("route", r), ("method", m), ("code", c)), totals["requests", r, m, c])
                    for r in METRIC_ROUTES for m in METRIC_METHODS for c in METRIC_CODES
                    if totals["requests", r, m, c]]
        families = [
            ("embedded_registry_http_requests_total", "counter",
             "Requests answered, by route, method and status code.", requests),
            ("embedded_registry_http_request_duration_seconds", "histogram",
             "Time from a request's first line to its last byte sent, by route.",
             self._histogram(totals)),
            ("embedded_registry_http_response_bytes_total", "counter",
             "Bytes of response bodies sent, by route.", by("bytes", "route", METRIC_ROUTES)),
            ("embedded_registry_connections_open", "gauge", "Client connections open now.",
             [("", (), totals["connections_open", ])]),
            ("embedded_registry_connections_total", "counter", "Client connections accepted.",
             [("", (), totals["connections_total", ])]),
            ("embedded_registry_tls_handshake_failures_total", "counter",
             "TLS handshakes that failed, by reason.",
             by("handshake_failures", "reason", HANDSHAKE_FAILURES)),
            ("embedded_registry_timeouts_total", "counter",
             "Connections ended by a timeout, by kind.", by("timeouts", "kind", TIMEOUT_KINDS)),
            ("embedded_registry_blob_verifications_total", "counter",
             "Blobs hashed while being sent, by result.",
             by("verifications", "result", ("sound", "corrupt"))),
            ("embedded_registry_manifests_refused_total", "counter",
             "Manifest files refused (damaged, unreadable, not regular files).",
             [("", (), totals["manifests_refused", ])]),
            ("embedded_registry_build_info", "gauge", "The server's version and Python's.",
             [("", (("version", __version__), ("python", "%d.%d.%d" % sys.version_info[:3])),
               1)]),
        ]
        if self.tls:
            families += [
                ("embedded_registry_tls_certificate_expiry_timestamp_seconds", "gauge",
                 "The notAfter of the certificate in use, in seconds since the epoch.",
                 [("", (), self.tls.not_after)] if self.tls.not_after else []),
                ("embedded_registry_tls_reloads_total", "counter",
                 "Certificate reloads, by result, as the busiest process counted them.",
                 [("", (("result", result),), max(self._values[
                     row * self._width + self._index["tls_reloads", result]]
                     for row in range(self._rows))) for result in ("success", "failure")]),
            ]
        return exposition(families + self._process_families())

    def _histogram(self, totals):
        samples = []
        for route in METRIC_ROUTES:
            counts = [totals["duration_bucket", route, n] for n in range(len(DURATION_BUCKETS) + 1)]
            if not sum(counts):
                continue
            for le, cumulative in zip(DURATION_BUCKETS + ("+Inf",), itertools.accumulate(counts)):
                samples.append(("_bucket", (("route", route), ("le", str(le))), cumulative))
            samples += [("_sum", (("route", route),), totals["duration_sum", route]),
                        ("_count", (("route", route),), sum(counts))]
        return samples

    def _process_families(self):
        """The standard process_* metrics, summed over the server's processes."""
        figures = [f for f in map(process_figures, self._pids()) if f]
        soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        families = [("process_max_fds", "gauge", "Open file descriptors allowed.",
                     [("", (), soft_limit)]),
                    ("process_start_time_seconds", "gauge",
                     "When the server started, in seconds since the epoch.",
                     [("", (), self.started)])]
        if figures:
            cpu, resident, fds = (sum(column) for column in zip(*figures))
            families += [
                ("process_cpu_seconds_total", "counter", "User and system CPU time spent.",
                 [("", (), cpu)]),
                ("process_resident_memory_bytes", "gauge", "Resident memory.",
                 [("", (), resident)]),
                ("process_open_fds", "gauge", "Open file descriptors.", [("", (), fds)])]
        return families


def process_figures(pid):
    """(CPU seconds, resident bytes, open descriptors) of a process, read from /proc;
    None where it cannot be read (gone, or no /proc)."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # after the command name
        with open("/proc/%d/statm" % pid, "rb") as f:
            resident_pages = int(f.read().split()[1])
        descriptors = len(os.listdir("/proc/%d/fd" % pid))
    except (OSError, IndexError, ValueError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return ((int(fields[11]) + int(fields[12])) / ticks,  # utime, stime
            resident_pages * mmap.PAGESIZE, descriptors)


class MetricsHandler(http.server.BaseHTTPRequestHandler):
    """GET /metrics, and nothing else."""

    protocol_version = "HTTP/1.1"
    server_version = RegistryHandler.server_version
    sys_version = ""
    timeout = 10  # a scraper that stalls holds a thread no longer

    def do_GET(self):
        if urllib.parse.urlsplit(self.path).path != "/metrics":
            body, status = b"see /metrics\n", HTTPStatus.NOT_FOUND
        else:
            body, status = self.server.metrics.scrape(), HTTPStatus.OK
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, format, *args):
        log.debug("metrics: %s %s", self.client_address[0], escape_for_log(format % args))


class MetricsServer(http.server.ThreadingHTTPServer):
    """The --metrics-listen socket: plain HTTP, apart from the registry's port."""

    daemon_threads = True
    workers = 1  # one socket, which the workers share: scrapes are few

    def __init__(self, address, metrics):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.metrics = metrics
        super().__init__(address, MetricsHandler)

    server_bind = RegistryServer.server_bind

    def handle_error(self, request, client_address):
        log.debug("metrics: %s %r", client_address[0], sys.exc_info()[1])


class ConfigError(Exception):
    """A problem with the command line or the files it names; main() reports it."""


def make_tls_context(cert, key, client_ca=None):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    for flag, path in (("--cert", cert), ("--key", key), ("--client-ca", client_ca)):
        try:  # a FIFO here would hang OpenSSL's own open, and with it a reload
            if path:
                open_regular(path)[0].close()
        except OSError as error:
            raise ConfigError("cannot read %s %s: %s" % (flag, path, error.strerror))
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError("cannot load certificate %s with key %s: %s" % (cert, key, error))
    if client_ca:
        try:
            context.load_verify_locations(client_ca)
        except (OSError, ssl.SSLError) as error:
            raise ConfigError("cannot load client CA %s: %s" % (client_ca, error))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class TlsCredentials:
    """The TLS context, rebuilt when its files change (or on SIGHUP).

    A new context serves new connections; open ones keep theirs. A broken new
    certificate or key is logged and the last good context stays in use.
    """

    check_interval = 1.0

    def __init__(self, cert, key, client_ca=None):
        self.files = (cert, key, client_ca)
        self.context = make_tls_context(*self.files)
        self.not_after = self._not_after()
        self._identity = self._identify()
        self._checked = time.monotonic()
        self._lock = threading.Lock()
        self.metrics = NoMetrics()

    def _not_after(self):
        """When the certificate just loaded expires (None if its file cannot say)."""
        try:
            f, _ = open_regular(self.files[0])
            with f:
                return certificate_not_after(f.read(MAX_MANIFEST_BYTES))
        except (OSError, ValueError) as error:
            log.warning("cannot read the expiry of %s: %s", self.files[0], error)
            return None

    def _identify(self):
        return tuple(file_identity(path) for path in self.files if path)

    def current(self):
        now = time.monotonic()
        if now - self._checked >= self.check_interval:
            self._checked = now
            if self._identify() != self._identity:
                self.reload()
        return self.context

    def reload(self):
        with self._lock:
            self._identity = self._identify()
            try:
                self.context = make_tls_context(*self.files)
            except ConfigError as error:
                log.error("keeping the current TLS certificate: %s", error)
                self.metrics.add(("tls_reloads", "failure"))
                return False
            self.not_after = self._not_after()
        log.info("loaded TLS certificate %s", self.files[0])
        self.metrics.add(("tls_reloads", "success"))
        return True


def notify_systemd(state):
    """Send a Type=notify state (READY=1, RELOADING=1, STOPPING=1); a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as error:
        log.warning("cannot notify systemd at %s: %s", address, error)


def parse_listen(text):
    """'HOST:PORT', '[v6]:PORT' or ':PORT' (all interfaces) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError("--listen %r: expected HOST:PORT, e.g. 127.0.0.1:5443" % text)
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return host or "0.0.0.0", int(port)


def is_loopback(host):
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def parse_metrics_listen(text):
    """--metrics-listen: 'PORT' alone is on loopback; otherwise as --listen."""
    try:
        return parse_listen("127.0.0.1:" + text if text.isdigit() else text)
    except ConfigError:
        raise ConfigError("--metrics-listen %r: expected PORT or HOST:PORT, e.g. "
                          "127.0.0.1:9402" % text)


def load_credentials(cert, key, client_ca, wait):
    """The TLS credentials, waiting up to wait seconds for files that are missing or not
    yet usable: on a first boot k3s writes its certificates only once it has started."""
    deadline = time.monotonic() + wait
    told = False
    while True:
        try:
            return TlsCredentials(cert, key, client_ca)
        except ConfigError as error:
            if time.monotonic() >= deadline:
                raise ConfigError("%s%s" % (error, " (after waiting %gs)" % wait if wait else ""))
            if not told:
                log.info("waiting up to %gs for the certificate: %s", wait, error)
                told = True
            time.sleep(0.5)


def build_server(args):
    if not os.path.isdir(args.root):
        raise ConfigError("root directory %s does not exist (--root)" % args.root)
    tls = load_credentials(args.cert, args.key, args.client_ca,
                           args.wait_for_cert) if args.cert else None
    host, port = parse_listen(args.listen)
    metrics_address = parse_metrics_listen(args.metrics_listen) if args.metrics_listen else None
    tree = Tree(args.root)
    metrics = Metrics(args.workers) if metrics_address else NoMetrics()
    tree.metrics = metrics
    if tls:
        tls.metrics = metrics
    try:
        server = RegistryServer((host, port), tree, tls,
                                max_connections=args.max_connections,
                                handshake_timeout=args.handshake_timeout,
                                header_timeout=args.header_timeout,
                                idle_timeout=args.idle_timeout,
                                send_timeout=args.send_timeout,
                                verify_always=args.verify == "always", metrics=metrics,
                                workers=args.workers)
    except OSError as error:
        raise ConfigError("cannot listen on %s: %s" % (args.listen, error.strerror or error))
    if metrics_address:
        metrics.tls = tls
        try:
            server.metrics_server = MetricsServer(metrics_address, metrics)
        except OSError as error:
            server.server_close()
            raise ConfigError("cannot listen on --metrics-listen %s: %s" % (
                args.metrics_listen, error.strerror or error))
    return server


HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def record_signals(signums):
    """Install handlers that only record: each signal is queued, and the serving loop
    acts on it outside the handler, so a storm of them can neither re-enter a reload
    nor take a lock that the interrupted code holds. Returns the queue."""
    arrived = queue.SimpleQueue()  # put() is safe to call from a signal handler
    for signum in signums:
        signal.signal(signum, lambda signum, _frame: arrived.put(signum))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signums)  # blocked across a fork
    return arrived


def take_signals(arrived, timeout=None):
    """The set of signals recorded, waiting up to timeout for the first; a burst of one
    signal counts once."""
    try:
        signums = {arrived.get(timeout=timeout)}
    except queue.Empty:
        return set()
    with contextlib.suppress(queue.Empty):
        while True:
            signums.add(arrived.get_nowait())
    return signums


def ignore_signals():
    """Once serving is over: the interpreter restores default handlers as it exits, and a
    SIGHUP then would kill the process mid-exit, which systemd reports as a failure."""
    for signum in HANDLED_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def signal_name(signums):
    return signal.Signals(min(signums)).name


def serve_until_signalled(server, shutdown_timeout, cpu=None):
    if cpu is not None:
        keep_on_cpu(cpu)  # before any thread starts: threads take their creator's CPUs
    arrived = record_signals(HANDLED_SIGNALS)
    threading.Thread(target=act_on_signals, args=(server, arrived), daemon=True).start()
    if server.metrics_server:
        threading.Thread(target=server.metrics_server.serve_forever, daemon=True).start()
    notify_systemd("READY=1")
    try:
        server.serve_forever()
    finally:
        left = server.drain(shutdown_timeout)
        if left:
            log.warning("%d connections still busy after %ss; closing them",
                        left, shutdown_timeout)
        server.server_close()
        if server.metrics_server:
            server.metrics_server.shutdown()
            server.metrics_server.server_close()
        if server.access_log:
            server.access_log.flush()
        ignore_signals()


def act_on_signals(server, arrived):
    """The serving process's signal loop: reload on SIGHUP, stop on SIGTERM or SIGINT."""
    while True:
        signums = take_signals(arrived)
        if signums & STOP_SIGNALS:
            log.info("received %s, stopping", signal_name(signums & STOP_SIGNALS))
            notify_systemd("STOPPING=1")
            server.shutdown()  # returns once serve_forever() has
            return
        notify_systemd("RELOADING=1\nMONOTONIC_USEC=%d" % (time.monotonic() * 1e6))
        if server.tls:
            server.tls.reload()
        notify_systemd("READY=1")


def keep_on_cpu(cpu):
    """Keep this process (and the threads it starts) on one CPU; serving goes on
    wherever the kernel puts it if that CPU has been taken away meanwhile."""
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError as error:
        log.warning("cannot keep process %d on CPU %d: %s", os.getpid(), cpu, error.strerror)


def serve_workers(server, count, shutdown_timeout, cpus=None):
    """Pre-fork: count processes accept on the one port, each on a listening socket of
    its own and with its own threads, so requests use every core instead of contending
    for one GIL. The parent only supervises: it forwards signals, speaks to systemd and
    replaces a worker that ends, however it ends, until it is stopping itself. Worker n
    accepts on listener n, and with cpus is kept on cpus[n]; so is the worker that
    replaces it."""
    for listener in server.listeners:
        listener.setblocking(False)  # a worker never waits in accept(), whatever woke it
    if server.metrics_server:
        server.metrics_server.socket.setblocking(False)
        server.metrics.supervisor = os.getpid()
    arrived = record_signals(HANDLED_SIGNALS + (signal.SIGCHLD,))
    workers = {}  # pid -> (when it started, its row of metrics)

    def spawn(row):
        # Signals stay blocked across the fork until the worker has handlers of its own:
        # one arriving in between would land in the parent's queue, copied, and be lost.
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                server.listen_on(row)
                if server.metrics_server:
                    server.metrics.take_row(row)
                run_worker(server, shutdown_timeout, cpus[row] if cpus else None)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
        workers[pid] = time.monotonic(), row

    def forward(signum):
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    for row in range(count):
        spawn(row)
    notify_systemd("READY=1")
    kill_at = None  # once stopping: when workers still there are killed
    failed = False
    while workers or kill_at is None:
        stopping = kill_at is not None
        signums = take_signals(arrived, timeout=1.0)
        if stopping and time.monotonic() > kill_at:
            forward(signal.SIGKILL)  # a worker stopped (SIGSTOP) or stuck past its drain
        if signums & STOP_SIGNALS and not stopping:
            stopping, kill_at = True, time.monotonic() + shutdown_timeout + 5
            log.info("received %s, stopping %d workers",
                     signal_name(signums & STOP_SIGNALS), count)
            notify_systemd("STOPPING=1")
            forward(signal.SIGTERM)
        elif signal.SIGHUP in signums and not stopping:
            notify_systemd("RELOADING=1\nMONOTONIC_USEC=%d" % (time.monotonic() * 1e6))
            forward(signal.SIGHUP)
            notify_systemd("READY=1")
        for pid, status in ended_children():
            started, row = workers.pop(pid, (None, None))
            if started is None:
                continue
            if stopping:
                failed = failed or status != 0
                continue
            log.error("worker %d ended (wait status %d); starting another", pid, status)
            if time.monotonic() - started < 1:
                time.sleep(1)  # a worker that ends at once must not become a fork loop
        while len(workers) < count and not stopping:
            free = set(range(count)) - {row for _, row in workers.values()}
            try:
                spawn(min(free))
            except OSError as error:  # out of processes or memory: try again next round
                log.error("cannot start a worker: %s", error)
                break
    server.server_close()
    if server.metrics_server:
        server.metrics_server.server_close()
    ignore_signals()
    return 1 if failed else 0


def run_worker(server, shutdown_timeout, cpu):
    """A forked worker's whole life; it never returns into the parent's code."""
    os.environ.pop("NOTIFY_SOCKET", None)  # only the parent speaks to systemd
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    code = 1
    try:
        serve_until_signalled(server, shutdown_timeout, cpu)
        code = 0
    except Exception:
        log.exception("worker %d failed", os.getpid())
    finally:
        os._exit(code)


def ended_children():
    """(pid, wait status) of every child that has ended, without waiting."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status


def raise_open_file_limit():
    """Each connection is a descriptor: take the hard limit, as Go servers do, so the
    connection limit is --max-connections and not a soft default of 1024 files."""
    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --- Command line --------------------------------------------------------------------

def seconds(text):
    """An argparse type: a finite number of seconds above zero."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError("expected seconds above 0, got %r" % text)
    return value


def collect_garbage(args):
    """--gc: read the kept lists, refuse a damaged tree unless --force, collect, report."""
    keep = None
    if args.keep:
        texts = []
        for path in args.keep:
            try:
                f, _ = open_regular(path)
                with f:
                    texts.append((path, f.read(MAX_LIST_BYTES + 1).decode("utf-8")))
                if len(texts[-1][1]) > MAX_LIST_BYTES:
                    raise ValueError("over %d bytes: not an image list" % MAX_LIST_BYTES)
            except (OSError, ValueError) as error:
                raise ConfigError("cannot read --keep %s: %s" % (
                    path, getattr(error, "strerror", None) or error))
        try:
            keep = parse_image_lists(texts)
        except ValueError as error:
            raise ConfigError("%s; nothing was removed" % error)
    damage = TreeCheck(args.root).run()
    if damage.problems and not args.force:
        print(damage.report(), file=sys.stderr)
        print("gc: the tree has %d problems; nothing was removed (mend them, or --force)"
              % len(damage.problems), file=sys.stderr)
        return 1
    result = GarbageCollection(args.root, keep, args.dry_run).run()
    print(result.as_json() if args.json else result.report())
    return 0


def make_parser():
    parser = argparse.ArgumentParser(
        prog="embedded_registry.py",
        description="Serve a registry tree read-only to containerd, skopeo and podman.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python3 embedded_registry.py --root /var/lib/rancher/k3s/server/registry \\\n"
               "      --cert server.crt --key server.key\n"
               "  python3 embedded_registry.py --root ./registry --listen 127.0.0.1:5000\n")
    parser.add_argument("--root", default=DEFAULT_ROOT,
                        help="the registry tree to serve (default: %(default)s)")
    parser.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                        help="address to listen on; [::1]:PORT for IPv6, :PORT for every "
                             "interface (default: %(default)s)")
    tls = parser.add_argument_group("TLS (without --cert/--key the server speaks plain HTTP)")
    tls.add_argument("--cert", metavar="FILE", help="PEM certificate chain, server first")
    tls.add_argument("--key", metavar="FILE", help="PEM private key of --cert")
    tls.add_argument("--client-ca", metavar="FILE",
                     help="require client certificates signed by this CA (mutual TLS)")
    tls.add_argument("--wait-for-cert", type=float, default=0.0, metavar="SECONDS",
                     help="wait this long for --cert and --key to appear and load, as k3s's "
                          "own do on a first boot, instead of failing at once (default: "
                          "%(default)s)")
    limits = parser.add_argument_group("limits")
    limits.add_argument("--workers", type=int, default=1, metavar="N",
                        help="processes sharing the port; 2 or more use more cores for many "
                             "small requests (default: %(default)s)")
    limits.add_argument("--pin-workers", choices=PIN_POLICIES, default="auto",
                        help="keep each worker on a CPU of its own, so its threads hand the "
                             "interpreter lock to each other on one core: auto does so with "
                             "2 or more workers and as many CPUs allowed; always also keeps "
                             "a single worker on one CPU; never leaves them to the kernel "
                             "(default: %(default)s)")
    limits.add_argument("--max-connections", type=int, default=1024, metavar="N",
                        help="connections served at once, per worker; more wait (default: "
                             "%(default)s)")
    limits.add_argument("--handshake-timeout", type=seconds, default=10.0, metavar="SECONDS",
                        help="time allowed for a TLS handshake (default: %(default)s)")
    limits.add_argument("--header-timeout", type=seconds, default=10.0, metavar="SECONDS",
                        help="time allowed for a request line and headers once they start, "
                             "however slowly they trickle in (default: %(default)s)")
    limits.add_argument("--idle-timeout", type=seconds, default=60.0, metavar="SECONDS",
                        help="time a keep-alive connection may wait for its next request "
                             "(default: %(default)s)")
    limits.add_argument("--send-timeout", type=seconds, default=60.0, metavar="SECONDS",
                        help="time a client may stop reading a response before it is cut "
                             "off (default: %(default)s)")
    limits.add_argument("--shutdown-timeout", type=seconds, default=30.0, metavar="SECONDS",
                        help="on SIGTERM, time given to transfers in flight (default: "
                             "%(default)s)")
    parser.add_argument("--verify", choices=("first", "always"), default="first",
                        help="hash a blob as it is sent: on its first whole GET (then "
                             "trusted while its file keeps its inode, size and mtime), or on "
                             "every whole GET, which also catches a file changed in place "
                             "(default: %(default)s)")
    check = parser.add_argument_group("integrity check (instead of serving)")
    check.add_argument("--check", action="store_true",
                       help="verify the tree under --root offline and exit: 0 if sound, 1 if not")
    check.add_argument("--deep", action="store_true", help="with --check, hash every blob")
    check.add_argument("--json", action="store_true", help="with --check or --gc, print JSON")
    gc = parser.add_argument_group("garbage collection (instead of serving; safe beside a "
                                   "running server)")
    gc.add_argument("--gc", action="store_true",
                    help="remove manifests no tag reaches and blobs no manifest names, "
                         "then empty repositories; exit 0 when done")
    gc.add_argument("--keep", action="append", metavar="FILE",
                    help="with --gc, first remove every tag that no image in these lists "
                         "(the downloader's -f format) names; may be repeated")
    gc.add_argument("--dry-run", action="store_true",
                    help="with --gc, only print what would be removed")
    gc.add_argument("--force", action="store_true",
                    help="with --gc, collect a tree that --check finds damaged")
    parser.add_argument("--metrics-listen", metavar="[HOST:]PORT",
                        help="serve Prometheus metrics at http://HOST:PORT/metrics, plain "
                             "HTTP on a socket of its own; a PORT alone is on 127.0.0.1 "
                             "(default: no metrics)")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="log warnings and errors only, no access log")
    parser.add_argument("--debug", action="store_true", help="log tracebacks of failures")
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="text lines, or one JSON object a line (time, level, client, "
                             "method, path, ns, status, bytes, seconds; error) for Loki or "
                             "Elasticsearch (default: %(default)s)")
    return parser


def main(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    if bool(args.cert) != bool(args.key):
        parser.error("--cert and --key go together")
    if args.client_ca and not args.cert:
        parser.error("--client-ca needs --cert and --key")
    if args.wait_for_cert and not args.cert:
        parser.error("--wait-for-cert needs --cert and --key")
    if not 0 <= args.wait_for_cert < float("inf"):
        parser.error("--wait-for-cert must be 0 or more seconds")
    if args.max_connections < 1:
        parser.error("--max-connections must be at least 1")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.check and args.gc:
        parser.error("--check and --gc are separate runs")
    if (args.keep or args.dry_run or args.force) and not args.gc:
        parser.error("--keep, --dry-run and --force go with --gc")
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    if args.log_format == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonLogFormatter())
    if (args.check or args.gc) and not os.path.isdir(args.root):
        print("%s: error: root directory %s does not exist (--root)" % (
            parser.prog, args.root), file=sys.stderr)
        return 2
    if args.check:
        result = TreeCheck(args.root, args.deep).run()
        print(result.as_json() if args.json else result.report())
        return 1 if result.problems else 0
    if args.gc:
        try:
            return collect_garbage(args)
        except ConfigError as error:
            print("%s: error: %s" % (parser.prog, error), file=sys.stderr)
            return 2
    raise_open_file_limit()
    try:
        server = build_server(args)
    except ConfigError as error:
        print("%s: error: %s" % (parser.prog, error), file=sys.stderr)
        return 2
    if log.isEnabledFor(logging.INFO):
        server.access_log = AccessLog(sys.stderr, args.log_format == "json")
        for handler in logging.getLogger().handlers:
            handler.addFilter(server.access_log)  # pending access lines go out first
    if server.tls is None and not is_loopback(server.server_address[0]):
        log.warning("serving plain HTTP beyond loopback on %s: give --cert and --key for TLS",
                    args.listen)
    cpus = worker_cpus(args.workers, os.sched_getaffinity(0) if hasattr(
        os, "sched_getaffinity") else (), args.pin_workers)  # Linux's, as k3s is
    log.info("serving %s/v2/ from %s%s%s", server.url, server.tree.root,
             " with %d workers" % args.workers if args.workers > 1 else "",
             " on CPUs %s" % ", ".join(map(str, cpus)) if cpus else "")
    if server.metrics_server:
        host, port = server.metrics_server.server_address[:2]
        log.info("metrics at http://%s:%d/metrics", "[%s]" % host if ":" in host else host, port)
    if args.workers > 1:
        return serve_workers(server, args.workers, args.shutdown_timeout, cpus)
    serve_until_signalled(server, args.shutdown_timeout, cpus[0] if cpus else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
