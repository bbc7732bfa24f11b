#!/usr/bin/env python3
"""download_system_images: fill a registry tree for embedded_registry.py, on a host with internet.

Usage:

    python3 download_system_images.py -f extra-images.txt -p linux/arm64 \
        --bundle registry-v1.tar.gz             # carry it across the air gap

    # later trips: only what the node lacks (its embedded_registry.py --check --json)
    python3 download_system_images.py -v v1.32.1+k3s1 -f extra-images.txt -p linux/arm64 \
        --bundle registry-v2.tar.gz --since node-inventory.json

It reads the image list of a k3s release (k3s-images.txt; -v picks the version or
channel, default stable) plus any -f lists, and for each image saves:

    ROOT/<repo>/manifests/sha256:<hex>     the upstream manifest bytes, unchanged, and
                                           the children for the requested platforms
    ROOT/<repo>/manifests/<tag>            a relative symlink to the top manifest
    ROOT/blobs/sha256:<hex>                config and layer blobs, shared by every repo
    ROOT/<repo>/blobs -> ../blobs          (a chain of such links for nested repos)

The registry host is trimmed from <repo> (docker.io/rancher/pause -> rancher/pause)
unless -n is given. The upstream bytes are kept exactly, so a pull by the upstream
index digest works offline. Every file is written under a temporary name and renamed
into place only after its digest is verified: an interrupted run leaves no partial
file, and running it again completes the tree.

Whatever refers to each manifest saved comes along, unless --no-referrers: cosign's
signatures, attestations and SBOMs (tags sha256-<hex>.sig, .att, .sbom) and OCI 1.1
referrers (the upstream's referrers API, or its fallback tag sha256-<hex>), and what
refers to those in turn. A list line may also name a Helm chart or any other OCI
artifact (oci://ghcr.io/org/charts/app:1.2.3), which is kept whatever its platform.

The downloads are done by crane (go-containerregistry) or skopeo, whichever is on
PATH (--tool picks one). Without either, and without internet, --from-archive builds
the same tree from docker-archive or oci-archive files such as the k3s airgap tarballs:

    python3 download_system_images.py --from-archive k3s-airgap-images-arm64.tar.zst

Manifests, indexes and archives are treated as hostile: every document passes one gate
(check_document) where it is parsed, so a digest, size, media type or platform of the
wrong type or grammar fails that image with a message naming the field, and the tree
writer refuses again any digest, repository or tag outside its grammar before it joins
one to a path. Nothing is written or removed outside the tree.
 Image list format: one reference per line; blank lines and
'#' comments are ignored.
"""

import argparse
import collections
import concurrent.futures
import contextlib
import errno
import gzip
import hashlib
import http.client
import io
import json
import logging
import os
import posixpath
import re
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib

__version__ = "0.1.0"

log = logging.getLogger("download_system_images")

# --- Constants and grammars ---------------------------------------------------------

DEFAULT_CHANNEL_URL = "https://update.k3s.io/v1-release/channels"
DEFAULT_RELEASE_URL = "https://github.com/k3s-io/k3s/releases/download"
CHANNEL_URL_ENV = "K3S_CHANNEL_URL"
RELEASE_URL_ENV = "K3S_RELEASE_URL"
IMAGE_LIST_ASSET = "k3s-images.txt"
MIRROR_NAME = "bootstrap-registry.airgap"
DEFAULT_REGISTRY = "docker.io"

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
IMAGE_CONFIGS = (OCI_CONFIG, DOCKER_CONFIG)
HELM_CONFIG = "application/vnd.cncf.helm.config.v1+json"
# What a registry is asked for when a manifest may be of any kind.
MANIFEST_ACCEPT = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST))
# A Docker archive's layers are whatever `docker save` wrote, usually uncompressed tars.
DOCKER_LAYER_TYPES = [(b"\x1f\x8b", "application/vnd.docker.image.rootfs.diff.tar.gzip"),
                      (b"\x28\xb5\x2f\xfd", "application/vnd.docker.image.rootfs.diff.tar.zstd"),
                      (b"", "application/vnd.docker.image.rootfs.diff.tar")]
# Where an OCI layout's index.json names its images, the most complete name first.
IMAGE_NAME_ANNOTATIONS = ("io.containerd.image.name", "org.opencontainers.image.ref.name")
OCI_BLOB_RE = re.compile(r"blobs/sha256/([a-f0-9]{64})")
ZSTD_SUFFIXES = (".zst", ".zstd", ".tzst")
# containerd refuses a larger manifest; reading one from an archive stops there.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
# An inventory lists about 100 bytes a blob: this is millions of blobs.
MAX_INVENTORY_BYTES = 256 * 1024 * 1024

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(r"%s(?:/%s)*" % (_COMPONENT, _COMPONENT))
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
DIGEST_RE = re.compile(r"sha256:[a-f0-9]{64}")
HOST_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?::[0-9]{1,5})?")
# The tree's own folder names, which no repository path part may take.
TREE_FOLDERS = {"blobs", "manifests"}
# A repository as the tree lays it out: trimmed, or with -n the registry host first.
TREE_REPO_RE = re.compile(r"(?:%s/)?%s" % (HOST_RE.pattern, NAME_RE.pattern))
# The platform fields the OCI image spec gives as lists; every other one is a string.
PLATFORM_LIST_FIELDS = ("os.features", "features")
# A JSON key that a message may show as it is; any other is quoted.
FIELD_KEY_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
FULL_VERSION_RE = re.compile(r"v\d+\.\d+\.\d+\S*")
# The default variant of an architecture, as containerd's platform matcher assumes it.
DEFAULT_VARIANTS = {"arm64": "v8", "arm": "v7"}
TEMP_PREFIX = ".incoming-"

# What refers to an image: cosign's tags beside it, by suffix, and what an artifact's type
# says it is. A type naming none of these counts as an "artifact".
COSIGN_TAG_KINDS = (("sig", "signature"), ("att", "attestation"), ("sbom", "SBOM"))
REFERRER_KIND_WORDS = (("signature", ("signature", "cosign.artifact.sig", "sigstore.bundle")),
                       ("attestation", ("dsse", "in-toto", "intoto", "attestation")),
                       ("SBOM", ("spdx", "cyclonedx", "syft", "sbom")))
# A signature on an SBOM on an image is depth 2; an upstream that goes on past this, or
# names more than this many referrers of one image, is not followed further.
MAX_REFERRER_DEPTH = 8
MAX_REFERRERS = 1000
# A registry without the referrers API answers one of these (the spec says 404).
NO_REFERRERS_API = (400, 404, 405, 501)
REGISTRY_TIMEOUT = 60
NO_REFERRERS_HINT = " (--no-referrers saves the images without what refers to them)"
# Docker Hub's API host, and the keys its credentials are stored under.
DOCKER_HUB_API = "registry-1.docker.io"
DOCKER_HUB_AUTH_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io",
                        DOCKER_HUB_API)
TOKEN_RE = re.compile(r"[\x21-\x7e]{1,16384}")
CHALLENGE_PARAM_RE = re.compile(r'(\w+)="([^"]*)"')


class DownloadError(Exception):
    """A problem the user can fix; main() prints it as one line."""


# --- Pure functions: references, lists, platforms, manifests -------------------------

class ImageRef(collections.namedtuple("ImageRef", "registry repository tag digest")):
    """A normalised image reference, as Docker and containerd read one."""

    @property
    def repo(self):
        return "%s/%s" % (self.registry, self.repository)

    def __str__(self):
        text = self.repo
        if self.tag:
            text += ":" + self.tag
        if self.digest:
            text += "@" + self.digest
        return text

    def pinned(self, digest):
        """The reference of one manifest of this repository, by digest."""
        return "%s@%s" % (self.repo, digest)

    def tree_repo(self, trim=True):
        return self.repository if trim else self.repo


def parse_reference(text):
    """Parse an image reference: nginx, quay.io/x/y:1, localhost:5000/a@sha256:..., and
    oci://ghcr.io/org/charts/app:1.2.3 as Helm writes an artifact's."""
    original = text
    text = text.strip()
    if text.startswith("oci://"):
        text = text[len("oci://"):]
    name, _, digest = text.partition("@")
    if digest and not DIGEST_RE.fullmatch(digest):
        raise ValueError("%r: the digest must be sha256: and 64 lowercase hex digits" % original)
    tag = None
    last_colon, last_slash = name.rfind(":"), name.rfind("/")
    if last_colon > last_slash:
        name, tag = name[:last_colon], name[last_colon + 1:]
        if not TAG_RE.fullmatch(tag):
            raise ValueError("%r: invalid tag %r" % (original, tag))
    first, slash, rest = name.partition("/")
    if slash and (("." in first or ":" in first or first == "localhost")
                  or first.lower() != first):
        registry, repository = first, rest
        if not HOST_RE.fullmatch(registry):
            raise ValueError("%r: invalid registry host %r" % (original, registry))
    else:
        registry, repository = DEFAULT_REGISTRY, name
    if registry == "index.docker.io":
        registry = DEFAULT_REGISTRY
    if registry == DEFAULT_REGISTRY and "/" not in repository:
        repository = "library/" + repository
    if not repository or not NAME_RE.fullmatch(repository):
        raise ValueError("%r: invalid repository name %r (lowercase letters, digits, "
                         "separators)" % (original, repository))
    if set(repository.split("/")) & TREE_FOLDERS:
        raise ValueError("%r: a repository path part named blobs or manifests cannot be "
                         "laid out in the tree" % original)
    if tag is None and not digest:
        tag = "latest"
    return ImageRef(registry, repository, tag, digest or None)


def parse_image_list(text, source):
    """[(ImageRef, 'file:line')] from a list; all bad lines are reported together."""
    images, problems = [], []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        where = "%s:%d" % (source, number)
        try:
            images.append((parse_reference(line), where))
        except ValueError as error:
            problems.append("%s: %s" % (where, error))
    if problems:
        raise DownloadError("bad image references:\n  " + "\n  ".join(problems))
    return images


Platform = collections.namedtuple("Platform", "os architecture variant")


