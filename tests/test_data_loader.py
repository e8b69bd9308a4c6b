"""The Tiny Shakespeare loader: local search, and the real download path on loopback."""

import hashlib
import http.server
import threading
from pathlib import Path

import pytest

from companion import data

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


class _Server:
    """A loopback HTTP server that serves given bytes at /file and counts requests."""

    def __init__(self, payload: bytes):
        self.payload, self.requests = payload, 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests += 1
                if self.path != "/file":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(outer.payload)))
                self.end_headers()
                self.wfile.write(outer.payload)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/file"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("COMPANION_CACHE", str(folder))
    return folder


def _item(payload: bytes, name="corpus.txt") -> data.DataFile:
    return data.DataFile(name, "http://127.0.0.1:9/unused", hashlib.sha256(payload).hexdigest())


def test_shared_copy_is_found_and_verified():
    if not SHARED.is_file():
        pytest.skip("../shared/data is not beside this checkout")
    path = data.tiny_shakespeare_path(download_if_missing=False)
    assert data.sha256_of(path) == data.TINY_SHAKESPEARE.sha256
    text = data.load_tiny_shakespeare(download_if_missing=False)
    assert len(text) == 1_115_394 and text.startswith("First Citizen:")


def test_environment_variable_is_searched_first(tmp_path, monkeypatch):
    payload = b"to be or not to be\n"
    item = _item(payload)
    (tmp_path / item.name).write_bytes(payload)
    monkeypatch.setenv("COMPANION_DATA", str(tmp_path))
    assert data.find_file(item) == tmp_path / item.name


def test_download_verifies_and_caches(tmp_path, cache):
    payload = SHARED.read_bytes() if SHARED.is_file() else b"First Citizen:\n" * 1000
    item = data.DataFile(data.TINY_SHAKESPEARE.name, "unused", hashlib.sha256(payload).hexdigest())
    with _Server(payload) as server:
        path = data.fetch(item, url=server.url, search=[tmp_path / "empty"])
        assert path == cache / item.name and path.read_bytes() == payload
        assert server.requests == 1
        again = data.fetch(item, url=server.url, search=[tmp_path / "empty"])
        assert again == path and server.requests == 1  # served from the cache
    assert [p.name for p in cache.iterdir()] == [item.name]


def test_real_tiny_shakespeare_download_path(tmp_path, cache):
    if not SHARED.is_file():
        pytest.skip("../shared/data is not beside this checkout")
    with _Server(SHARED.read_bytes()) as server:
        path = data.fetch(data.TINY_SHAKESPEARE, url=server.url, search=[tmp_path / "empty"])
    assert path.parent == cache and data.sha256_of(path) == data.TINY_SHAKESPEARE.sha256


def test_corrupted_download_raises_and_leaves_nothing(tmp_path, cache):
    good = b"the real corpus\n"
    item = _item(good)
    with _Server(b"the real corpus, but truncated") as server:
        with pytest.raises(ValueError, match=f"expected {item.sha256}"):
            data.fetch(item, url=server.url, search=[tmp_path / "empty"])
    assert not cache.exists() or list(cache.iterdir()) == []


def test_failed_connection_leaves_nothing(tmp_path, cache):
    item = _item(b"x")
    with _Server(b"x") as server:
        url = server.url.replace("/file", "/missing")
        with pytest.raises(Exception, match="404"):
            data.fetch(item, url=url, search=[tmp_path / "empty"])
    assert not cache.exists() or list(cache.iterdir()) == []


def test_corrupt_local_copy_is_an_error(tmp_path):
    item = _item(b"good bytes")
    (tmp_path / item.name).write_bytes(b"bad bytes")
    with pytest.raises(ValueError, match="SHA-256"):
        data.find_file(item, [tmp_path])


def test_missing_without_download_names_the_folders(tmp_path, cache):
    item = _item(b"anything", name="nowhere.txt")
    with pytest.raises(FileNotFoundError, match="COMPANION_DATA"):
        data.fetch(item, download_if_missing=False, search=[tmp_path])
