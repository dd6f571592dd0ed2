"""`rwkvtune models download` and rwkvtune.hub against a local stand-in for the Hugging Face Hub.

Nothing here touches the network. ``FakeHub`` runs two HTTP servers on 127.0.0.1 (random free
ports) in daemon threads: "hub" answers HEAD/GET of ``/{repo}/resolve/{revision}/{file}`` as
huggingface.co does for an LFS file (302 to the blob, with X-Repo-Commit, X-Linked-Etag = sha256
and X-Linked-Size; 404 with X-Error-Code for a missing repo, revision or file) and the file listing
``/api/models/{repo}/tree/{revision}`` that huggingface_hub's list_repo_tree reads, and "cdn" serves
blobs with Range support. Both log every request, can cut a GET midway or answer 503, and are shut
down by the fixture. HF_ENDPOINT points huggingface_hub at "hub".
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from rwkvtune import hub
from rwkvtune.cli import main
from rwkvtune.configs.model_loader import (
    ModelConfig,
    list_available_models,
    load_model_config,
)
from rwkvtune.errors import ConfigError, DownloadError, OutputError

pytest.importorskip("huggingface_hub")

REPO = "test-org/tiny-rwkv"
FILE = "tiny.pth"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TIMEOUT = 60  # seconds, for every subprocess


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _git_oid(data: bytes) -> str:
    """The git blob id of a file stored in git, as the hub's listing gives it."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10  # a stuck client cannot hold a server thread for long

    def log_message(self, *args):  # keep test output clean
        pass

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        fake: FakeHub = self.server.fake
        role = self.server.role
        with fake.lock:
            fake.log.append((role, self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
        if role == "hub" and self.path.startswith("/api/models/"):
            self._tree(fake, body)
        elif role == "hub":
            self._resolve(fake, body)
        else:
            self._blob(fake, body)

    def _send(self, status: int, headers: dict[str, str], data: bytes = b"", body: bool = True) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _resolve(self, fake: "FakeHub", body: bool) -> None:
        parts = self.path.split("/", 5)  # "", owner, name, "resolve", revision, file
        if len(parts) < 6 or parts[3] != "resolve":
            return self._send(404, {"X-Error-Code": "RepoNotFound"}, body=body)
        repo, revision, name = f"{parts[1]}/{parts[2]}", parts[4], parts[5]
        if not any(r == repo for r, _ in fake.files):
            return self._send(404, {"X-Error-Code": "RepoNotFound"}, body=body)
        if revision not in ("main", COMMIT):
            return self._send(404, {"X-Error-Code": "RevisionNotFound"}, body=body)
        if (repo, name) not in fake.files:
            return self._send(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT}, body=body)
        data, advertised, size = fake.files[repo, name]
        if not fake.is_lfs(name):  # a file stored in git: served by the hub itself, its ETag the git blob id
            return self._ranged(fake, data, body, {"ETag": f'"{_git_oid(data)}"', "X-Repo-Commit": COMMIT})
        linked = {"X-Linked-Etag": f'"{advertised}"', "X-Linked-Size": str(size)} if fake.linked else {}
        if fake.redirect:
            etag = hashlib.sha1(advertised.encode()).hexdigest()  # the pointer's git oid, as the hub sends
            return self._send(302, {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"', "Location":
                                    f"{fake.cdn_url}/blobs/{_sha(data)}"} | linked, body=body)
        # A mirror serving the file itself; its ETag is the sha256 of what it serves.
        self._ranged(fake, data, body, {"ETag": f'"{_sha(data)}"', "X-Repo-Commit": COMMIT} | linked)

    def _tree(self, fake: "FakeHub", body: bool) -> None:
        """``GET /api/models/{repo}/tree/{revision}?recursive=...``, what HfApi.list_repo_tree asks: a JSON
        list of the repository's files, LFS ones with their sha256 (``lfs.oid``), as the hub answers."""
        path = urlsplit(self.path).path
        parts = path.split("/")  # "", "api", "models", owner, name, "tree", revision
        if len(parts) < 7 or parts[5] != "tree":
            return self._send(404, {"X-Error-Code": "RepoNotFound"}, body=body)
        repo, revision = f"{parts[3]}/{parts[4]}", parts[6]
        if not any(r == repo for r, _ in fake.files):
            return self._send(404, {"X-Error-Code": "RepoNotFound"}, body=body)
        if revision not in ("main", COMMIT):
            return self._send(404, {"X-Error-Code": "RevisionNotFound"}, body=body)
        if fake.listing is not None:
            return self._send(200, {"Content-Type": "application/json"}, fake.listing, body=body)
        entries = []
        for (r, name), (data, advertised, size) in sorted(fake.files.items()):
            if r != repo:
                continue
            entry = {"type": "file", "oid": fake.oids.get((r, name)) or _git_oid(data), "size": size, "path": name}
            if fake.is_lfs(name):
                entry["lfs"] = {"oid": advertised, "size": size, "pointerSize": 134}
            entries.append(entry)
        return self._send(200, {"Content-Type": "application/json"}, json.dumps(entries).encode(), body=body)

    def _blob(self, fake: "FakeHub", body: bool) -> None:
        data = fake.blobs.get(self.path.rsplit("/", 1)[-1])
        if data is None:
            return self._send(404, {}, body=body)
        self._ranged(fake, data, body, {"ETag": f'"{_sha(data)}"'})

    def _ranged(self, fake: "FakeHub", data: bytes, body: bool, headers: dict[str, str]) -> None:
        """200 or 206 (Range: bytes=N-); on a GET, maybe 503, or the body cut midway."""
        cut = fail = False
        if body:
            with fake.lock:
                if fake.fail_gets:
                    fake.fail_gets, fail = fake.fail_gets - 1, True
                elif fake.cut_gets:
                    fake.cut_gets, cut = fake.cut_gets - 1, True
                    if fake.refuse_after_cut:
                        fake.fail_gets = 10
        if fail:
            return self._send(503, {}, b"busy", body=True)
        start = 0
        rng = "" if fake.ignore_range else self.headers.get("Range", "")
        if rng.startswith("bytes=") and rng.endswith("-"):
            start = int(rng[6:-1])
        part = data[start:]
        status = 206 if start else 200
        extra = {"Accept-Ranges": "bytes"}
        if start:
            extra["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        if not cut:
            return self._send(status, headers | extra, part, body=body)
        self.send_response(status)  # announce everything, send half, hang up
        for k, v in (headers | extra | {"Content-Length": str(len(part))}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(part[: len(part) // 2])
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)


class FakeHub:
    """The hub and its CDN on two local ports; ``add`` publishes a file."""

    def __init__(self):
        self.lock = threading.Lock()
        # (repo, file) -> (data, advertised sha256, advertised size)
        self.files: dict[tuple[str, str], tuple[bytes, str, int]] = {}
        self.blobs: dict[str, bytes] = {}
        self.log: list[tuple[str, str, str, dict[str, str]]] = []
        self.cut_gets = self.fail_gets = 0
        self.refuse_after_cut = False  # after cutting a GET, answer 503 to the next ones
        self.redirect = True  # as huggingface.co does for LFS files; False: a mirror serving them itself
        self.linked = True  # X-Linked-Etag/X-Linked-Size (the LFS sha256 and size) in the HEAD's answer
        self.ignore_range = False  # True: every GET answers 200 with the whole file
        self.listing: bytes | None = None  # set: the tree endpoint answers these bytes instead of the files
        self.oids: dict[tuple[str, str], str] = {}  # (repo, file) -> the git oid the listing claims, if not the data's
        self.servers = []
        for role in ("hub", "cdn"):
            server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
            server.daemon_threads = True
            server.fake, server.role = self, role
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
            self.servers.append(server)
        self.url = f"http://127.0.0.1:{self.servers[0].server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{self.servers[1].server_address[1]}"

    def add(self, repo: str, name: str, data: bytes, advertise: str | None = None, size: int | None = None,
            oid: str | None = None) -> None:
        """Publish ``data`` as ``repo``'s file ``name``; the listing and the LFS headers may advertise
        another sha256 (``advertise``), size or git oid than the data's: a tampered server."""
        self.files[repo, name] = (data, advertise or _sha(data), len(data) if size is None else size)
        self.blobs[_sha(data)] = data
        if oid:
            self.oids[repo, name] = oid

    @staticmethod
    def is_lfs(name: str) -> bool:
        """Weights are stored in LFS (as .gitattributes of hub repositories says), the rest in git."""
        return name.endswith((".pth", ".safetensors", ".bin"))

    def requests(self, role: str | None = None, method: str | None = None) -> list:
        with self.lock:
            return [r for r in self.log if (role is None or r[0] == role) and (method is None or r[1] == method)]

    def close(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()


def _config(directory: Path, key: str, source: dict | None, model_file: str | None = FILE) -> Path:
    raw = {"model_name": f"Tiny-{key}",
           "architecture": {"n_layer": 2, "n_embd": 64, "vocab_size": 256, "head_size_a": 16, "ctx_len": 512},
           "lora_dims": {"dim_att_lora": 8, "dim_aaa_lora": 12, "dim_mv_lora": 4, "dim_gate_lora": 16}}
    if model_file:
        raw["model_file"] = model_file
    if source:
        raw["source"] = source
    path = directory / f"rwkv7-{key}.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.fixture(scope="module")
def tiny_bytes(tmp_path_factory) -> bytes:
    from helpers import write_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    return Path(write_checkpoint(path)).read_bytes()


@pytest.fixture
def fake(tiny_bytes):
    server = FakeHub()
    server.add(REPO, FILE, tiny_bytes)
    yield server
    server.close()


@pytest.fixture
def world(tmp_path, monkeypatch, fake):
    """Models and config directories in tmp; huggingface_hub pointed at the fake hub, no token."""
    models, configs = tmp_path / "models", tmp_path / "configs"
    models.mkdir()
    configs.mkdir()
    _config(configs, "tiny", {"hf_repo": REPO, "hf_filename": FILE})
    _config(configs, "nosource", None)
    _config(configs, "norepo", {"hf_repo": "test-org/absent", "hf_filename": FILE})
    _config(configs, "nofile", {"hf_repo": REPO, "hf_filename": "absent.pth"}, model_file=None)
    _config(configs, "norev", {"hf_repo": REPO, "hf_filename": FILE, "hf_revision": "v9"})
    monkeypatch.setenv("RWKVTUNE_MODEL_DIR", str(models))
    monkeypatch.setenv("RWKVTUNE_CONFIG_PATH", str(configs))
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    import huggingface_hub.constants

    # huggingface_hub read HF_HOME at import: keep a token saved by `hf auth login` out of these tests.
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    # Retries wait milliseconds, not seconds.
    monkeypatch.setattr(hub, "BACKOFF_S", 0.001)
    # Bytes arrive in 1 MiB reads, so a cut in a 0.6 MB file would lose every byte; small reads make
    # the tiny file behave like a release file of gigabytes.
    monkeypatch.setattr(hub, "_GET_CHUNK", 16 << 10)
    return tmp_path


def _partials(models: Path) -> list[Path]:
    return sorted((models / hub.WORK_DIR).glob("*.incomplete")) if (models / hub.WORK_DIR).is_dir() else []


# ---- download ------------------------------------------------------------------------------


def test_download_lands_at_model_path_with_identical_bytes(world, fake, tiny_bytes, capsys):
    path = hub.download_model("tiny", progress=True)
    assert "verifying sha256" in capsys.readouterr().err
    assert path == Path(load_model_config("tiny").model_path) == world / "models" / FILE
    assert path.read_bytes() == tiny_bytes
    assert _partials(world / "models") == []
    assert [r[1] for r in fake.requests("hub")] == ["HEAD"]
    gets = fake.requests("cdn", "GET")
    assert len(gets) == 1 and "range" not in gets[0][3]


def test_present_file_is_returned_without_network(world, fake, tiny_bytes):
    first = hub.download_model("tiny", progress=False)
    seen = len(fake.requests())
    fake.close()  # even with the hub gone
    assert hub.download_model("tiny", progress=False) == first
    assert len(fake.requests()) == seen
    assert first.read_bytes() == tiny_bytes


def test_dropped_connection_is_resumed_with_a_range_request(world, fake, tiny_bytes):
    fake.cut_gets = 1  # the first GET is cut midway; the same call continues
    path = hub.download_model("tiny", progress=False)
    assert path.read_bytes() == tiny_bytes
    gets = fake.requests("cdn", "GET")
    assert len(gets) == 2 and "range" not in gets[0][3]
    start = int(gets[1][3]["range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < start < len(tiny_bytes)


def test_interrupted_download_continues_on_the_next_call(world, fake, tiny_bytes):
    # First call: the transfer is cut midway, then the server refuses huggingface_hub's own retry.
    fake.cut_gets, fake.refuse_after_cut = 1, True
    target = world / "models" / FILE
    with pytest.raises(DownloadError) as info:
        hub.download_model("tiny", progress=False)
    message = str(info.value)
    assert "run the same command again to resume" in message and "\n" not in message
    assert not target.exists()
    [partial] = _partials(world / "models")
    kept = partial.stat().st_size
    assert 0 < kept < len(tiny_bytes) and str(partial) in message
    assert partial.read_bytes() == tiny_bytes[:kept]

    fake.fail_gets = 0
    before = len(fake.requests("cdn", "GET"))
    assert hub.download_model("tiny", progress=False).read_bytes() == tiny_bytes
    [resumed] = fake.requests("cdn", "GET")[before:]
    assert resumed[3]["range"] == f"bytes={kept}-"  # continued where it stopped, not from zero
    assert _partials(world / "models") == []


def test_wrong_checksum_is_refused_and_leaves_no_file(world, fake, tiny_bytes):
    target = world / "models" / FILE
    fake.add(REPO, FILE, tiny_bytes, advertise=_sha(b"another file"))
    with pytest.raises(DownloadError, match="checksum mismatch") as info:
        hub.download_model("tiny", progress=False)
    assert _sha(tiny_bytes) in str(info.value) and _sha(b"another file") in str(info.value)
    assert not target.exists() and _partials(world / "models") == []
    # --force over a present file: the old file stays until a new one is verified.
    target.write_bytes(b"the old file")
    with pytest.raises(DownloadError, match="checksum mismatch"):
        hub.download_model("tiny", force=True, progress=False)
    assert target.read_bytes() == b"the old file" and _partials(world / "models") == []
    fake.add(REPO, FILE, tiny_bytes)
    assert hub.download_model("tiny", force=True, progress=False).read_bytes() == tiny_bytes


def test_pinned_sha256_is_checked_before_downloading(world, fake, tiny_bytes):
    configs = world / "configs"
    _config(configs, "pinned", {"hf_repo": REPO, "hf_filename": FILE, "sha256": _sha(b"other")})
    with pytest.raises(DownloadError, match="source.sha256") as info:
        hub.download_model("pinned", progress=False)
    assert "changed since the config was written" in str(info.value)
    assert fake.requests("cdn") == [] and not (world / "models" / FILE).exists()
    _config(configs, "pinned", {"hf_repo": REPO, "hf_filename": FILE, "sha256": _sha(tiny_bytes)})
    assert hub.download_model("pinned", progress=False).read_bytes() == tiny_bytes


def test_mirror_without_redirect_is_read_at_the_resolved_commit(world, fake, tiny_bytes):
    fake.redirect = False  # a mirror that serves the file at the resolve URL itself
    assert hub.download_model("tiny", progress=False).read_bytes() == tiny_bytes
    [get] = fake.requests("hub", "GET")
    assert get[2] == f"/{REPO}/resolve/{COMMIT}/{FILE}"  # pinned: a push in between cannot mix files



# ---- what a mirror may answer (issue 20) -----------------------------------------------------

HTML = b"<!DOCTYPE html><html><body>Mirror maintenance: back soon</body></html>\n"


def test_html_page_whose_etag_is_its_own_sha256_is_refused(world, fake, capsys):
    target = world / "models" / FILE
    fake.redirect, fake.linked = False, False  # a mirror without LFS headers, answering a page
    fake.add(REPO, FILE, HTML)  # its ETag is the page's own sha256: 64 hex digits, like an LFS oid
    assert main(["models", "download", "tiny"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "no LFS sha256" in err and "X-Linked-Etag" in err and _sha(HTML) in err and "source.sha256" in err
    assert fake.requests("hub", "GET") == [] and not target.exists()
    # A mirror that even claims the page is the LFS object: downloaded, then refused for its content.
    fake.linked = True
    with pytest.raises(DownloadError) as info:
        hub.download_model("tiny", progress=False)
    message = str(info.value)
    assert "is not a PyTorch zip archive" in message and "<!DOCTYPE" in message and "\n" not in message
    assert len(fake.requests("hub", "GET")) == 1
    assert not target.exists() and _partials(world / "models") == []


def test_safetensors_file_is_checked_for_its_own_format(world, fake):
    import struct

    name = "tiny.safetensors"
    _config(world / "configs", "st", {"hf_repo": REPO, "hf_filename": name}, model_file=name)
    header = b'{"__metadata__":{"format":"pt"}}'
    good = struct.pack("<Q", len(header)) + header
    fake.add(REPO, name, HTML)
    with pytest.raises(DownloadError, match="is not a safetensors file"):
        hub.download_model("st", progress=False)
    assert not (world / "models" / name).exists()
    fake.add(REPO, name, good)
    assert hub.download_model("st", progress=False).read_bytes() == good


def test_pinned_sha256_lets_a_mirror_without_lfs_headers_serve(world, fake, tiny_bytes):
    fake.redirect, fake.linked = False, False
    _config(world / "configs", "pinned", {"hf_repo": REPO, "hf_filename": FILE, "sha256": _sha(tiny_bytes)})
    assert hub.download_model("pinned", progress=False).read_bytes() == tiny_bytes
    fake.add(REPO, FILE, HTML)  # the same mirror, now serving a page: the pinned sha256 refuses it
    with pytest.raises(DownloadError, match="is not a PyTorch zip archive"):
        hub.download_model("pinned", force=True, progress=False)
    assert (world / "models" / FILE).read_bytes() == tiny_bytes  # the verified file stays


@pytest.mark.parametrize("delta", [-1000, 1000])
def test_size_other_than_the_lfs_size_is_refused(world, fake, tiny_bytes, delta):
    fake.add(REPO, FILE, tiny_bytes, size=len(tiny_bytes) + delta)
    with pytest.raises(DownloadError, match="size mismatch") as info:
        hub.download_model("tiny", progress=False)
    message = str(info.value)
    assert f"{len(tiny_bytes):,}" in message and f"{len(tiny_bytes) + delta:,}" in message
    assert "X-Linked-Size" in message and "\n" not in message
    assert not (world / "models" / FILE).exists()
    assert all(p.stat().st_size == 0 for p in _partials(world / "models"))  # nothing of it was written


def test_dropping_server_that_ignores_range_gives_up_after_bounded_tries(world, fake, tiny_bytes, monkeypatch):
    import time

    waits: list[float] = []
    real_sleep = time.sleep
    monkeypatch.setattr(hub, "time", type("T", (), {"sleep": staticmethod(lambda s: (waits.append(s), real_sleep(s)))}))
    fake.ignore_range, fake.cut_gets = True, 10**6  # every GET: the whole file from byte 0, cut at its middle
    started = time.monotonic()
    with pytest.raises(DownloadError) as info:
        hub.download_model("tiny", progress=False, retries=3, backoff_s=0.01)
    elapsed = time.monotonic() - started
    message = str(info.value)
    assert "\n" not in message and "gave up after 4 tries, the last 3 without a new byte" in message
    assert "run the same command again to resume" in message
    assert len(fake.requests("cdn", "GET")) == 4  # one that brought bytes, then three that did not
    assert waits == [0.01, 0.02, 0.04]  # exponential backoff
    assert elapsed < 5
    [partial] = _partials(world / "models")
    kept = partial.stat().st_size
    assert 0 < kept <= len(tiny_bytes) // 2 and partial.read_bytes() == tiny_bytes[:kept]  # a read in flight is lost
    # The server recovers but still ignores Range: the bytes we have are read and dropped, not appended twice.
    fake.cut_gets = 0
    assert hub.download_model("tiny", progress=False).read_bytes() == tiny_bytes
    assert fake.requests("cdn", "GET")[-1][3]["range"] == f"bytes={kept}-"


@pytest.mark.parametrize("key, needles", [
    ("norepo", ["repository test-org/absent not found", "HF_TOKEN", "source.hf_repo"]),
    ("nofile", ["file absent.pth not found in test-org/tiny-rwkv", "source.hf_filename"]),
    ("norev", ["revision 'v9' not found", "source.hf_revision"]),
])
def test_not_found_names_what_to_fix(world, fake, key, needles):
    with pytest.raises(DownloadError) as info:
        hub.download_model(key, progress=False)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{fake.url}/")
    assert str(load_model_config(key).config_path) in message
    for needle in needles:
        assert needle in message, (needle, message)
    assert fake.requests("cdn") == [] and not (world / "models" / hub.WORK_DIR).exists()


def test_config_without_source_is_a_clear_error(world, fake):
    with pytest.raises(ConfigError) as info:
        hub.download_model("nosource", progress=False)
    message = str(info.value)
    assert "rwkv7-nosource.json: no download source" in message and '"source" section' in message
    assert f"put {FILE} into {world / 'models'} yourself" in message
    assert fake.requests() == []


def test_hf_token_goes_to_the_hub_but_not_to_the_cdn(world, fake, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    hub.download_model("tiny", progress=False)
    [head] = fake.requests("hub", "HEAD")
    assert head[3]["authorization"] == "Bearer hf_test_token"
    [get] = fake.requests("cdn", "GET")
    assert "authorization" not in get[3]  # a signed CDN URL needs no token, and must not see it
    assert get[3]["user-agent"].startswith("rwkvtune/")


def test_missing_huggingface_hub_says_how_to_install(world, fake, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    with pytest.raises(DownloadError) as info:
        hub.download_model("tiny", progress=False)
    message = str(info.value)
    assert 'pip install "rwkvtune[hub]"' in message
    assert f"{fake.url}/{REPO}/resolve/main/{FILE}" in message and str(world / "models") in message
    assert fake.requests() == []


def test_unwritable_models_dir_is_named(world, fake):
    blocker = world / "a-file"
    blocker.write_text("x")
    with pytest.raises(OutputError) as info:
        hub.download_model("tiny", models_dir=blocker / "models", progress=False)
    assert f"{blocker / 'models'}: cannot write the model file there ({blocker} is a file" in str(info.value)
    assert "--models-dir" in str(info.value)


def test_not_enough_disk_space_stops_before_the_transfer(world, fake, monkeypatch, tiny_bytes):
    usage = hub.shutil.disk_usage(world)
    monkeypatch.setattr(hub.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(OutputError, match="not enough disk space") as info:
        hub.download_model("tiny", progress=False)
    assert f"{len(tiny_bytes) / 1e9:.2f} GB more needed, 0.00 GB free" in str(info.value)
    assert fake.requests("cdn") == [] and not (world / "models" / FILE).exists()


# ---- hint and show -------------------------------------------------------------------------


def test_missing_model_hint_names_file_directory_command_and_url(world, fake):
    models = world / "models"
    release = load_model_config("1.5b")
    hint = hub.missing_model_hint(release)
    for part in (release.model_file, f"the models directory {models}", "rwkvtune models download 1.5b",
                 f"{fake.url}/{release.hf_repo}/resolve/main/{release.hf_filename}", f"into {models}"):
        assert part in hint, (part, hint)
    hint = hub.missing_model_hint(load_model_config("nosource"))
    assert f"{FILE} is not in the models directory {models}" in hint and "names no download source" in hint
    # A config loaded by path is named by its path in the command.
    path = list_available_models()["tiny"]
    assert hub.download_command(load_model_config(path)) == "rwkvtune models download tiny"
    copy = world / "elsewhere.json"
    copy.write_text(Path(path).read_text())
    assert hub.download_command(load_model_config(copy)) == f"rwkvtune models download {copy}"


def test_models_show_prints_the_source(world, fake, capsys, tiny_bytes):
    assert main(["models", "show", "1.5b"]) == 0
    fields = {k: v.strip() for k, v in (line.split(":", 1) for line in capsys.readouterr().out.splitlines())}
    release = load_model_config("1.5b")
    assert fields["source"] == f"Hugging Face BlinkDL/rwkv7-g1, file {release.model_file}, revision main"
    assert fields["download_url"] == f"{fake.url}/BlinkDL/rwkv7-g1/resolve/main/{release.model_file}"
    assert fields["download"] == "rwkvtune models download 1.5b"
    (world / "models" / FILE).write_bytes(tiny_bytes)  # present: nothing to download
    assert main(["models", "show", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "source:" in out and REPO in out and "download:" not in out
    assert main(["models", "show", "nosource", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["hf_repo"] == rec["download_url"] == rec["download_command"] == ""


# ---- command line --------------------------------------------------------------------------


def test_cli_download_in_process(world, fake, capsys, tiny_bytes):
    elsewhere = world / "elsewhere"
    assert main(["models", "download", "tiny", "--models-dir", str(elsewhere)]) == 0
    out = capsys.readouterr().out
    assert f"saved {elsewhere / FILE} ({len(tiny_bytes):,} bytes, sha256 verified)" in out
    assert f"RWKVTUNE_MODEL_DIR={elsewhere}" in out  # the registry looks elsewhere: say how to use it
    assert (elsewhere / FILE).read_bytes() == tiny_bytes and not (world / "models" / FILE).exists()
    seen = len(fake.requests())
    assert main(["models", "download", "tiny", "--models-dir", str(elsewhere)]) == 0
    assert "already present" in capsys.readouterr().out and len(fake.requests()) == seen
    assert main(["models", "download", "nosource"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "no download source" in err


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_subprocess_download_and_server_down(world, fake, tiny_bytes):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(RWKVTUNE_CONFIG_PATH=str(world / "configs"), HF_HOME=str(world / "hf-home"),
               HF_HUB_DISABLE_TELEMETRY="1")
    down_url = f"http://127.0.0.1:{_closed_port()}"
    runs = {
        "ok": (world / "m-ok", {"HF_ENDPOINT": fake.url}),
        "down": (world / "m-down", {"HF_ENDPOINT": down_url}),
        "offline": (world / "m-offline", {"HF_ENDPOINT": fake.url, "HF_HUB_OFFLINE": "1"}),
    }
    procs = {name: subprocess.Popen([sys.executable, "-m", "rwkvtune", "models", "download", "tiny"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=world,
                                    env=env | {"RWKVTUNE_MODEL_DIR": str(models)} | extra)
             for name, (models, extra) in runs.items()}
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=TIMEOUT)
        results[name] = (proc.returncode, out, err)

    code, out, err = results["ok"]
    assert code == 0, err
    assert (world / "m-ok" / FILE).read_bytes() == tiny_bytes and "sha256 verified" in out

    code, out, err = results["down"]
    assert code == 2 and "Traceback" not in err
    assert err.startswith("error: cannot download ") and err.count("\n") == 1, err
    url = f"{down_url}/{REPO}/resolve/main/{FILE}"
    assert f"check HF_ENDPOINT={down_url}" in err
    assert f"download {url} by hand into {world / 'm-down'}" in err
    assert not (world / "m-down" / FILE).exists()

    code, out, err = results["offline"]
    assert code == 2 and err.count("\n") == 1 and "HF_HUB_OFFLINE is set" in err, err
    assert not (world / "m-offline").exists()
    assert len(fake.requests("hub")) == 1  # the "ok" run's HEAD; the offline run sent nothing


def test_showing_and_hints_import_neither_huggingface_hub_nor_torch(world):
    code = ("import sys, contextlib, io\n"
            "from rwkvtune.cli import main\n"
            "from rwkvtune import hub\n"
            "from rwkvtune.configs.model_loader import load_model_config\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    assert main(['models', 'show', '1.5b']) == 0 and main(['models']) == 0\n"
            "assert 'rwkvtune models download 1.5b' in hub.missing_model_hint(load_model_config('1.5b'))\n"
            "heavy = [m for m in ('huggingface_hub', 'torch') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT,
                       env=os.environ | {"RWKVTUNE_MODEL_DIR": str(world / "models")})
    assert r.returncode == 0, r.stderr


# ---- registry "source" section -------------------------------------------------------------


def test_released_configs_name_their_source():
    for key, path in list_available_models().items():
        cfg = load_model_config(path)
        assert cfg.hf_repo == "BlinkDL/rwkv7-g1" and cfg.hf_revision == "main", key
        assert cfg.hf_filename == cfg.model_file, key  # downloaded under the name the registry looks for
        assert cfg.download_url.endswith(f"/BlinkDL/rwkv7-g1/resolve/main/{cfg.model_file}")


def test_source_section_is_validated_and_round_trips(tmp_path):
    good = {"hf_repo": "a-b/c.d_e", "hf_filename": "sub/dir/model.pth", "hf_revision": "refs/pr/1",
            "sha256": "0" * 64}
    cfg = ModelConfig.from_file(_config(tmp_path, "x", good, model_file=None))
    assert cfg.model_file == "model.pth"  # the file keeps its published name
    assert cfg.download_url == "https://huggingface.co/a-b/c.d_e/resolve/refs%2Fpr%2F1/sub/dir/model.pth"
    back = ModelConfig.from_dict(cfg.to_dict())
    assert back.to_dict() == cfg.to_dict() and back.to_dict()["source"] == good
    without = {k: v for k, v in cfg.to_dict().items() if k != "source"}
    assert "source" not in ModelConfig.from_dict(without).to_dict()  # no source written when there is none
    bad = {"hf_repo": "no-slash", "hf_filename": "../up.pth", "hf_revision": "has space", "sha256": "ABC",
           "hf_file": "x"}
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_file(_config(tmp_path, "bad", bad))
    message = str(info.value)
    for part in ("5 problem(s)", "source.hf_file: unknown field (did you mean 'hf_filename'?)",
                 "source.hf_repo: found 'no-slash', expected a Hugging Face repository id",
                 "source.hf_filename: found '../up.pth'", "source.hf_revision: found 'has space'",
                 "source.sha256: found 'ABC', expected 64 lowercase hex digits"):
        assert part in message, part
    with pytest.raises(ConfigError, match="source.hf_filename: missing"):
        ModelConfig.from_file(_config(tmp_path, "half", {"hf_repo": "a/b"}))
    with pytest.raises(ConfigError, match=r"source: found 'x' \(str\), expected dict"):
        ModelConfig.from_file(_config(tmp_path, "str", "x"))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="hf_repo and hf_filename together"):
        ModelConfig(model_name="x", n_layer=2, n_embd=64, dim_att_lora=8, dim_gate_lora=8, dim_mv_lora=8,
                    head_size_a=16, hf_repo="a/b")