def parse_platforms(text):
    """'linux/amd64', 'linux/arm64/v8,linux/arm/v7' or 'all' (None: every platform)."""
    if text.strip() == "all":
        return None
    platforms = []
    for item in text.split(","):
        parts = item.strip().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise DownloadError("--platform %r: expected OS/ARCH[/VARIANT], e.g. linux/arm64, "
                                "a comma-separated list, or all" % item)
        platforms.append(Platform(parts[0], parts[1], parts[2] if len(parts) == 3 else None))
    return platforms


def platform_matches(wanted, platform):
    """Whether an index entry's platform is one of the wanted ones (None: all)."""
    if wanted is None:
        return True
    platform = platform or {}
    arch = platform.get("architecture")
    variant = platform.get("variant") or DEFAULT_VARIANTS.get(arch)
    for want in wanted:
        if want.os == platform.get("os") and want.architecture == arch:
            if want.variant is None or want.variant == variant:
                return True
    return False


def sha256_digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def manifest_kind(document):
    media_type = document.get("mediaType")
    if media_type in INDEX_TYPES or (media_type is None and "manifests" in document):
        return "index"
    if "config" in document and "layers" in document:
        return "manifest"
    if document.get("schemaVersion") == 1:
        raise DownloadError("Docker schema 1 manifests are not supported; re-push the image "
                            "with a current client")
    raise DownloadError("unrecognised manifest (mediaType %r)" % media_type)


def artifact_kind(document):
    """"chart" or "artifact" for a manifest that is not a container image, else None."""
    config_type = document["config"].get("mediaType")
    if config_type == HELM_CONFIG:
        return "chart"
    if document.get("artifactType") or config_type not in IMAGE_CONFIGS + (None,):
        return "artifact"
    return None


def referrer_kind(document):
    """signature, attestation, SBOM or artifact, from a referrer's artifact type (or its
    config's media type, where the OCI spec says a client falls back to it)."""
    artifact_type = document.get("artifactType")
    if not isinstance(artifact_type, str) and manifest_kind(document) == "manifest":
        artifact_type = document["config"].get("mediaType")
    artifact_type = (artifact_type or "").lower()
    for kind, words in REFERRER_KIND_WORDS:
        if any(word in artifact_type for word in words):
            return kind
    return "artifact"


def subject_of(document):
    """The digest a manifest refers to (its OCI 1.1 subject, past the gate), or None."""
    subject = document.get("subject")
    return subject["digest"] if isinstance(subject, dict) else None


def describe(document, children):
    """What one line of the run calls an image: its platforms, or chart or artifact."""
    if manifest_kind(document) != "index":
        return artifact_kind(document) or "image"
    if not any("platform" in entry for entry in document.get("manifests", [])):
        return "artifact"  # an index of artifacts, none of them for a platform
    return "%d platform%s" % (children, "s" if children != 1 else "")


def count_kinds(kinds):
    """'2 signatures, 1 attestation, 1 SBOM' from a list of kinds."""
    counts = collections.Counter(kinds)
    order = [kind for kind, _ in REFERRER_KIND_WORDS] + ["artifact"]
    return ", ".join("%d %s%s" % (counts[kind], kind, "s" if counts[kind] > 1 else "")
                     for kind in order if counts[kind])


def blob_descriptors(document):
    """The config and layers of an image manifest (foreign layers have no blob here)."""
    descriptors = [document["config"]] + list(document["layers"])
    return [d for d in descriptors if not d.get("urls")]


def registries_yaml(registries, endpoint, ca_file):
    """A k3s registries.yaml that sends the mirror name and every source registry to endpoint."""
    host = urllib.parse.urlsplit(endpoint).netloc
    lines = ["# Written by download_system_images.py; copy to /etc/rancher/k3s/registries.yaml",
             "mirrors:"]
    for registry in [MIRROR_NAME] + sorted(set(registries) - {MIRROR_NAME}):
        lines += ['  "%s":' % registry, "    endpoint:", '      - "%s"' % endpoint]
    lines += ["configs:", '  "%s":' % host, "    tls:", '      ca_file: "%s"' % ca_file]
    return "\n".join(lines) + "\n"


def human_bytes(count):
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return "%.1f %s" % (count, unit) if unit != "B" else "%d B" % count
        count /= 1000.0


# --- The gate: JSON from outside, checked once where it is parsed ----------------------
# Manifests, indexes and archive members come from an upstream or a file we did not write.
# Their digests and names become file names in the tree, so each passes its grammar here,
# before anything is built from it; deeper code (and TreeWriter, which checks again) may
# then index them without a second thought.

def parse_json(data, what):
    """JSON from outside; any failure, deep nesting included, is a DownloadError naming it."""
    try:
        return json.loads(data)
    except ValueError as error:
        raise DownloadError("%s is not valid JSON: %s" % (what, error))
    except RecursionError:
        raise DownloadError("%s is not valid JSON: nested too deeply" % what)


def matches(grammar, value):
    """Whether value is a string that grammar accepts whole (a non-string never is)."""
    return isinstance(value, str) and grammar.fullmatch(value) is not None


def shown(value):
    """A value from outside as a short one-line part of a message (repr escapes newlines)."""
    if isinstance(value, dict):  # never repr a container: it may be huge or nested deeply
        return "an object"
    if isinstance(value, list):
        return "a list"
    text = repr(value[:80] if isinstance(value, str) else value)
    return text if len(text) <= 80 else text[:77] + "..."


def is_list_of_strings(value):
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def field_name(field, key):
    """field.key for a message; a key from outside that is not a plain word is quoted."""
    key = key if matches(FIELD_KEY_RE, key) else shown(key)
    return "%s.%s" % (field, key) if field else key


def strings_problem(mapping, field, list_fields=()):
    """What is wrong with an object whose values must be strings, or for list_fields lists
    of strings, as annotations and platforms are (None: nothing)."""
    if not isinstance(mapping, dict):
        return "%s is %s, not an object" % (field, shown(mapping))
    for key, value in mapping.items():
        if key in list_fields:
            if not is_list_of_strings(value):
                return "%s is %s, not a list of strings" % (field_name(field, key), shown(value))
        elif not isinstance(value, str):
            return "%s is %s, not a string" % (field_name(field, key), shown(value))
    return None


def descriptor_problem(descriptor, field=""):
    """What is wrong with one content descriptor from outside (None: nothing).

    Its digest becomes a file name, its size is compared with a file's, its platform is
    matched: each must have the type and grammar the OCI image spec gives it first.
    """
    if not isinstance(descriptor, dict):
        return "%s is %s, not an object" % (field or "it", shown(descriptor))
    digest, size = descriptor.get("digest"), descriptor.get("size")
    if not matches(DIGEST_RE, digest):
        return "%s is %s, not sha256: and 64 lowercase hex digits" % (
            field_name(field, "digest"), shown(digest))
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        return "%s is %s, not a size in bytes" % (field_name(field, "size"), shown(size))
    if "mediaType" in descriptor and not isinstance(descriptor["mediaType"], str):
        return "%s is %s, not a string" % (field_name(field, "mediaType"),
                                           shown(descriptor["mediaType"]))
    if "urls" in descriptor and not is_list_of_strings(descriptor["urls"]):
        return "%s is %s, not a list of strings" % (field_name(field, "urls"),
                                                    shown(descriptor["urls"]))
    for key, list_fields in (("annotations", ()), ("platform", PLATFORM_LIST_FIELDS)):
        problem = key in descriptor and strings_problem(descriptor[key], field_name(field, key),
                                                        list_fields)
        if problem:
            return problem
    return None


def check_document(document, what):
    """The gate for a parsed manifest or index: returns it if its shape and every
    descriptor in it are sound, else raises DownloadError naming what and the field."""
    if not isinstance(document, dict):
        raise DownloadError("%s is %s, not a JSON object" % (what, shown(document)))
    if "mediaType" in document and not isinstance(document["mediaType"], str):
        raise DownloadError("%s: mediaType is %s, not a string"
                            % (what, shown(document["mediaType"])))
    try:
        kind = manifest_kind(document)
    except DownloadError as error:
        raise DownloadError("%s: %s" % (what, error))
    if "artifactType" in document and not isinstance(document["artifactType"], str):
        raise DownloadError("%s: artifactType is %s, not a string"
                            % (what, shown(document["artifactType"])))
    if kind == "index":
        entries = document.get("manifests", [])
        if not isinstance(entries, list):
            raise DownloadError("%s: manifests is %s, not a list" % (what, shown(entries)))
        descriptors = [("manifests[%d]" % n, entry) for n, entry in enumerate(entries)]
    else:
        if not isinstance(document["layers"], list):
            raise DownloadError("%s: layers is %s, not a list"
                                % (what, shown(document["layers"])))
        descriptors = [("config", document["config"])]
        descriptors += [("layers[%d]" % n, layer) for n, layer in enumerate(document["layers"])]
    if "subject" in document:
        descriptors.append(("subject", document["subject"]))
    for field, descriptor in descriptors:
        problem = descriptor_problem(descriptor, field)
        if problem:
            raise DownloadError("%s: %s" % (what, problem))
    return document


def digest_hex(digest):
    """The hex part of a digest that is about to name a file; refuses any other text."""
    if not matches(DIGEST_RE, digest):
        raise DownloadError("refusing %s as a file name: not a sha256 digest" % shown(digest))
    return digest.split(":", 1)[1]


# --- The tools: one subprocess seam, then crane and skopeo ---------------------------

class ToolError(DownloadError):
    pass


def run_tool(argv, stdout=subprocess.PIPE, env=None):
    """Run one tool command; raise ToolError with the command and its stderr."""
    log.debug("+ %s", " ".join(argv))
    try:
        result = subprocess.run(argv, stdout=stdout, stderr=subprocess.PIPE, env=env)
    except OSError as error:
        raise ToolError("cannot run %s: %s" % (argv[0], error))
    if result.returncode != 0:
        message = result.stderr.decode("utf-8", "replace").strip().splitlines()
        raise ToolError("%s failed: %s" % (" ".join(argv[:2]), message[-1] if message else
                                           "exit code %d" % result.returncode))
    return result.stdout


class Source:
    """Where images come from: manifest(reference) -> bytes, fetch_blobs() -> {digest: path}."""

    problems = ()  # (what, message) for images found but unusable, reported as failures

    def has_manifest(self, digest):
        """Whether a child manifest can be fetched at all (a registry has every one)."""
        return True


