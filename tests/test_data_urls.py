"""Shards given as URLs (http:// on a loopback server started here, pipe:): fetched whole through webdataset's
opener into a content-addressed cache, verified as they land, then read like local shards; failures name the URL."""
from __future__ import annotations

import functools
import http.server
import os
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from sedd_scale.data.loader import EvalLoader, LoaderConfig, TokenLoader
from sedd_scale.data.manifest import Manifest, ManifestError
from sedd_scale.data.shards import ShardError
from sedd_scale.data.urlcache import UrlError
from tests.test_data_loader import make_dataset, same, take

ROOT = Path(__file__).resolve().parents[1]


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder, quietly, counting GET requests per path."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.gets[self.path] += 1
        super().do_GET()


@pytest.fixture()
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/www (a dataset "d" in it): (base URL, folder, GET counts)."""
    www = tmp_path / "www"
    make_dataset(www / "d", 120, seqs_per_shard=20, valid=13)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(www)))
    httpd.gets = Counter()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", www, httpd.gets
    httpd.shutdown()
    thread.join()


def config(manifest: str, cache: Path, **kw) -> LoaderConfig:
    return LoaderConfig([manifest], 8, 4, seed=3, global_batch=8, cache_dir=str(cache), **kw)


def test_a_url_dataset_gives_the_local_stream_and_downloads_each_shard_once(server, tmp_path):
    base, www, gets = server
    url, local, cache = f"{base}/d/manifest.json", str(www / "d" / "manifest.json"), tmp_path / "cache"
    reference = take(TokenLoader(config(local, cache)), 40)  # 160 sequences: every shard, past an epoch end
    assert same(take(TokenLoader(config(url, cache, num_workers=2)), 40), reference)
    m = Manifest.load(local)
    shards = m.splits["train"].shards
    assert {p.name for p in cache.iterdir() if not p.name.endswith(".lock")} == \
        {f"{s.sha256}.tar" for s in shards} | {f"{s.crc_sha256}.crc32" for s in shards}  # content-addressed
    fetched = {p: n for p, n in gets.items() if p.endswith((".tar", ".crc32"))}
    assert len(fetched) == 2 * len(shards) and set(fetched.values()) == {1}  # once each, two workers or not
    assert same(take(TokenLoader(config(url, cache)), 40), reference)  # a second run reads the cache only
    assert sum(n for p, n in gets.items() if p.endswith((".tar", ".crc32"))) == 2 * len(shards)
    local_eval = [b.tokens for b in EvalLoader(local, "valid", 4, 1, 2)]
    assert same([b.tokens for b in EvalLoader(url, "valid", 4, 1, 2, cache_dir=str(cache))], local_eval)
    samples = list(wds.WebDataset([r.tar for r in m.shard_refs("train")], shardshuffle=False, empty_check=False))
    over_http = list(wds.WebDataset([r.tar for r in Manifest.load(url).shard_refs("train")], shardshuffle=False,
                                    empty_check=False))  # the shards stay webdataset-readable by URL
    assert [s["tokens.u16"] for s in over_http] == [s["tokens.u16"] for s in samples] and len(samples) == 24


def test_a_failing_url_names_the_url_and_the_status(server, tmp_path):
    base, www, _ = server
    (www / "d" / "train-000003.tar").unlink()
    loader = TokenLoader(config(f"{base}/d/manifest.json", tmp_path / "cache"))  # URL shards: checked as they land
    with pytest.raises(UrlError, match=rf"could not fetch {base}/d/train-000003.tar: HTTP 404"):
        take(loader, 40)
    with pytest.raises(ManifestError, match=rf"could not fetch {base}/nothing/manifest.json: HTTP 404"):
        Manifest.load(f"{base}/nothing/manifest.json")
    with pytest.raises(ManifestError, match=r"could not fetch http://127.0.0.1:1/d/manifest.json: unreachable"):
        Manifest.load("http://127.0.0.1:1/d/manifest.json")
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.endswith(".part")]  # no partial downloads


def test_a_download_that_differs_from_the_manifest_is_refused(server, tmp_path):
    base, www, _ = server
    shard = www / "d" / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 1
    shard.write_bytes(bytes(data))  # same size, other content
    (www / "d" / "train-000002.crc32").write_bytes(b"short")
    cache = tmp_path / "cache"
    m = Manifest.load(f"{base}/d/manifest.json")
    refs = m.shard_refs("train")
    with pytest.raises(UrlError, match=rf"{base}/d/train-000001.tar has sha256 [0-9a-f]+, the manifest says "
                                       f"{refs[1].info.sha256}"):
        TokenLoader(config(m.location, cache)).sources[0].reader.read(refs[1], np.arange(3))
    with pytest.raises(UrlError, match=rf"{base}/d/train-000002.crc32 gave 5 bytes, the manifest says 80"):
        TokenLoader(config(m.location, cache)).sources[0].reader.read(refs[2], np.arange(3))
    cached = [p.name for p in cache.iterdir() if not p.name.endswith(".lock")]
    assert cached == [f"{refs[2].info.sha256}.tar"]  # the intact tar of shard 2; nothing bad, no partial file


def test_a_cached_copy_damaged_after_the_download_is_named_to_delete_and_fetched_again(server, tmp_path):
    base, www, gets = server
    url, cache = f"{base}/d/manifest.json", tmp_path / "cache"
    reference = take(TokenLoader(config(url, cache)), 40)  # every shard fetched into the cache
    m = Manifest.load(url)
    info = m.splits["train"].shards[2]
    cached = cache / f"{info.sha256}.tar"
    data = bytearray(cached.read_bytes())
    data[int(m.layout.row_offsets([7])[0]) + 3] ^= 0xFF  # a byte of row 7: same size, so the cache keeps the copy
    cached.write_bytes(bytes(data))
    with pytest.raises(ShardError) as damaged:
        take(TokenLoader(config(url, cache)), 40)
    message = str(damaged.value)
    assert f"shard {base}/d/train-000002.tar (cached as {cached})" in message and "fails its CRC32 check" in message
    assert message.endswith(f"the cached copy {cached} changed after it was fetched: delete it (the next read "
                            "fetches it again and checks the sha256)"), message  # the intact sidecar is not named
    cached.unlink()  # as told
    assert same(take(TokenLoader(config(url, cache)), 40), reference)
    assert gets["/d/train-000002.tar"] == 2 and cached.read_bytes() == (www / "d" / "train-000002.tar").read_bytes()


def test_an_unwritable_cache_directory_is_refused(server, tmp_path):
    base, _, _ = server
    (tmp_path / "a-file").write_text("")
    with pytest.raises(UrlError, match=rf"the shard cache directory {tmp_path / 'a-file' / 'cache'} is not writable "
                                       r"\(Not a directory\): set data.cache_dir"):
        TokenLoader(config(f"{base}/d/manifest.json", tmp_path / "a-file" / "cache"))


def test_pipe_urls(server, tmp_path):
    _, www, _ = server
    local = str(www / "d" / "manifest.json")
    piped = f"pipe:cat {local}"
    m = Manifest.load(piped)
    assert m.shard_refs("train")[2].tar == f"pipe:cat {www / 'd' / 'train-000002.tar'}"
    reference = take(TokenLoader(config(local, tmp_path)), 30)
    assert same(take(TokenLoader(config(piped, tmp_path / "cache")), 30), reference)
    with pytest.raises(ManifestError, match=r"could not fetch pipe:cat /nonexistent/manifest.json: the command exited "
                                            "with status 1"):
        Manifest.load("pipe:cat /nonexistent/manifest.json")
    with pytest.raises(ManifestError, match="does not name manifest.json"):
        Manifest.load(f"pipe:cat {www / 'd'}/other.json")


def test_verify_a_url_dataset(server, tmp_path):
    base, www, _ = server

    def verify() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "tools/prepare_data.py"), "--verify",
                               f"{base}/d/manifest.json", "--cache-dir", str(tmp_path / "cache")],
                              capture_output=True, text=True, cwd=ROOT)

    r = verify()
    assert r.returncode == 0 and "all shards intact" in r.stdout, r.stdout + r.stderr
    cached = tmp_path / "cache" / f"{Manifest.load(www / 'd' / 'manifest.json').splits['train'].shards[4].sha256}.tar"
    data = bytearray(cached.read_bytes())
    data[2000] ^= 1  # the cached copy rots after it was fetched
    cached.write_bytes(bytes(data))
    r = verify()
    assert r.returncode == 1 and f"BAD train: sha256 mismatch for shard {cached}" in r.stdout
    assert f"the cached copy {cached} changed after it was fetched: delete it" in r.stdout, r.stdout
    assert os.path.exists(cached)  # --verify reports; deleting is the user's call
    cached.unlink()
    r = verify()
    assert r.returncode == 0 and "all shards intact" in r.stdout, r.stdout + r.stderr
