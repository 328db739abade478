"""Several workers: WORKER_URLS, the TOML workers file (WORKERS_CONFIG), and clear refusals."""

from __future__ import annotations

import pytest

from model_store_server.config import ConfigError, load_store_config
from model_store_server.workers_config import WorkerSpec


def test_one_worker_stays_the_worker_url():
    [spec] = load_store_config([], env={"WORKER_URL": "http://gpu:9000", "MAX_CACHE_SIZE": "3"}).worker_specs()
    assert spec == WorkerSpec("gpu:9000", "http://gpu:9000", 3, None, "localhost", 8081)


def test_worker_urls_name_each_worker_by_host_and_port():
    c = load_store_config([], env={"WORKER_URLS": "http://gpu1:8080/, http://gpu2:8080", "MAX_CACHE_BYTES": "99"})
    assert [(s.name, s.url, s.max_cache_size, s.max_cache_bytes) for s in c.worker_specs()] == [
        ("gpu1:8080", "http://gpu1:8080", 2, 99), ("gpu2:8080", "http://gpu2:8080", 2, 99)]


def test_the_workers_file_sets_what_differs(tmp_path):
    path = tmp_path / "workers.toml"
    path.write_text('[workers.big]\nurl = "http://gpu1:8080"\nmax_cache_size = 5\nmax_cache_bytes = 1000\n'
                    'rdma_host = "10.0.0.1"\nrdma_port = 9001\n\n[workers.small]\nurl = "http://gpu2:8080"\n')
    c = load_store_config(["--workers-config", str(path)], env={"MAX_CACHE_SIZE": "2", "WORKER_RDMA_PORT": "8500"})
    assert c.worker_specs() == (WorkerSpec("big", "http://gpu1:8080", 5, 1000, "10.0.0.1", 9001),
                                WorkerSpec("small", "http://gpu2:8080", 2, None, "localhost", 8500))


@pytest.mark.parametrize("text, fragment", [
    ("[workers.a]\nurl = 'http://x:1'\nmax_cache_size = 0\n", "max_cache_size must be at least 1"),
    ("[workers.a]\nurl = 'ftp://x:1'\n", "url must start with http"),
    ("[workers.a]\nport = 1\nurl = 'http://x:1'\n", "unknown keys ['port']"),
    ("[workers.a]\nmax_cache_size = 2\n", "needs url"),
    ("[workers.a]\nurl = 'http://x:1'\n[workers.b]\nurl = 'http://x:1'\n", "each url may appear once"),
    ("[workers.a]\nurl = 'http://x:1'\nrdma_port = 70000\n", "rdma_port must be 1-65535"),
    ("[workers.a]\nurl = 'http://x:1'\nmax_cache_bytes = '1GB'\n", "max_cache_bytes must be an integer"),
    ("[workers.'a b']\nurl = 'http://x:1'\n", "worker name"),
    ("[worker.a]\nurl = 'http://x:1'\n", "unknown top-level keys"),
    ("", "no [workers.NAME] tables"),
    ("[workers.a\n", "not valid TOML"),
])
def test_a_bad_workers_file_is_refused_naming_the_file(tmp_path, text, fragment):
    path = tmp_path / "workers.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_store_config(["--workers-config", str(path)], env={})
    assert fragment in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("env, fragment", [
    ({"WORKER_URLS": "http://a:1,http://a:1"}, "may appear once, repeated: a:1"),
    ({"WORKER_URLS": "http://a:1,a:2"}, "must start with http"),
    ({"WORKER_URLS": " , "}, "lists no URL"),
    ({"WORKER_URLS": "http://a:1", "WORKERS_CONFIG": "w.toml"}, "not both"),
    ({"WORKERS_CONFIG": "/nonexistent/w.toml"}, "cannot read it"),
    ({"MAX_REPLICAS": "0"}, "MAX_REPLICAS"),
])
def test_bad_worker_settings_are_refused(env, fragment):
    with pytest.raises(ConfigError) as err:
        load_store_config([], env=env)
    assert fragment in str(err.value)