class Crane(Source):
    """crane manifest / crane blob; trusts SSL_CERT_FILE for a private upstream."""

    name = "crane"
    # Where crane (like docker) keeps registry credentials.
    auth_files = ("$DOCKER_CONFIG/config.json", "~/.docker/config.json")

    def __init__(self, path, insecure=False):
        self.path = path
        self.flags = ["--insecure"] if insecure else []

    def manifest(self, reference):
        return run_tool([self.path, "manifest"] + self.flags + [reference])

    def fetch_blobs(self, image, manifest_digest, descriptors, workdir, jobs):
        """Download each blob to workdir/<hex>; returns {digest: path}."""
        def fetch(descriptor):
            path = os.path.join(workdir, digest_hex(descriptor["digest"]))
            with open(path, "wb") as out:
                run_tool([self.path, "blob"] + self.flags + [image.pinned(descriptor["digest"])],
                         stdout=out)
            return descriptor["digest"], path

        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
            return dict(pool.map(fetch, descriptors))


class Skopeo(Source):
    """skopeo inspect --raw / skopeo copy to dir:; trusts /etc/containers/certs.d."""

    name = "skopeo"
    # Where skopeo (containers-auth.json(5)) looks for credentials, in its order.
    auth_files = ("$REGISTRY_AUTH_FILE", "$XDG_RUNTIME_DIR/containers/auth.json",
                  "~/.config/containers/auth.json", "~/.docker/config.json")

    def __init__(self, path, insecure=False):
        self.path = path
        self.insecure = insecure

    def manifest(self, reference):
        flags = ["--tls-verify=false"] if self.insecure else []
        return run_tool([self.path, "inspect", "--raw"] + flags + ["docker://" + reference])

    def fetch_blobs(self, image, manifest_digest, descriptors, workdir, jobs):
        """skopeo has no single-blob command: copy the whole image to a dir: layout."""
        target = os.path.join(workdir, digest_hex(manifest_digest))
        paths = {d["digest"]: os.path.join(target, digest_hex(d["digest"])) for d in descriptors}
        flags = ["--src-tls-verify=false"] if self.insecure else []
        run_tool([self.path, "copy", "--quiet", "--preserve-digests"] + flags +
                 ["docker://" + image.pinned(manifest_digest), "dir:" + target])
        return paths


TOOLS = {"crane": Crane, "skopeo": Skopeo}


def find_tool(choice, insecure):
    names = [choice] if choice else ["crane", "skopeo"]
    for name in names:
        path = shutil.which(name)
        if path:
            return TOOLS[name](path, insecure)
    if choice:
        raise DownloadError("--tool %s: %s is not on PATH" % (choice, choice))
    raise DownloadError("neither crane nor skopeo is on PATH: install one of them "
                        "(skopeo is packaged by most distributions)")


# --- The upstream's registry API, where the tools have no verb -------------------------
# Neither crane nor skopeo lists referrers, and both fail alike on a tag that is absent and
# on one that cannot be read. This small client asks the registry itself, with the trust
# and credentials the tool would use, so that a 404 can be told apart as an answer.

class NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect would carry the Authorization header to another host: not followed."""

    def redirect_request(self, *args, **kwargs):
        return None


def read_until(response, limit, deadline):
    """At most limit bytes of a response body, all of it before deadline: a registry that
    trickles a byte at a time cannot hold the run past REGISTRY_TIMEOUT."""
    chunks, size = [], 0
    while size < limit:
        if time.monotonic() > deadline:
            raise socket.timeout("the answer took over %ds" % REGISTRY_TIMEOUT)
        chunk = response.read(min(64 * 1024, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def next_page(link, repository):
    """The path (below /v2/<repository>/) of a Link header's rel="next" page, or None;
    a link that leaves the repository's referrers is not followed."""
    match = re.search(r'<([^>]*)>\s*;\s*rel="?next"?', link)
    if not match:
        return None
    target = urllib.parse.urlsplit(match.group(1))
    prefix = "/v2/%s/" % repository
    if target.scheme or target.netloc or not target.path.startswith(prefix + "referrers/"):
        return None
    return target.path[len(prefix):] + ("?" + target.query if target.query else "")


def api_host(registry):
    return DOCKER_HUB_API if registry == DEFAULT_REGISTRY else registry


def expand_path(pattern):
    """An auth file's path with $VARIABLE and ~ expanded; None if a variable is unset."""
    variable = re.match(r"\$(\w+)", pattern)
    if variable and not os.environ.get(variable.group(1)):
        return None
    return os.path.expanduser(os.path.expandvars(pattern))


def stored_credentials(auth_files, registry):
    """The 'Basic ...' header value for registry from the first auth file naming it."""
    keys = DOCKER_HUB_AUTH_KEYS if registry == DEFAULT_REGISTRY else (
        registry, "https://" + registry, "http://" + registry)
    for pattern in auth_files:
        path = expand_path(pattern)
        try:
            auths = json.loads(read_regular(path, MAX_MANIFEST_BYTES)).get("auths")
        except (TypeError, OSError, ValueError, AttributeError, RecursionError):
            continue  # unset, absent, not a file, not JSON: as the tools, look further
        for key in keys:
            entry = auths.get(key) if isinstance(auths, dict) else None
            if isinstance(entry, dict) and matches(TOKEN_RE, entry.get("auth")):
                return "Basic " + entry["auth"]
    return None


def certs_d_files(host):
    """CA files for host in the directories skopeo, podman and docker read."""
    files = []
    for directory in ("/etc/containers/certs.d", "/etc/docker/certs.d"):
        folder = os.path.join(directory, host)
        with contextlib.suppress(OSError):
            files += sorted(os.path.join(folder, name) for name in os.listdir(folder)
                            if name.endswith(".crt"))
    return files


class UpstreamRegistry:
    """GET /v2/<repository>/referrers/<digest> and /manifests/<tag> on the upstream.

    HTTPS, verified against the system trust (SSL_CERT_FILE and SSL_CERT_DIR included)
    and /etc/containers/certs.d/<host>; with --insecure, unverified, and plain HTTP where
    HTTPS is not spoken. Anonymous unless the tool's auth file holds credentials; a
    registry's bearer-token challenge is answered as docker and containerd answer it.
    """

    def __init__(self, auth_files, insecure=False):
        self.auth_files = auth_files
        self.insecure = insecure
        self._schemes = {}  # host -> the scheme that answered
        self._authorization = {}  # (host, repository) -> Authorization header value
        self._openers = {}  # host -> an opener with that host's trust

    def referrers(self, image, digest):
        """Descriptors of what refers to digest, every page of them (at most
        MAX_REFERRERS), or None where the API is not offered."""
        what = "referrers of %s" % image.pinned(digest)
        path, listed = "referrers/" + digest, []
        while path:
            status, reply, body = self._get(image, path, OCI_INDEX)
            if status in NO_REFERRERS_API and not listed:
                return None
            if status != 200:
                raise DownloadError("%s: the upstream answered %d%s"
                                    % (what, status, NO_REFERRERS_HINT))
            index = check_document(parse_json(body, what), what)
            if manifest_kind(index) != "index":
                raise DownloadError("%s: the upstream answered with a manifest, not an index"
                                    % what)
            listed += index.get("manifests", [])
            if len(listed) > MAX_REFERRERS:
                raise DownloadError("%s: over %d listed; not followed" % (what, MAX_REFERRERS))
            path = next_page(reply.get("Link", ""), image.repository)
        return listed

    def tagged(self, image, tag):
        """The manifest bytes under tag, or None where the upstream has no such tag."""
        status, _, body = self._get(image, "manifests/" + tag, MANIFEST_ACCEPT)
        if status == 404:
            return None
        if status != 200:
            raise DownloadError("%s:%s: the upstream answered %d%s" % (image.repo, tag, status,
                                                                     NO_REFERRERS_HINT))
        return body

    def _get(self, image, path, accept):
        host = api_host(image.registry)
        url_path = "/v2/%s/%s" % (image.repository, path)
        headers = {"Accept": accept}
        key = (host, image.repository)
        if key in self._authorization:
            headers["Authorization"] = self._authorization[key]
        status, reply, body = self._request(host, url_path, headers)
        if status == 401:  # no token yet, or one that has expired: answer the challenge
            self._authorization[key] = self._answer_challenge(
                image, reply.get("WWW-Authenticate", ""))
            headers["Authorization"] = self._authorization[key]
            status, reply, body = self._request(host, url_path, headers)
        return status, reply, body

    def _answer_challenge(self, image, challenge):
        """The Authorization value a 401's WWW-Authenticate asks for."""
        credentials = stored_credentials(self.auth_files, image.registry)
        scheme = challenge.split(" ", 1)[0].lower()
        if scheme == "basic" and credentials:
            return credentials
        if scheme != "bearer":
            raise DownloadError("%s: the upstream asks for credentials (%s) that %s does "
                                "not hold" % (image.repo, shown(challenge),
                                              " or ".join(self.auth_files)))
        params = dict(CHALLENGE_PARAM_RE.findall(challenge))
        realm = urllib.parse.urlsplit(params.get("realm", ""))
        if realm.scheme not in ("https", "http") or not realm.netloc:
            raise DownloadError("%s: the upstream's token realm %s is not an HTTP URL"
                                % (image.repo, shown(params.get("realm"))))
        query = urllib.parse.urlencode({
            "service": params.get("service", ""),
            "scope": params.get("scope", "repository:%s:pull" % image.repository)})
        headers = {"Authorization": credentials} if credentials else {}
        status, _, body = self._request(
            realm.netloc, "%s?%s" % (realm.path, "&".join(filter(None, (realm.query, query)))),
            headers, scheme=realm.scheme)
        what = "the token from %s" % realm.netloc
        if status != 200:
            raise DownloadError("%s: the upstream's token service answered %d" % (
                image.repo, status))
        answer = parse_json(body, what)
        token = answer.get("token") or answer.get("access_token") if isinstance(
            answer, dict) else None
        if not matches(TOKEN_RE, token):
            raise DownloadError("%s is not a token" % what)
        return "Bearer " + token

    def _request(self, host, path, headers, scheme=None):
        """(status, headers, body) of one GET; HTTPS first, and plain HTTP after it only
        with --insecure. Bodies past the manifest limit are refused."""
        schemes = [scheme] if scheme else [self._schemes.get(host, "https")]
        if not scheme and self.insecure and schemes[0] == "https":
            schemes.append("http")
        for attempt in schemes:
            url = "%s://%s%s" % (attempt, host, path)
            deadline = time.monotonic() + REGISTRY_TIMEOUT
            try:
                with self._opener(host).open(urllib.request.Request(url, headers=headers),
                                             timeout=REGISTRY_TIMEOUT) as response:
                    status, reply = response.status, response.headers
                    body = read_until(response, MAX_MANIFEST_BYTES + 1, deadline)
            except urllib.error.HTTPError as error:
                status, reply = error.code, error.headers
                try:
                    body = read_until(error, MAX_MANIFEST_BYTES, deadline)
                except (OSError, http.client.HTTPException):
                    body = b""  # an error's body is only ever shown
            except (urllib.error.URLError, OSError, http.client.HTTPException,
                    ValueError) as error:
                # ValueError: http.client's InvalidURL, from a token realm's odd port
                if attempt != schemes[-1]:
                    continue
                raise DownloadError("GET %s: %s" % (url, getattr(error, "reason", error)))
            if len(body) > MAX_MANIFEST_BYTES:
                raise DownloadError("GET %s: the answer is over %d bytes"
                                    % (url, MAX_MANIFEST_BYTES))
            if not scheme:
                self._schemes[host] = attempt
            return status, reply, body

    def _opener(self, host):
        if host not in self._openers:
            self._openers[host] = self._new_opener(host)
        return self._openers[host]

    def _new_opener(self, host):
        context = ssl.create_default_context()
        if self.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        for path in certs_d_files(host):
            with contextlib.suppress(ssl.SSLError, OSError):
                context.load_verify_locations(path)
        return urllib.request.build_opener(NoRedirects, urllib.request.HTTPSHandler(
            context=context))


