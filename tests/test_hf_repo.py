"""`rwkvtune models download --repo OWNER/NAME` (rwkvtune.hub_repos) against the local stand-in for the hub
(tests/test_hub.py's FakeHub: the tree listing with git oids and LFS sha256, LFS files behind a redirect to
the "cdn", files stored in git served by the hub itself). Nothing touches the network.

The published repository is a tiny random RWKV-7 exported by rwkvtune to the HF layout, in shards, with
the files a real RWKV/*-HF repository carries besides (a pickle .bin, code, README).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rwkvtune import hub, hub_repos
from rwkvtune.cli import main
from rwkvtune.configs import repo_records
from rwkvtune.errors import CheckpointError, ConfigError, DownloadError, OutputError

pytest.importorskip("huggingface_hub")

from test_hub import COMMIT, FakeHub, _git_oid, _sha  # noqa: E402  (the hub stand-in, shared)

HF_REPO = "RWKV/RWKV7-Tiny-HF"
PICKLE = b"\x80\x04\x95pickled weights: never fetched"
EXTRAS = {  # what a published repository has besides the folder rwkvtune loads
    "pytorch_model.bin": PICKLE,
    "modeling_rwkv7.py": b"import os\n",
    "README.md": b"# tiny\n",
    ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
    "tokenizer_config.json": b'{"tokenizer_class": "Rwkv6Tokenizer"}\n',
    "sub/notes.txt": b"a subfolder: left out\n",
}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """(the official .pth, {file: bytes} of its HF export in shards)."""
    from helpers import write_checkpoint

    from rwkvtune.convert.hf import export_hf

    tmp = tmp_path_factory.mktemp("src")
    pth = Path(write_checkpoint(tmp / "tiny.pth", layer0_v=False))  # as published: no layer-0 v0/v1/v2
    folder = export_hf(pth, tmp / "hf", max_shard_bytes=400_000)
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert "model.safetensors.index.json" in files and sum(n.endswith(".safetensors") for n in files) >= 2
    return pth, files


@pytest.fixture
def fake(source):
    server = FakeHub()
    for name, data in (source[1] | EXTRAS).items():
        _publish(server, HF_REPO, name, data)
    yield server
    server.close()


@pytest.fixture
def models(tmp_path, monkeypatch, fake) -> Path:
    models = tmp_path / "models"
    monkeypatch.setenv("RWKVTUNE_MODEL_DIR", str(models))
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(hub, "BACKOFF_S", 0.001)
    return models


def _publish(fake: FakeHub, repo: str, name: str, data: bytes, **kw) -> None:
    """fake.add, remembering which file a blob is (the cdn's URLs name blobs by sha256)."""
    fake.add(repo, name, data, **kw)
    fake.names = getattr(fake, "names", {}) | {_sha(data): name}


def _gets(fake: FakeHub) -> list[str]:
    """The file names of every GET of a file (hub or cdn), listing requests excluded."""
    return [fake.names[path.rsplit("/", 1)[-1]] if role == "cdn" else path.rsplit("/", 1)[-1]
            for role, _, path, _ in fake.requests(method="GET") if "/api/" not in path]


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_repo_downloads_verifies_records_and_loads_like_its_source(models, fake, source, capsys):
    from rwkvtune.models.rwkv7.model import RWKV7

    pth, files = source
    assert main(["models", "download", "--repo", HF_REPO]) == 0
    out = capsys.readouterr().out
    folder = models / HF_REPO
    expected = set(files) | {"tokenizer_config.json"}
    assert f"saved {HF_REPO} (revision main, commit {COMMIT}) as {folder}: {len(expected)} files" in out
    assert "pytorch_model.bin (pickle files, which rwkvtune never loads" in out
    assert f"rwkvtune generate --model {folder}" in out
    assert {p.name for p in folder.iterdir()} == expected  # no pickle, no code, no README, no partial file
    for name in expected:
        assert (folder / name).read_bytes() == (files | EXTRAS)[name]
    fetched = _gets(fake)
    assert sorted(fetched) == sorted(expected) and fetched[0] == "config.json"  # config first: refusals are cheap
    hub_gets = [r[2] for r in fake.requests("hub", "GET") if "/resolve/" in r[2]]
    assert hub_gets and all(f"/resolve/{COMMIT}/" in p for p in hub_gets)  # every file read at one commit
    assert list((models / hub.WORK_DIR).glob("*@*")) == []  # the staging folder became the folder

    [rec] = repo_records.read_records(models)
    assert (rec.repo, rec.revision, rec.commit) == (HF_REPO, "main", COMMIT)
    by_name = {f.path: f for f in rec.files}
    assert set(by_name) == expected
    for name, f in by_name.items():
        data = (files | EXTRAS)[name]
        lfs = name.endswith(".safetensors")
        assert (f.size, f.sha256, f.git_oid) == (len(data), _sha(data) if lfs else "", "" if lfs else _git_oid(data))

    tokens = torch.tensor([[1, 7, 42, 3, 200, 5]])
    with torch.no_grad():
        want = RWKV7.from_checkpoint(str(pth))(tokens)
        got = RWKV7.from_checkpoint(str(folder))(tokens)
    assert torch.equal(got, want)

    # A later call finds the recorded folder without asking the hub.
    seen = len(fake.requests())
    assert main(["models", "download", "--repo", HF_REPO.lower()]) == 0
    assert f"already present: {folder}" in capsys.readouterr().out and len(fake.requests()) == seen


def test_tampered_git_file_is_refused(models, fake, source, capsys):
    original = source[1]["config.json"]
    tampered = original.replace(b'"sqrelu"', b'"sqrelx"')  # same size: only the git blob id can tell
    assert tampered != original and len(tampered) == len(original)
    _publish(fake, HF_REPO, "config.json", tampered, oid=_git_oid(original))
    err = _one_line_error(capsys, ["models", "download", "--repo", HF_REPO])
    assert "config.json: checksum mismatch" in err and _git_oid(original) in err and _git_oid(tampered) in err
    assert not (models / HF_REPO).exists() and not repo_records.records_path(models).exists()
    assert _gets(fake) == ["config.json"]  # nothing else fetched after the refusal


def test_tampered_lfs_file_is_refused_and_the_rest_is_kept(models, fake, source):
    files = source[1]
    shard = sorted(n for n in files if n.endswith(".safetensors"))[-1]
    original = files[shard]
    tampered = original[:-1] + bytes([original[-1] ^ 1])
    _publish(fake, HF_REPO, shard, tampered, advertise=_sha(original))
    with pytest.raises(DownloadError) as info:
        hub_repos.download_repo(HF_REPO, progress=False)
    message = str(info.value)
    assert "checksum mismatch" in message and _sha(original) in message and _sha(tampered) in message
    assert "\n" not in message and not (models / HF_REPO).exists()
    first = _gets(fake)
    assert first[-1] == shard  # stopped at the refused file
    # The server is fixed: the next call fetches the refused file again and those not yet fetched; the
    # verified ones were kept.
    _publish(fake, HF_REPO, shard, original)
    got = hub_repos.download_repo(HF_REPO, progress=False)
    second = _gets(fake)[len(first):]
    assert set(first) & set(second) == {shard} and set(first) | set(second) == {p.name for p in got.folder.iterdir()}
    assert (got.folder / shard).read_bytes() == original and got.fresh


def test_bin_only_repo_is_refused_before_any_download(models, fake, source, capsys):
    repo = "fla-hub/rwkv7-pickled"
    _publish(fake, repo, "config.json", source[1]["config.json"])
    _publish(fake, repo, "pytorch_model.bin", PICKLE)
    err = _one_line_error(capsys, ["models", "download", "--repo", repo])
    assert "only pytorch_model.bin (pickle files, which rwkvtune never loads)" in err and "model.safetensors" in err
    assert _gets(fake) == [] and not (models / repo).exists()


def test_other_model_type_is_refused_after_its_config(models, fake, source, capsys):
    repo = "RWKV/v6-Finch-Tiny-HF"
    config = json.loads(source[1]["config.json"]) | {"model_type": "rwkv6"}
    _publish(fake, repo, "config.json", json.dumps(config).encode())
    _publish(fake, repo, "model.safetensors", source[1][sorted(n for n in source[1] if n.endswith(".safetensors"))[0]])
    err = _one_line_error(capsys, ["models", "download", "--repo", repo])
    assert "model_type is 'rwkv6'" in err and "RWKV-6" in err and "expected 'rwkv7'" in err
    assert _gets(fake) == ["config.json"]  # the weights were never fetched
    assert not (models / repo).exists() and list((models / hub.WORK_DIR).glob("*@*")) == []


def test_interrupted_download_leaves_no_final_folder(models, fake, source, monkeypatch):
    # A connection cut midway, then a server that refuses every retry.
    fake.cut_gets, fake.refuse_after_cut = 1, True
    with pytest.raises(DownloadError, match="gave up after"):
        hub_repos.download_repo(HF_REPO, progress=False, retries=2, backoff_s=0.001)
    assert not (models / HF_REPO).exists() and not repo_records.records_path(models).exists()
    # Ctrl-C after every file was verified, just before the rename: still no folder, no record.
    fake.fail_gets = 0

    def interrupt(*args):
        raise KeyboardInterrupt

    check_model = hub_repos._check_model
    monkeypatch.setattr(hub_repos, "_check_model", interrupt)
    with pytest.raises(KeyboardInterrupt):
        hub_repos.download_repo(HF_REPO, progress=False)
    assert not (models / HF_REPO).exists() and not repo_records.records_path(models).exists()
    monkeypatch.setattr(hub_repos, "_check_model", check_model)
    before = len(_gets(fake))
    got = hub_repos.download_repo(HF_REPO, progress=False, models_dir=models)
    assert got.folder == models / HF_REPO and _gets(fake)[before:] == []  # every file was kept, verified


def test_folder_of_unknown_origin_and_force(models, fake, source):
    folder = models / HF_REPO
    folder.mkdir(parents=True)
    (folder / "mine.txt").write_text("x")
    with pytest.raises(OutputError, match="not downloaded by rwkvtune"):
        hub_repos.download_repo(HF_REPO, progress=False)
    got = hub_repos.download_repo(HF_REPO, progress=False, force=True)  # replaced once the new one is complete
    assert not (folder / "mine.txt").exists() and (folder / "config.json").is_file() and got.fresh
    (folder / "config.json").write_bytes(b"{}")  # changed after download: the record says so
    with pytest.raises(CheckpointError, match="recorded files missing or changed: config.json"):
        hub_repos.download_repo(HF_REPO, progress=False)
    with pytest.raises(ConfigError, match="pass --force to replace it with revision 'v2'"):
        hub_repos.download_repo(HF_REPO, revision="v2", progress=False)


@pytest.mark.parametrize("argv, needle", [
    (["models", "download", "1.5b", "--repo", HF_REPO], "NAME names a registry model file"),
    (["models", "download", "--latest", "--repo", HF_REPO], "--latest names a registry model file"),
    (["models", "download", "1.5b", "--revision", "v1"], "--revision goes with --repo"),
    (["models", "download"], "give NAME"),
    (["models", "download", "--repo", "no-slash"], "--repo 'no-slash': expected a Hugging Face repository id"),
])
def test_cli_forms_are_checked(models, fake, capsys, argv, needle):
    assert needle in _one_line_error(capsys, argv)
    assert fake.requests() == []


def test_records_are_checked(models):
    models.mkdir()
    good = {"repo": HF_REPO, "revision": "main", "commit": COMMIT,
            "files": [{"path": "config.json", "size": 3, "sha256": "", "git_oid": "a" * 40}]}
    path = repo_records.records_path(models)
    path.write_text(json.dumps({"format": repo_records.RECORDS_FORMAT, "repos": [good]}))
    assert repo_records.find(models, HF_REPO.upper()).files[0].git_oid == "a" * 40
    for bad, needle in ((dict(good, repo="../x"), "repository id"),
                        (dict(good, files=[dict(good["files"][0], path="../config.json")]), "not a plain file name"),
                        (dict(good, files=[dict(good["files"][0], sha256="b" * 64)]), "exactly one checksum")):
        path.write_text(json.dumps({"format": repo_records.RECORDS_FORMAT, "repos": [bad]}))
        with pytest.raises(ConfigError, match=needle) as info:
            repo_records.read_records(models)
        assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_incomplete_weights_are_refused_before_the_rename(models, fake, source, capsys):
    repo = "fla-hub/rwkv7-missing-shard"
    for name, data in source[1].items():
        if name != sorted(n for n in source[1] if n.endswith(".safetensors"))[-1]:  # one shard not published
            _publish(fake, repo, name, data)
    err = _one_line_error(capsys, ["models", "download", "--repo", repo])
    assert "not a loadable RWKV-7 Hugging Face folder" in err and "the download was deleted" in err
    assert not (models / repo).exists() and list((models / hub.WORK_DIR).glob("*@*")) == []


def test_only_plain_top_level_files_are_selected():
    from rwkvtune.hub_releases import RepoFile

    names = ["config.json", "model.safetensors", "rwkv_vocab_v20230424.txt", "pytorch_model.bin", "rwkv.pth",
             "modeling_rwkv7.py", "../model.safetensors", "sub/model.safetensors", ".hidden.safetensors",
             "tokenizer.json", "README.md"]
    fetch, pickles, other = hub_repos.select([RepoFile(n, 1, git_oid="a" * 40) for n in names])
    assert [f.path for f in fetch] == ["config.json", "model.safetensors", "rwkv_vocab_v20230424.txt",
                                       "tokenizer.json"]
    assert pickles == ["pytorch_model.bin", "rwkv.pth"]
    assert set(other) == {"modeling_rwkv7.py", "../model.safetensors", "sub/model.safetensors",
                          ".hidden.safetensors", "README.md"}