# --- Image archives (--from-archive): docker-archive and oci-archive files ---------------

@contextlib.contextmanager
def tar_stream(path):
    """The archive as a streaming TarFile: .tar, .tar.gz (stdlib) or .tar.zst (zstd program)."""
    if not path.endswith(ZSTD_SUFFIXES):
        with tarfile.open(path, "r|*") as tar:
            yield tar
        return
    zstd = shutil.which("zstd")
    if not zstd:
        raise DownloadError("%s is zstd-compressed and the zstd program is not installed "
                            "(apt-get install zstd), or decompress it first: zstd -d %s"
                            % (path, path))
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen([zstd, "-dcq", "--", path], stdout=subprocess.PIPE,
                                   stderr=errors)
        try:
            with tarfile.open(fileobj=process.stdout, mode="r|") as tar:
                yield tar
        finally:
            process.stdout.close()
            if process.wait() != 0:
                errors.seek(0)
                raise DownloadError("zstd cannot decompress %s: %s" % (
                    path, errors.read().decode("utf-8", "replace").strip()))


def member_name(name):
    """An archive member's normalised name, or None if it could escape (absolute, ..)."""
    name = posixpath.normpath(name)
    if name.startswith(("/", "../")) or name in ("..", "."):
        return None
    return name


def unpack_archive(path, dest):
    """Extract every regular file of an archive into dest under a flat, safe name.

    Returns {member name: extracted path}; links inside the archive resolve to the
    file they name, and nothing is ever written outside dest.
    """
    files, links = {}, {}
    try:
        with tar_stream(path) as tar:
            for member in tar:
                name = member_name(member.name)
                if name is None:
                    log.warning("%s: skipping unsafe member name %r", path, member.name)
                elif member.issparse():  # docker save never writes one; it could expand
                    log.warning("%s: skipping sparse member %r", path, member.name)  # to TBs
                elif member.isfile():
                    target = os.path.join(dest, "%d" % len(files))
                    with tar.extractfile(member) as source, open(target, "wb") as out:
                        shutil.copyfileobj(source, out, 1024 * 1024)
                    files[name] = target
                elif member.issym():
                    links[name] = member_name(posixpath.join(posixpath.dirname(name),
                                                             member.linkname))
                elif member.islnk():
                    links[name] = member_name(member.linkname)
    except FileNotFoundError:
        raise DownloadError("archive %s does not exist" % path)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        raise DownloadError("cannot read %s as a tar archive (.tar, .tar.gz, .tar.zst): %s"
                            % (path, error))
    for _ in range(8):  # links to links, a few levels deep
        for name, target in links.items():
            if target in files:
                files.setdefault(name, files[target])
    return files


def read_json_member(files, name, archive):
    try:
        with open(files[name], "rb") as f:
            data = f.read()
    except KeyError:
        raise DownloadError("%s: %s is not in the archive" % (archive, name))
    return parse_json(data, "%s: %s" % (archive, name))


def oci_index_entries(document, archive):
    """The manifests list of an OCI layout's index.json; a wrong shape fails the archive."""
    if not isinstance(document, dict):
        raise DownloadError("%s: index.json is %s, not a JSON object"
                            % (archive, shown(document)))
    entries = document.get("manifests")
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise DownloadError("%s: index.json: manifests is %s, not a list"
                            % (archive, shown(entries)))
    return entries


def docker_archive_entries(document, archive):
    """The entries of a Docker archive's manifest.json; a wrong shape fails the archive."""
    if not isinstance(document, list):
        raise DownloadError("%s: manifest.json is %s, not a list of images"
                            % (archive, shown(document)))
    return document


def docker_entry_problem(entry):
    """What is wrong with one manifest.json entry (None: nothing). Its Config and Layers
    name archive members, its RepoTags the images: each must be the type docker save writes."""
    if not isinstance(entry, dict):
        return "it is %s, not an object" % shown(entry)
    if not isinstance(entry.get("Config"), str):
        return "Config is %s, not the name of a member" % shown(entry.get("Config"))
    layers, tags = entry.get("Layers"), entry.get("RepoTags")
    if layers is not None and not is_list_of_strings(layers):
        return "Layers is %s, not a list of member names" % shown(layers)
    if tags is not None and not is_list_of_strings(tags):
        return "RepoTags is %s, not a list of image names" % shown(tags)
    return None


def layer_media_type(path):
    with open(path, "rb") as f:
        magic = f.read(4)
    return next(media_type for prefix, media_type in DOCKER_LAYER_TYPES
                if magic.startswith(prefix))


def oci_image_name(annotations):
    """The image reference an OCI index entry is named by, or None."""
    annotations = annotations if isinstance(annotations, dict) else {}
    for key in IMAGE_NAME_ANNOTATIONS:
        name = annotations.get(key)
        # A bare "1.0" (the spec's tag-only form) names no repository.
        if isinstance(name, str) and ("/" in name or ":" in name):
            return name
    return None


class ArchiveSource(Source):
    """Images from docker-archive and oci-archive files, handed to Downloader like a tool.

    OCI archives keep every manifest and blob byte for byte, so all digests match the
    upstream. A Docker archive holds no manifest and (usually) uncompressed layers: a
    Docker v2 manifest is written for it, so the config digest (the image ID) and the
    layers' diff IDs match upstream, but the manifest and layer digests cannot.
    """

    name = "archive"

    def __init__(self, workdir):
        self.workdir = workdir
        self.blobs = {}  # digest -> extracted file
        self.manifests = {}  # digest -> manifest bytes written here (Docker archives)
        self.problems = []  # (what, message) for images that cannot be imported
        self._digests = {}  # extracted file -> its digest
        self._referrers = collections.defaultdict(list)  # subject -> [descriptor]

    def add(self, path):
        """Unpack one archive; returns [(ImageRef pinned to its digest, where)]."""
        files = unpack_archive(path, tempfile.mkdtemp(prefix="archive-", dir=self.workdir))
        for name, extracted in files.items():
            match = OCI_BLOB_RE.fullmatch(name)
            if match:
                self.blobs["sha256:" + match.group(1)] = extracted
                self._note_referrer("sha256:" + match.group(1), extracted)
        if "index.json" in files:
            return self._oci_images(path, files)
        if "manifest.json" in files:
            return self._docker_images(path, files)
        raise DownloadError("%s holds neither an OCI layout (index.json) nor a Docker "
                            "archive (manifest.json)" % path)

    def _oci_images(self, path, files):
        images = []
        entries = oci_index_entries(read_json_member(files, "index.json", path), path)
        for number, entry in enumerate(entries, 1):
            where = "%s, index.json entry %d" % (path, number)
            problem = descriptor_problem(entry)
            if problem:
                self.problems.append((where, problem))
                continue
            name = oci_image_name(entry.get("annotations"))
            digest = entry["digest"]
            subject = None if name else self._subject_of_referrer(digest)
            if subject:
                if not self.has_manifest(subject):
                    self.problems.append((where, "a referrer of %s, which is not in the "
                                          "archive" % subject))
                continue  # it comes along with its subject
            if not name:
                self.problems.append((where, "no image name in its annotations (%s)"
                                      % ", ".join(IMAGE_NAME_ANNOTATIONS)))
            elif digest not in self.blobs:
                self.problems.append((where, "its manifest %s is not in the archive" % digest))
            else:
                images.append(self._named(name, digest, where))
        return [image for image in images if image]

    def _docker_images(self, path, files):
        images = []
        entries = docker_archive_entries(read_json_member(files, "manifest.json", path), path)
        for number, entry in enumerate(entries, 1):
            where = "%s, manifest.json entry %d" % (path, number)
            problem = docker_entry_problem(entry)
            if problem:
                self.problems.append((where, problem))
                continue
            layers = entry.get("Layers") or []
            absent = [m for m in [entry["Config"]] + layers if m not in files]
            if absent:
                self.problems.append((where, "%s is not in the archive" % shown(absent[0])))
                continue
            descriptors = [self._blob(files[entry["Config"]], DOCKER_CONFIG)]
            descriptors += [self._blob(files[m], layer_media_type(files[m])) for m in layers]
            body = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
                               "config": descriptors[0], "layers": descriptors[1:]},
                              indent=3).encode()
            digest = sha256_digest(body)
            self.manifests[digest] = body
            if not entry.get("RepoTags"):
                self.problems.append((where, "no RepoTags: the image has no name to serve "
                                      "it under"))
            images += [self._named(tag, digest, where) for tag in entry.get("RepoTags") or []]
        return [image for image in images if image]

    def _blob(self, extracted, media_type):
        if extracted not in self._digests:  # a member named twice is hashed once
            self._digests[extracted] = file_digest(extracted)
        digest = self._digests[extracted]
        self.blobs[digest] = extracted
        return {"mediaType": media_type, "digest": digest, "size": os.path.getsize(extracted)}

    def _named(self, name, digest, where):
        try:
            return parse_reference(name.partition("@")[0])._replace(digest=digest), where
        except ValueError as error:
            self.problems.append((where, str(error)))
            return None

    def _note_referrer(self, digest, extracted):
        """Remember a blob that is a manifest with an OCI 1.1 subject, as a registry's
        referrers API would list it. A blob that is not one is left alone."""
        with open(extracted, "rb") as f:
            if os.fstat(f.fileno()).st_size > MAX_MANIFEST_BYTES or f.read(1) != b"{":
                return
            body = b"{" + f.read()
        try:
            document = check_document(parse_json(body, digest), digest)
        except DownloadError:
            return
        subject = document.get("subject")
        if subject and sha256_digest(body) == digest:
            descriptor = {"mediaType": document.get("mediaType", OCI_MANIFEST),
                          "digest": digest, "size": len(body)}
            self._referrers[subject["digest"]].append(descriptor)

    def _subject_of_referrer(self, digest):
        for subject, found in self._referrers.items():
            if any(d["digest"] == digest for d in found):
                return subject
        return None

    def referrers(self, image, digest):
        """What in the archives refers to digest, as a referrers API lists it."""
        return list(self._referrers.get(digest, ()))

    def tagged(self, image, tag):
        """An archive names images, not tags such as cosign's: there is none to find."""
        return None

    def has_manifest(self, digest):
        return digest in self.manifests or digest in self.blobs

    def manifest(self, reference):
        digest = reference.rpartition("@")[2]
        if digest in self.manifests:
            return self.manifests[digest]
        if digest not in self.blobs:
            raise DownloadError("manifest %s is not in the archive" % reference)
        with open(self.blobs[digest], "rb") as f:
            body = f.read(MAX_MANIFEST_BYTES + 1)
        if len(body) > MAX_MANIFEST_BYTES:
            raise DownloadError("manifest %s is over the %d-byte manifest limit"
                                % (reference, MAX_MANIFEST_BYTES))
        return body

    def fetch_blobs(self, image, manifest_digest, descriptors, workdir, jobs):
        missing = [d["digest"] for d in descriptors if d["digest"] not in self.blobs]
        if missing:
            raise DownloadError("blob %s of %s is not in the archive" % (missing[0], image))
        return {d["digest"]: self.blobs[d["digest"]] for d in descriptors}


# --- The k3s image list ---------------------------------------------------------------

def fetch_url(url):
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.geturl(), response.read()
    except (urllib.error.URLError, OSError) as error:
        raise DownloadError("cannot fetch %s: %s" % (url, getattr(error, "reason", error)))


def resolve_k3s_version(version, channel_url):
    """A full version is used as it is; a channel (stable, v1.30) is resolved like install.sh."""
    if FULL_VERSION_RE.fullmatch(version) and version.count(".") >= 2:
        return version
    final_url, _ = fetch_url("%s/%s" % (channel_url.rstrip("/"), version))
    resolved = urllib.parse.unquote(final_url.rstrip("/").rsplit("/", 1)[-1])
    if not FULL_VERSION_RE.fullmatch(resolved):
        raise DownloadError("channel %r resolved to %s, which names no k3s version"
                            % (version, final_url))
    return resolved


def k3s_image_list(version, release_url):
    url = "%s/%s/%s" % (release_url.rstrip("/"), urllib.parse.quote(version, safe=""),
                        IMAGE_LIST_ASSET)
    _, body = fetch_url(url)
    return parse_image_list(body.decode("utf-8", "replace"), url)


# --- Storage: atomic writes into the tree ---------------------------------------------

def write_atomic(path, data):
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix="." + name + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise


def file_digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1024 * 1024), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


class TreeWriter:
    """Writes manifests, blobs and tags into a registry tree, never a partial file.

    Every name joins the tree in _path_for, which refuses text outside its grammar:
    the gate has checked it already, and this makes sure no missed check can ever reach
    (or remove) a file outside the root.
    """

    NAME_GRAMMARS = {"blob": DIGEST_RE, "manifest": DIGEST_RE, "tag": TAG_RE}

    def __init__(self, root):
        self.root = os.path.abspath(root)
        self.blob_dir = os.path.join(self.root, "blobs")
        self._verified = set()
        os.makedirs(self.blob_dir, exist_ok=True)
        self.remove_stale_temporaries()
        self.workdir = tempfile.mkdtemp(prefix=TEMP_PREFIX + "%d-" % os.getpid(), dir=self.root)

    def remove_stale_temporaries(self):
        """Temporary folders of runs that were killed; a live run's folder is left alone."""
        for entry in os.listdir(self.root):
            if not entry.startswith(TEMP_PREFIX):
                continue
            pid = entry[len(TEMP_PREFIX):].split("-", 1)[0]
            if pid.isdigit() and process_alive(int(pid)):
                continue
            shutil.rmtree(os.path.join(self.root, entry), ignore_errors=True)

    def close(self):
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _repo_dir(self, repo):
        if not matches(TREE_REPO_RE, repo):
            raise DownloadError("refusing repository name %s: not a valid repository name"
                                % shown(repo))
        return os.path.join(self.root, *repo.split("/"))

    def _path_for(self, kind, name, repo=None):
        """ROOT/blobs/<digest> or ROOT/<repo>/manifests/<digest or tag>: the one place a
        name becomes a path in the tree, after its grammar accepts it."""
        if not matches(self.NAME_GRAMMARS[kind], name):
            raise DownloadError("refusing %s name %s: not a valid %s"
                                % (kind, shown(name), "tag" if kind == "tag" else "digest"))
        if kind == "blob":
            return os.path.join(self.blob_dir, name)
        return os.path.join(self._repo_dir(repo), "manifests", name)

    def has_blob(self, descriptor):
        """Present with the right size and digest (hashed once per run)."""
        digest = descriptor["digest"]
        if digest in self._verified:
            return True
        path = self._path_for("blob", digest)
        try:
            if os.path.getsize(path) != descriptor["size"] or file_digest(path) != digest:
                log.warning("blob %s in the store is damaged; fetching it again", path)
                os.unlink(path)
                return False
        except OSError:
            return False
        self._verified.add(digest)
        return True

    def place_blob(self, descriptor, downloaded):
        """Verify a downloaded blob, then move it into the shared store."""
        digest = descriptor["digest"]
        path = self._path_for("blob", digest)
        size = os.path.getsize(downloaded)
        actual = file_digest(downloaded)
        if actual != digest or size != descriptor["size"]:
            raise DownloadError("blob %s arrived as %s (%d bytes, %d expected)"
                                % (digest, actual, size, descriptor["size"]))
        os.chmod(downloaded, 0o644)
        os.replace(downloaded, path)
        self._verified.add(digest)
        return size

    def save_blob(self, data):
        """Write a blob made here (the demo image); returns its digest."""
        digest = sha256_digest(data)
        write_atomic(self._path_for("blob", digest), data)
        return digest

    def link_blobs(self, repo):
        """ROOT/a/b/blobs -> ../blobs and ROOT/a/blobs -> ../blobs, as the original lays out."""
        self._repo_dir(repo)  # refuses a name outside the grammar before any link is made
        parts = repo.split("/")
        for depth in range(len(parts), 0, -1):
            link = os.path.join(self.root, *parts[:depth], "blobs")
            os.makedirs(os.path.dirname(link), exist_ok=True)
            if not os.path.lexists(link):
                os.symlink(os.path.join("..", "blobs"), link)

    def save_manifest(self, repo, body):
        digest = sha256_digest(body)
        path = self._path_for("manifest", digest, repo)
        if not (os.path.isfile(path) and file_digest(path) == digest):
            write_atomic(path, body)
        return digest

    def link_tag(self, repo, tag, digest):
        """Point the tag at its manifest last, so a tag never names missing content."""
        path = self._path_for("tag", tag, repo)
        target = os.path.basename(self._path_for("manifest", digest, repo))
        temp = os.path.join(os.path.dirname(path), ".%s.%d.tmp" % (tag, os.getpid()))
        if os.path.lexists(temp):
            os.unlink(temp)
        os.symlink(target, temp)
        os.replace(temp, path)


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- Downloading ----------------------------------------------------------------------

# what: "image", "3 platforms", "chart" or "artifact"; referrers: [Referrer] saved with it.
Result = collections.namedtuple("Result", "image ok message blobs_new blobs_reused bytes what "
                                "referrers", defaults=("", ()))
Resolved = collections.namedtuple("Resolved", "image where body digest document")
# One manifest that refers to an image's: tag is cosign's or the fallback tag, or None;
# kind is None for a fallback tag's index, which lists referrers and is not one.
Referrer = collections.namedtuple("Referrer", "digest tag kind")
Fetched = collections.namedtuple("Fetched", "body digest document")


class Downloader:
    """Fetches images into the tree; with a finder (the upstream's registry API, or the
    archives), also whatever refers to each manifest saved, and what refers to that."""

    def __init__(self, tool, writer, platforms, trim=True, jobs=4, finder=None):
        self.tool = tool
        self.writer = writer
        self.platforms = platforms
        self.trim = trim
        self.jobs = jobs
        self.finder = finder

    def fetch_manifest(self, reference, expected=None):
        """(bytes, digest, document) of a manifest or index, which has passed the gate."""
        body = self.tool.manifest(reference)
        return self.checked(body, reference, expected)

    @staticmethod
    def checked(body, reference, expected=None):
        digest = sha256_digest(body)
        if expected and digest != expected:
            raise DownloadError("manifest %s arrived with digest %s" % (reference, digest))
        what = "manifest %s" % reference
        return Fetched(body, digest, check_document(parse_json(body, what), what))

    def resolve(self, image, where):
        reference = image.pinned(image.digest) if image.digest else str(image)
        body, digest, document = self.fetch_manifest(reference, image.digest)
        return Resolved(image, where, body, digest, document)

    def download(self, resolved):
        """Fetch one resolved image into the tree; returns a Result."""
        image = resolved.image
        repo = image.tree_repo(self.trim)
        top = Fetched(resolved.body, resolved.digest, resolved.document)
        manifests = self.with_children(image, top, self.platforms)
        counts = self.store(image, repo, manifests)
        if image.tag:
            self.writer.link_tag(repo, image.tag, resolved.digest)
        referrers = []
        if self.finder:
            try:
                referrers = self.save_referrers(image, repo, [m.digest for m in manifests],
                                                counts)
            except DownloadError as error:
                raise DownloadError("%s is saved, but not all that refers to it: %s"
                                    % (resolved.digest, error))
        return Result(image, True, resolved.digest, counts["new"], counts["reused"],
                      counts["bytes"], describe(top.document, len(manifests) - 1), referrers)

    def with_children(self, image, top, platforms):
        """[Fetched]: an index's children for platforms (children without a platform,
        such as an artifact's, always), then the top manifest itself."""
        if manifest_kind(top.document) != "index":
            return [top]
        entries = top.document.get("manifests", [])
        wanted = [c for c in entries
                  if ("platform" not in c or platform_matches(platforms, c["platform"]))
                  and self.tool.has_manifest(c["digest"])]
        if not wanted and platforms is None:
            raise DownloadError("index %s names no manifest that is here" % top.digest)
        if not wanted:
            raise DownloadError("no manifest for %s in the index (it has: %s)" % (
                ", ".join(platform_names(platforms)),
                ", ".join(describe_platform(c.get("platform")) for c in entries)))
        children = [self.fetch_manifest(image.pinned(c["digest"]), c["digest"]) for c in wanted]
        nested = [child.digest for child in children if manifest_kind(child.document) != "manifest"]
        if nested:
            raise DownloadError("index %s names another index, %s; an index of indexes "
                                "is not supported" % (top.digest, nested[0]))
        return children + [top]

    def store(self, image, repo, manifests, counts=None):
        """Fetch the blobs the manifests name that the tree lacks, then save the manifests
        in order (children before their index); counts new, reused and bytes."""
        counts = counts if counts is not None else collections.Counter()
        for manifest in manifests:
            if manifest_kind(manifest.document) == "index":
                continue
            descriptors = unique(blob_descriptors(manifest.document))
            missing = [d for d in descriptors if not self.writer.has_blob(d)]
            counts["reused"] += len(descriptors) - len(missing)
            if missing:
                paths = self.tool.fetch_blobs(image, manifest.digest, missing,
                                              self.writer.workdir, self.jobs)
                for descriptor in missing:
                    counts["bytes"] += self.writer.place_blob(descriptor,
                                                              paths[descriptor["digest"]])
                counts["new"] += len(missing)
        self.writer.link_blobs(repo)
        for manifest in manifests:
            self.writer.save_manifest(repo, manifest.body)
        return counts

    # Referrers: breadth first from the image's manifests, each manifest saved once.

    def save_referrers(self, image, repo, subjects, counts):
        """Save what refers to each subject, and what refers to that in turn; returns the
        [Referrer] saved, in order. A manifest reached again (the image itself under a
        cosign tag, or a referrer found by two routes) gets its tag, and counts once."""
        saved, seen, level = [], set(subjects), list(subjects)
        budget = [MAX_REFERRERS]  # manifests this image's search may still fetch
        for _ in range(MAX_REFERRER_DEPTH):
            following = []
            for subject in level:
                for found, tag, kind in self.find_referrers(image, subject, budget):
                    first_time = found.digest not in seen
                    if first_time:
                        # A fallback tag's index names referrers saved just before it.
                        manifests = [found] if kind is None else self.with_children(
                            image, found, None)
                        self.store(image, repo, manifests, counts)
                        following += [found.digest] if kind else []
                        seen.add(found.digest)
                    elif not tag:
                        continue
                    if tag:
                        self.writer.link_tag(repo, tag, found.digest)
                    saved.append(Referrer(found.digest, tag, kind if first_time else None))
            level = following
            if not level:
                return saved
        log.warning("%s: referrers nested deeper than %d were not followed", image,
                    MAX_REFERRER_DEPTH)
        return saved

    def find_referrers(self, image, subject, budget):
        """[(Fetched, tag, kind)] of what refers to subject: the referrers API where the
        upstream offers it, else the fallback tag's index (listed after the referrers it
        names), and cosign's .sig, .att and .sbom tags. What names another subject is
        left out, with a warning; budget[0] bounds the manifests listed and fetched."""
        tag_base = "sha256-" + digest_hex(subject)
        listed, fallback = self.finder.referrers(image, subject), None
        if listed is None:
            fallback = self.tagged(image, tag_base)
            if fallback and manifest_kind(fallback.document) != "index":
                log.warning("%s: the fallback tag %s holds a manifest, not an index of "
                            "referrers; left out", image, tag_base)
                fallback = None
            listed = fallback.document.get("manifests", []) if fallback else []
        if len(listed) > budget[0]:
            raise DownloadError("more than %d manifests refer to %s; not followed"
                                % (MAX_REFERRERS, image))
        budget[0] -= len(listed)
        found, strays = [], []
        for descriptor in listed:
            referrer = self.fetch_manifest(image.pinned(descriptor["digest"]),
                                           descriptor["digest"])
            if subject_of(referrer.document) == subject:
                found.append((referrer, None, referrer_kind(referrer.document)))
            else:
                strays.append(referrer.digest)
        if strays:
            log.warning("%s: %d listed as referrers of %s do not name it as their subject; "
                        "left out: %s", image, len(strays), subject, ", ".join(strays[:3]))
            fallback = None  # an index naming what is not saved is not saved either
        if fallback:
            found.append((fallback, tag_base, None))
        for suffix, kind in COSIGN_TAG_KINDS:
            tag = "%s.%s" % (tag_base, suffix)
            tagged = self.tagged(image, tag)
            if tagged and subject_of(tagged.document) not in (None, subject):
                log.warning("%s: the tag %s names another subject, %s; left out", image, tag,
                            subject_of(tagged.document))
            elif tagged:
                found.append((tagged, tag, kind))
        return found

    def tagged(self, image, tag):
        """Fetched of the manifest under tag in the image's repository, or None."""
        body = self.finder.tagged(image, tag)
        return self.checked(body, "%s:%s" % (image.repo, tag)) if body is not None else None


def unique(descriptors):
    seen, result = set(), []
    for d in descriptors:
        if d["digest"] not in seen:
            seen.add(d["digest"])
            result.append(d)
    return result


def platform_names(platforms):
    return ["all"] if platforms is None else ["/".join(p for p in platform if p)
                                              for platform in platforms]


def describe_platform(platform):
    platform = platform or {}
    return "/".join(p for p in (platform.get("os"), platform.get("architecture"),
                                platform.get("variant")) if p) or "unknown"


def find_collisions(resolved, trim):
    """Sources that trimming maps onto one repo:tag with different digests."""
    first, problems = {}, {}
    for item in resolved:
        key = (item.image.tree_repo(trim), item.image.tag or item.digest)
        earlier = first.setdefault(key, item)
        if earlier.digest != item.digest and earlier.image.repo != item.image.repo:
            message = ("%s and %s both become %s:%s with different digests; use -n to keep "
                       "the registry host" % (earlier.image, item.image, key[0], key[1]))
            problems[str(earlier.image)] = problems[str(item.image)] = message
    return problems


def download_all(downloader, images):
    """Resolve every image, refuse collisions, then download; one failure stops nothing."""
    results, resolved = [], []
    for image, where in images:
        try:
            resolved.append(downloader.resolve(image, where))
        except DownloadError as error:
            results.append(Result(image, False, "%s (%s)" % (error, where), 0, 0, 0))
            log.error("%s: %s", image, error)
    collisions = find_collisions(resolved, downloader.trim)
    for item in resolved:
        if str(item.image) in collisions:
            results.append(Result(item.image, False, collisions[str(item.image)], 0, 0, 0))
            log.error("%s: %s", item.image, collisions[str(item.image)])
            continue
        try:
            result = downloader.download(item)
        except (DownloadError, OSError) as error:
            # OSError: the tree could not take it (disk full, a name that is a file there).
            result = Result(item.image, False, "%s (%s)" % (error, item.where), 0, 0, 0)
            log.error("%s: %s", item.image, error)
        else:
            named = item.image._replace(digest=None) if item.image.tag else item.image
            carried = count_referrers([result])
            log.info("%s %s %s, %d blobs new (%s), %d reused%s", named, item.digest,
                     result.what, result.blobs_new, human_bytes(result.bytes),
                     result.blobs_reused, "; with " + carried if carried else "")
        results.append(result)
    return results


def summarise(results, seconds):
    ok = [r for r in results if r.ok]
    lines = ["%d images: %d ok, %d failed; blobs %d new / %d reused; %s in %.1fs" % (
        len(results), len(ok), len(results) - len(ok), sum(r.blobs_new for r in results),
        sum(r.blobs_reused for r in results), human_bytes(sum(r.bytes for r in results)),
        seconds)]
    if count_referrers(results):
        lines.append("with them: " + count_referrers(results))
    lines += ["  FAILED %s: %s" % (r.image, r.message) for r in results if not r.ok]
    return "\n".join(lines)


def count_referrers(results):
    """'2 signatures, 1 SBOM' for the referrers the results brought, each counted once."""
    kinds = {(r.image.tree_repo(), found.digest): found.kind
             for r in results for found in r.referrers if found.kind}
    return count_kinds(kinds.values())


# --- Bundles: what crosses the gap, and what the other side already has ------------------

BUNDLE_TOP = "registry"  # tar -xf FILE -C /var/lib/rancher/k3s/server/ gives .../registry
BUNDLE_FORMATS = ((".tar.gz", "gz"), (".tgz", "gz"), (".tar.zst", "zst"), (".tar", ""))
# What a bundle says of itself, where the server never serves and --check never looks.
BUNDLE_META = ".bundle"

# What a node holds: {(repository, manifest digest)} and {blob digest}.
Inventory = collections.namedtuple("Inventory", "manifests blobs")


def bundle_format(path):
    """The compression a bundle's file name asks for; DownloadError for any other name."""
    for suffix, compression in BUNDLE_FORMATS:
        if path.endswith(suffix):
            return compression
    raise DownloadError("--bundle %s: the name must end in .tar, .tar.gz or .tar.zst" % path)


def read_since(path):
    """The Inventory of --since PATH: a tree directory, or the --check --json report of one."""
    if os.path.isdir(path):
        return inventory_of_tree(path)
    try:
        report = parse_json(read_regular(path, MAX_INVENTORY_BYTES), "--since %s" % path)
    except OSError as error:
        raise DownloadError("cannot read --since %s: %s" % (path, error.strerror))
    inventory = report.get("inventory") if isinstance(report, dict) else None
    manifests = inventory.get("manifests") if isinstance(inventory, dict) else None
    blobs = inventory.get("blobs") if isinstance(inventory, dict) else None
    if not isinstance(manifests, dict) or not isinstance(blobs, dict):
        raise DownloadError("--since %s is not an inventory (embedded_registry.py --check "
                            "--json) nor a tree directory" % path)
    pairs = [(repo, digest) for digest, repos in manifests.items()
             for repo in (repos if isinstance(repos, list) else [None])]
    bad = [d for d in list(blobs) + [d for _, d in pairs] if not matches(DIGEST_RE, d)]
    bad += [r for r, _ in pairs if not matches(TREE_REPO_RE, r)]
    if bad:
        raise DownloadError("--since %s: %s is not a digest or repository name"
                            % (path, shown(bad[0])))
    return Inventory(set(pairs), set(blobs))


def inventory_of_tree(root):
    """What embedded_registry.py --check --json lists of a tree: every digest-named
    manifest that hashes to its name and whose blobs are there with their sizes (with
    its repositories), and those blobs."""
    manifests, blobs = set(), set()
    root = os.path.abspath(root)
    for top, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "blobs"]
        if "manifests" not in dirs:
            continue
        repo = os.path.relpath(top, root).replace(os.sep, "/")
        for name in sorted(os.listdir(os.path.join(top, "manifests"))):
            document = sound_manifest(os.path.join(top, "manifests", name), name)
            if document is None:
                continue
            named = blob_descriptors_of(document)
            present = [d for d in named
                       if blob_size(os.path.join(top, "blobs", d["digest"])) == d["size"]]
            if len(present) == len(named):
                manifests.add((repo, name))
                blobs.update(d["digest"] for d in present)
    return Inventory(manifests, blobs)


def sound_manifest(path, name):
    """The document of a digest-named manifest file that hashes to its name, else None."""
    if not matches(DIGEST_RE, name):
        return None
    try:
        body = read_regular(path, MAX_MANIFEST_BYTES)
        if sha256_digest(body) != name:
            return None
        return check_document(parse_json(body, path), path)
    except (OSError, DownloadError):
        return None


def read_regular(path, limit):
    """The bytes of a regular file of at most limit bytes; OSError for anything else
    (a FIFO would hang the read, /dev/zero would never end it)."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError(errno.EINVAL, "not a regular file", path)
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, "over %d bytes" % limit, path)
    return data


def blob_descriptors_of(document):
    return [] if manifest_kind(document) == "index" else blob_descriptors(document)


def blob_size(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


class Bundle:
    """The members of one bundle, in the order that is safe to unpack beside a serving
    registry: blobs, then the repositories' blobs links, then digest-named manifests
    (an index after its children), then tags, then what the bundle says of itself."""

    def __init__(self, root, platforms=None, since=None):
        self.root = os.path.abspath(root)
        self.platforms = platforms  # the run's; None: all
        self.since = since or Inventory(set(), set())
        self.blobs, self.links, self.manifests, self.tags = {}, set(), [], {}
        self.left_out = collections.Counter()  # blobs and manifests the other side has
        self.full_bytes = 0  # what a full bundle would carry
        self._seen = set()

    def add(self, result, repo):
        """One image of the run, and what came along with it: manifests and blobs as the
        tree holds them, and their tags."""
        known_repo = any(r == repo for r, _ in self.since.manifests)
        parts = repo.split("/")
        if not known_repo:
            self.links.update("/".join(parts[:depth]) for depth in range(1, len(parts) + 1))
        tagged = [(result.message, result.image.tag, self.platforms)]
        # A referrer comes whole; a manifest reached again (kind None) as the run saved it.
        tagged += [(found.digest, found.tag, None if found.kind else self.platforms)
                   for found in result.referrers]
        for digest, tag, platforms in tagged:
            for manifest_digest, document in self._manifests_of(repo, digest, platforms):
                for descriptor in blob_descriptors_of(document):
                    self._add_blob(descriptor["digest"])
                self._add_manifest(repo, manifest_digest)
            if tag:
                self.tags["%s/manifests/%s" % (repo, tag)] = digest

    def _manifests_of(self, repo, digest, platforms):
        """(digest, document) of the top manifest and its children in the tree for
        platforms (children without a platform, always), children first."""
        top = self._document(repo, digest)
        children = [c["digest"] for c in top.get("manifests", [])
                    if manifest_kind(top) == "index"
                    and ("platform" not in c or platform_matches(platforms, c["platform"]))
                    and os.path.isfile(self._path(repo, "manifests", c["digest"]))]
        return [(c, self._document(repo, c)) for c in children] + [(digest, top)]

    def _document(self, repo, digest):
        """A manifest as this run left it, hashed again: a bundle ships nothing damaged."""
        document = sound_manifest(self._path(repo, "manifests", digest), digest)
        if document is None:
            raise DownloadError("manifest %s of %s in the tree is missing or damaged; run "
                                "again without --bundle to repair it" % (digest, repo))
        return document

    def _path(self, repo, kind, name):
        return os.path.join(self.root, *repo.split("/"), kind, name)

    def _add_blob(self, digest):
        if digest in self._seen:
            return
        self._seen.add(digest)
        size = os.path.getsize(os.path.join(self.root, "blobs", digest))
        self.full_bytes += size
        if digest in self.since.blobs:
            self.left_out["blobs"] += 1
        else:
            self.blobs[digest] = size

    def _add_manifest(self, repo, digest):
        if (repo, digest) in self._seen:
            return
        self._seen.add((repo, digest))
        self.full_bytes += os.path.getsize(self._path(repo, "manifests", digest))
        if (repo, digest) in self.since.manifests:
            self.left_out["manifests"] += 1
        else:
            self.manifests.append((repo, digest))

    def content_bytes(self):
        """What this bundle carries, before compression."""
        return sum(self.blobs.values()) + sum(
            os.path.getsize(self._path(repo, "manifests", d)) for repo, d in self.manifests)

    def write(self, path, meta):
        """Write the bundle to path, under a temporary name renamed once complete, and
        path.sha256 beside it (sha256sum -c); returns its size. meta: [(name, text)]."""
        compression = bundle_format(path)
        directory = os.path.dirname(os.path.abspath(path))
        fd, temp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".",
                                    suffix=".partial", dir=directory)
        try:
            with os.fdopen(fd, "wb") as out, compressed(out, compression, path) as stream:
                with tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                    self._add_members(tar, meta)
            digest = file_digest(temp)
            os.chmod(temp, 0o644)
            os.replace(temp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        write_atomic(path + ".sha256", ("%s  %s\n" % (
            digest.split(":", 1)[1], os.path.basename(path))).encode())
        return os.path.getsize(path)

    def _add_members(self, tar, meta):
        for digest in sorted(self.blobs):
            self._add_file(tar, "blobs/" + digest, os.path.join(self.root, "blobs", digest))
        for repo in sorted(self.links):
            self._add_link(tar, repo + "/blobs", "../blobs")
        for repo, digest in self.manifests:
            self._add_file(tar, "%s/manifests/%s" % (repo, digest),
                           self._path(repo, "manifests", digest))
        for name, digest in sorted(self.tags.items()):
            self._add_link(tar, name, digest)
        for name, text in meta:
            data = text.encode()
            info = bundle_member("%s/%s" % (BUNDLE_META, name))
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

    @staticmethod
    def _add_file(tar, name, source):
        with open(source, "rb") as f:
            info = bundle_member(name)
            info.size = os.fstat(f.fileno()).st_size
            tar.addfile(info, f)

    @staticmethod
    def _add_link(tar, name, target):
        info = bundle_member(name)
        info.type, info.linkname = tarfile.SYMTYPE, target
        tar.addfile(info)


def bundle_member(name):
    info = tarfile.TarInfo("%s/%s" % (BUNDLE_TOP, name))
    info.mode, info.mtime = 0o644, int(time.time())
    return info


@contextlib.contextmanager
def compressed(out, compression, path):
    """A stream that writes into out as the bundle's name asks: plain, gzip or zstd."""
    if compression == "gz":
        with gzip.GzipFile(filename="", fileobj=out, mode="wb", mtime=0) as gz:
            yield gz
        return
    if compression != "zst":
        yield out
        return
    zstd = shutil.which("zstd")
    if not zstd:
        raise DownloadError("--bundle %s: the zstd program is not installed (apt-get install "
                            "zstd), or name a .tar.gz bundle" % path)
    process = subprocess.Popen([zstd, "-q", "-c", "-T0"], stdin=subprocess.PIPE, stdout=out)
    try:
        yield process.stdin
    finally:
        process.stdin.close()
        if process.wait() != 0:
            raise DownloadError("zstd failed writing %s" % path)


def read_all_since(paths):
    """One Inventory of everything every --since PATH has."""
    since = Inventory(set(), set())
    for path in paths:
        more = read_since(path)
        since = Inventory(since.manifests | more.manifests, since.blobs | more.blobs)
    return since


def make_bundle(path, results, args, platforms, version, since):
    """Write the run's bundle; returns its summary line."""
    failed = [r for r in results if not r.ok]
    if failed:  # its image list would make --gc remove the failed images from the node
        raise DownloadError("no bundle written: %d images failed, and a bundle must hold the "
                            "whole set; fix them and run again" % len(failed))
    bundle = Bundle(args.directory, platforms, since)
    try:
        for result in results:
            bundle.add(result, result.image.tree_repo(not args.no_trim))
    except OSError as error:
        raise DownloadError("cannot bundle %s: %s" % (error.filename, error.strerror))
    # By tag where there is one, as an image list names it (--gc --keep reads this file).
    meta = [("images.txt", "".join(str(r.image._replace(digest=None) if r.image.tag
                                       else r.image) + "\n" for r in results))]
    if version:
        meta.append(("k3s-version", version + "\n"))
    try:
        size = bundle.write(path, meta)
    except OSError as error:
        raise DownloadError("cannot write bundle %s: %s" % (path, error.strerror or error))
    return "bundle %s: %s (content %s; a full bundle's: %s); %d blobs and %d manifests " \
        "already there" % (os.path.basename(path), human_bytes(size),
                           human_bytes(bundle.content_bytes()),
                           human_bytes(bundle.full_bytes), bundle.left_out["blobs"],
                           bundle.left_out["manifests"])


# --- A demo tree (make run) ---------------------------------------------------------

def write_demo_image(root):
    """One small single-platform OCI image, demo/hello:latest, made here from nothing."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        text = b"Hello from embedded-registry\n"
        info = tarfile.TarInfo("hello.txt")
        info.size = len(text)
        tar.addfile(info, io.BytesIO(text))
    layer = gzip.compress(raw.getvalue(), mtime=0)
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers",
                                    "diff_ids": [sha256_digest(raw.getvalue())]}}).encode()
    writer = TreeWriter(root)
    try:
        descriptors = []
        for data, media_type in ((config, "application/vnd.oci.image.config.v1+json"),
                                 (layer, "application/vnd.oci.image.layer.v1.tar+gzip")):
            descriptors.append({"mediaType": media_type, "digest": writer.save_blob(data),
                                "size": len(data)})
        manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                               "config": descriptors[0], "layers": descriptors[1:]}).encode()
        writer.link_blobs("demo/hello")
        writer.link_tag("demo/hello", "latest", writer.save_manifest("demo/hello", manifest))
    finally:
        writer.close()


# --- Command line -------------------------------------------------------------------

def make_parser():
    parser = argparse.ArgumentParser(
        prog="download_system_images.py",
        description="Download the k3s system images (and extra images) into a registry tree "
                    "that embedded_registry.py serves.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python3 download_system_images.py -f extra-images.txt -p linux/arm64\n"
               "  python3 download_system_images.py -v v1.31.4+k3s1 -p linux/amd64,linux/arm64\n"
               "  python3 download_system_images.py -s -f my-images.txt --dry-run\n"
               "  echo oci://ghcr.io/org/charts/app:1.2.3 > charts.txt\n"
               "  python3 download_system_images.py -s -f charts.txt\n"
               "\nenvironment:\n"
               "  %s, %s  override the channel and release base URLs\n"
               % (CHANNEL_URL_ENV, RELEASE_URL_ENV))
    parser.add_argument("-v", "--version", default="stable",
                        help="k3s version (v1.31.4+k3s1) or channel (stable, latest, v1.30) "
                             "whose k3s-images.txt to download (default: %(default)s)")
    parser.add_argument("-d", "--directory", default="./registry",
                        help="the registry tree to fill (default: %(default)s)")
    parser.add_argument("-f", "--file", action="append", default=[], metavar="FILE",
                        help="extra image list, one reference per line; may be repeated")
    parser.add_argument("-p", "--platform", default="linux/amd64",
                        help="OS/ARCH[/VARIANT], a comma-separated list, or all "
                             "(default: %(default)s)")
    parser.add_argument("-n", "--no-trim", action="store_true",
                        help="keep the registry host as the first path component of each repo")
    parser.add_argument("-s", "--skip-k3s", action="store_true",
                        help="download only the -f lists, not the k3s system images")
    parser.add_argument("-j", "--jobs", type=int, default=4, metavar="N",
                        help="parallel blob downloads (default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print what would be downloaded, and where, then exit")
    parser.add_argument("--tool", choices=sorted(TOOLS),
                        help="the download tool (default: crane if on PATH, else skopeo)")
    parser.add_argument("--insecure", action="store_true",
                        help="allow a plain-HTTP or self-signed upstream (the tool's own flag)")
    parser.add_argument("--channel-url", default=os.environ.get(CHANNEL_URL_ENV,
                                                                DEFAULT_CHANNEL_URL),
                        help="k3s channel server (default: %(default)s)")
    parser.add_argument("--release-url", default=os.environ.get(RELEASE_URL_ENV,
                                                                DEFAULT_RELEASE_URL),
                        help="k3s release download base (default: %(default)s)")
    yaml = parser.add_argument_group("k3s registries.yaml")
    yaml.add_argument("--registries-yaml", metavar="FILE",
                      help="also write a registries.yaml mirroring %s and every source "
                           "registry to --endpoint" % MIRROR_NAME)
    yaml.add_argument("--endpoint", metavar="URL",
                      help="the embedded registry as the nodes reach it, "
                           "e.g. https://127.0.0.1:5443")
    yaml.add_argument("--ca-file", default="/etc/embedded-registry/ca.crt",
                      help="CA file named in registries.yaml (default: %(default)s)")
    carried = parser.add_mutually_exclusive_group()
    carried.add_argument("--referrers", dest="referrers", action="store_true", default=True,
                         help="also save what refers to each manifest saved: cosign's "
                              "signatures, attestations and SBOMs (tags sha256-<hex>.sig, "
                              ".att, .sbom) and OCI 1.1 referrers (the referrers API, or "
                              "its fallback tag sha256-<hex>), recursively (the default)")
    carried.add_argument("--no-referrers", dest="referrers", action="store_false",
                         help="save the images only; a site that verifies signatures "
                              "needs them")
    parser.add_argument("--from-archive", nargs="+", metavar="FILE",
                        help="import docker-archive or oci-archive files (.tar, .tar.gz, "
                             ".tar.zst), such as k3s-airgap-images-<arch>.tar, instead of "
                             "downloading; needs no crane, skopeo or internet")
    bundle = parser.add_argument_group("bundles (what crosses the air gap)")
    bundle.add_argument("--bundle", metavar="FILE",
                        help="after the run, write FILE (.tar, .tar.gz or .tar.zst) holding "
                             "exactly this run's images, and FILE.sha256; unpack it on the "
                             "node with tar -xf FILE -C /var/lib/rancher/k3s/server/")
    bundle.add_argument("--since", action="append", default=[], metavar="PATH",
                        help="with --bundle, leave out what PATH already has: the node's "
                             "inventory (embedded_registry.py --check --json) or a copy of "
                             "its tree; may be repeated")
    parser.add_argument("--demo", action="store_true",
                        help="write a one-image demo tree (demo/hello:latest) and exit")
    parser.add_argument("--debug", action="store_true", help="print every tool command")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only failures")
    return parser


def read_lists(args):
    """(images, the k3s version whose list was read, or None)."""
    images, version = [], None
    if not args.skip_k3s:
        version = resolve_k3s_version(args.version, args.channel_url)
        log.info("Downloading image list for %s", version)
        images += k3s_image_list(version, args.release_url)
    for path in args.file:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as error:
            raise DownloadError("cannot read image list %s: %s" % (path, error.strerror))
        images += parse_image_list(text, path)
    return images, version


def read_archives(paths, workdir):
    source = ArchiveSource(workdir)
    images = []
    for path in paths:
        images += source.add(path)
    return source, images


def main(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    if bool(args.registries_yaml) != bool(args.endpoint):
        parser.error("--registries-yaml and --endpoint go together")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if args.from_archive and args.file:
        parser.error("--from-archive imports archives only; download -f lists in another run")
    if args.since and not args.bundle:
        parser.error("--since goes with --bundle")
    if args.skip_k3s and not args.file and not args.demo:
        parser.error("-s/--skip-k3s needs at least one -f image list")
    level = logging.DEBUG if args.debug else logging.ERROR if args.quiet else logging.INFO
    logging.basicConfig(level=level, stream=sys.stderr, format="%(message)s")
    started = time.monotonic()
    writer = bundled = None
    try:
        if args.demo:
            write_demo_image(args.directory)
            log.info("wrote demo/hello:latest into %s", args.directory)
            return 0
        platforms = parse_platforms(args.platform)
        version = None
        if args.bundle:  # every mistake in the bundle's flags is found before downloading
            bundle_format(args.bundle)
            if not os.path.isdir(os.path.dirname(os.path.abspath(args.bundle))):
                raise DownloadError("--bundle %s: its directory does not exist" % args.bundle)
            since = read_all_since(args.since)
        if args.from_archive:
            writer = TreeWriter(args.directory)
            tool, images = read_archives(args.from_archive, writer.workdir)
        else:
            images, version = read_lists(args)
        if args.registries_yaml:
            write_atomic(args.registries_yaml, registries_yaml(
                [image.registry for image, _ in images], args.endpoint, args.ca_file).encode())
        if args.dry_run:
            for image, where in images:
                print("%s -> %s/%s  (%s)" % (image, args.directory,
                                            image.tree_repo(not args.no_trim), where))
            return 0
        if not args.from_archive:
            tool = find_tool(args.tool, args.insecure)
            writer = TreeWriter(args.directory)
        finder = None
        if args.referrers:
            finder = tool if args.from_archive else UpstreamRegistry(tool.auth_files,
                                                                     args.insecure)
        downloader = Downloader(tool, writer, platforms, not args.no_trim, args.jobs, finder)
        results = download_all(downloader, images)
        results += [Result(what, False, message, 0, 0, 0)
                    for what, message in tool.problems]
        if args.bundle:
            bundled = make_bundle(args.bundle, results, args, platforms, version, since)
    except DownloadError as error:
        print("%s: error: %s" % (parser.prog, error), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run again to complete the tree", file=sys.stderr)
        return 130
    finally:
        if writer:
            writer.close()
    summary = summarise(results, time.monotonic() - started)
    if bundled:
        summary += "\n" + bundled
    print(summary, file=sys.stderr if not all(r.ok for r in results) else sys.stdout)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
