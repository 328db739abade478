"""The model-swap command line against real services (gunicorn, llama.cpp, tiny GGUF models):
every command, its exit codes and its error messages; chat through piped stdin."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from model_swap import __version__
from model_swap.commands import main
from model_swap.testing import REPO
from tests.support.recording_proxy import RecordingProxy

pytestmark = pytest.mark.slow
KEY = "cli-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def stack(module_services, module_model, tmp_path_factory):
    """A worker holding one model at a time and a store (with an API key) over a, b and c, a aliased."""
    root = tmp_path_factory.mktemp("cli")
    models = root / "models"
    for seed, name in enumerate(["a.gguf", "b.gguf", "c.gguf"], start=1):
        module_model(models, name, seed=seed, size_mb=2)
    config = root / "models.toml"
    config.write_text('[models.alpha]\nfile = "a.gguf"\naliases = ["first"]\n')
    worker = module_services.worker(env={"MAX_LOADED_MODELS": "1"})
    store = module_services.store(models, worker, max_cache_size=3,
                                  extra=["--models-config", str(config), "--switch-settle-s", "0.1",
                                         "--max-swap-wait-ms", "0"], env={"STORE_API_KEY": KEY})
    return worker, store


@pytest.fixture
def cli(stack, capsys, monkeypatch):
    """cli(*args) -> (exit code, stdout, stderr) of model-swap run in-process against the stack's store."""
    monkeypatch.setenv("COLUMNS", "160")  # rich sizes its tables to the terminal; a pipe has none
    _, store = stack
    requests.post(store.url + "/admin/reset", headers=AUTH, timeout=30).raise_for_status()

    def run(*args: str, env: dict | None = None) -> tuple[int, str, str]:
        code = main(list(args), env={"MODEL_SWAP_URL": store.url, "STORE_API_KEY": KEY} if env is None else env)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def worker_holds(worker) -> tuple[list[str], list[str]]:
    listing = requests.get(worker.url + "/models", timeout=10).json()
    return [m["name"] for m in listing["loaded"]], sorted(c["name"] for c in listing["cached"])


def row(output: str, first_cell: str) -> list[str]:
    """The cells of the table row that starts with `first_cell`."""
    for line in output.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃|]", line)]
        cells = [c for c in cells if c]
        if cells and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row for {first_cell} in:\n{output}")


def test_version_from_the_module_and_the_console_script():
    for command in ([sys.executable, "-m", "model_swap", "--version"],
                    [str(Path(sys.executable).parent / "model-swap"), "--version"]):
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert (done.returncode, done.stdout.strip()) == (0, f"model-swap {__version__}")


def test_load_unload_and_evict_change_the_worker(cli, stack):
    worker, _ = stack
    code, out, _ = cli("load", "first")  # an alias from the models config
    assert code == 0 and "a.gguf is in memory (load_from_store)" in out
    assert worker_holds(worker) == (["a.gguf"], ["a.gguf"])
    code, out, _ = cli("load", "b.gguf")
    assert code == 0 and "unloaded: a.gguf" in out
    assert worker_holds(worker) == (["b.gguf"], ["a.gguf", "b.gguf"])
    assert cli("unload", "b.gguf")[0] == 0
    assert worker_holds(worker) == ([], ["a.gguf", "b.gguf"])
    code, out, _ = cli("evict", "a.gguf")
    assert code == 0 and "evicted: a.gguf" in out
    assert worker_holds(worker) == ([], ["b.gguf"])


def test_list_shows_size_aliases_and_where_each_model_is(cli):
    assert cli("load", "a.gguf")[0] == 0
    assert cli("unload", "a.gguf")[0] == 0
    assert cli("load", "b.gguf")[0] == 0
    code, out, _ = cli("list")
    assert code == 0
    a, b, c = row(out, "a.gguf"), row(out, "b.gguf"), row(out, "c.gguf")
    assert a[2:] == ["alpha, first", "disk"] and b[2:] == ["-", "memory"] and c[2:] == ["-", "store"]
    assert a[1].endswith("MB")
    code, out, _ = cli("list", "--json")
    assert code == 0 and '"where": "memory"' in out


def test_ps_shows_memory_keep_alive_and_disk_after_a_stream(cli, stack):
    """The figures come from the real worker; a stream still running shows as "in use" in
    test_cli_views.py, where a fake worker can hold it open (a tiny model here may finish before ps asks)."""
    _, store = stack
    assert cli("load", "a.gguf")[0] == 0
    body = {"model": "a.gguf", "prompt": "count", "max_tokens": 16, "temperature": 0}
    with requests.post(store.url + "/user_request", json=body, headers=AUTH, stream=True, timeout=120) as r:
        assert r.ok and r.content
    code, out, _ = cli("ps")  # the stream has ended: its keep-alive counts down
    assert code == 0
    model, memory, streams, waiting, keep_alive = row(out, "a.gguf")
    assert memory.endswith("MB") and (streams, waiting) == ("0", "0")
    assert re.fullmatch(r"4m 5\ds|5m 0s", keep_alive)  # KEEP_ALIVE 300 s
    assert re.search(r"disk cache: a\.gguf \([\d.]+ MB\)", out)


def test_switch_prints_four_snapshots(cli):
    assert cli("load", "a.gguf")[0] == 0
    code, out, _ = cli("switch", "b.gguf")
    assert code == 0 and "switched to b.gguf (load_from_store)" in out and "unloaded: a.gguf" in out
    for step, loaded in (("before_unload", "a.gguf"), ("after_unload", "-"), ("after_settle", "-"),
                         ("after_load", "b.gguf")):
        cells = row(out, step)
        assert cells[2].endswith("MB") and cells[3].endswith("GB"), cells  # worker RSS, host available
        assert cells[4:] == ["n/a", "n/a", loaded]  # no GPU here: no figure made up


def test_errors_show_the_code_and_set_the_exit_code(cli, stack):
    _, store = stack
    code, out, err = cli("load", "nope.gguf")
    assert (code, out) == (1, "") and "model_not_found" in err
    code, _, err = cli("ps", env={"MODEL_SWAP_URL": store.url})  # no key
    assert code == 1 and "unauthorized" in err
    code, _, err = cli("list", "--url", "http://127.0.0.1:9", "--api-key", KEY)
    assert code == 3 and "cannot reach the store at http://127.0.0.1:9" in err
    with pytest.raises(SystemExit) as usage:
        cli("switch")  # MODEL missing
    assert usage.value.code == 2


def test_chat_sends_the_session_and_only_the_new_message_and_switches_model(stack):
    _, store = stack
    requests.post(store.url + "/admin/reset", headers=AUTH, timeout=30).raise_for_status()
    with RecordingProxy(store.url) as proxy:
        done = subprocess.run([sys.executable, "-m", "model_swap", "chat", "a.gguf", "--max-tokens", "8"],
                              input="hello there\n/switch b.gguf\nand again\n/exit\nnever sent\n",
                              capture_output=True, text=True, timeout=120, cwd=REPO,
                              env={"PATH": "/usr/bin:/bin", "MODEL_SWAP_URL": proxy.url, "STORE_API_KEY": KEY})
    assert done.returncode == 0, done.stderr
    sent = proxy.posts("/v1/chat/completions")
    assert [body["model"] for _, body in sent] == ["a.gguf", "b.gguf"]
    assert [body["messages"] for _, body in sent] == [[{"role": "user", "content": "hello there"}],
                                                     [{"role": "user", "content": "and again"}]]
    sessions = {headers.get("X-Session-Id") for headers, _ in sent}
    assert len(sessions) == 1 and re.fullmatch(r"[0-9a-f]{32}", sessions.pop())
    assert all(body["stream"] is True for _, body in sent)
    assert len(done.stdout.splitlines()) == 2  # one streamed answer per message
    assert "switched to b.gguf" in done.stderr


def test_chat_with_a_preset_and_no_model_leaves_the_model_to_the_store(stack):
    _, store = stack
    with RecordingProxy(store.url) as proxy:
        subprocess.run([sys.executable, "-m", "model_swap", "chat", "--preset", "brief", "--session", "s-1"],
                       input="hi\nagain\n", capture_output=True, text=True, timeout=120, cwd=REPO,
                       env={"PATH": "/usr/bin:/bin", "MODEL_SWAP_URL": proxy.url, "STORE_API_KEY": KEY})
    # What the store answers depends on its presets (this stack has none); what matters here is what was sent.
    sent = proxy.posts("/v1/chat/completions")
    assert [(h["X-Session-Id"], b.get("preset"), "model" in b, b["messages"]) for h, b in sent] == [
        ("s-1", "brief", False, [{"role": "user", "content": "hi"}]),
        ("s-1", "brief", False, [{"role": "user", "content": "again"}])]


def test_chat_reports_a_failed_turn_and_goes_on(stack):
    _, store = stack
    done = subprocess.run([sys.executable, "-m", "model_swap", "chat", "nope", "--max-tokens", "4"],
                          input="hi\n/switch a.gguf\nhi\n", capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={"PATH": "/usr/bin:/bin", "MODEL_SWAP_URL": store.url, "STORE_API_KEY": KEY})
    assert done.returncode == 1 and "model_not_found" in done.stderr
    assert len(done.stdout.splitlines()) == 1  # the second turn, on a.gguf, was answered


@pytest.mark.parametrize("terminal", [False, True])
def test_events_follows_a_transfer_and_a_load(stack, terminal):
    _, store = stack
    requests.post(store.url + "/admin/reset", headers=AUTH, timeout=30).raise_for_status()
    env = {"PATH": "/usr/bin:/bin", "MODEL_SWAP_URL": store.url, "STORE_API_KEY": KEY, "COLUMNS": "120",
           **({"FORCE_COLOR": "1"} if terminal else {})}  # FORCE_COLOR: rich draws as on a terminal
    proc = subprocess.Popen([sys.executable, "-m", "model_swap", "events", "--until", "loaded"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    try:
        assert "following" in proc.stderr.readline()  # subscribed: nothing from here on is missed
        r = requests.post(store.url + "/admin/load", json={"model": "c.gguf"}, headers=AUTH, timeout=60)
        assert r.status_code == 200
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0
    plain = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]|\r", "\n", out)  # a terminal's colours and redraws, as line breaks
    kinds = [m.groups() for m in re.finditer(r"^\d\d:\d\d:\d\d (\w+) (\S+)", plain, re.M)]
    assert kinds == [("transfer_started", "c.gguf"), ("transfer_done", "c.gguf"), ("load_started", "c.gguf"),
                     ("loaded", "c.gguf")]
    assert ("sending c.gguf" in plain) is terminal  # the progress bar, only where it can be redrawn


def test_events_exits_3_when_the_store_stops(services, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    store = services.store(models, "http://127.0.0.1:9")  # no worker needed: nothing is swapped
    env = {"PATH": "/usr/bin:/bin", "MODEL_SWAP_URL": store.url}
    proc = subprocess.Popen([sys.executable, "-m", "model_swap", "events"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    try:
        assert "following" in proc.stderr.readline()
        store.stop()  # SIGTERM: a graceful stop ends the event streams
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 3 and "the store is stopping" in err


def _start_serve(args: list[str], tmp_path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "model_swap", "serve", "--no-fetch", *args,
                             "--cache-dir", str(tmp_path / "cache"), "--run-dir", str(tmp_path / "run")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env={"PATH": "/usr/bin:/bin"})


def test_serve_starts_both_services_and_stops_them_on_ctrl_c(make_model, tmp_path):
    from model_swap.testing import free_port

    make_model(tmp_path / "models", "a.gguf", seed=1)
    store_port, worker_port = free_port(), free_port()
    proc = _start_serve(["--models-dir", str(tmp_path / "models"), "--models-config", "",
                         "--store-port", str(store_port), "--worker-port", str(worker_port)], tmp_path)
    try:
        assert proc.stdout.readline().startswith(f"Ready: http://127.0.0.1:{store_port}")
        url = f"http://127.0.0.1:{store_port}"
        assert requests.get(url + "/health", timeout=10).json()["worker"] == "ok"
        r = requests.post(url + "/user_request", json={"model": "a.gguf", "prompt": "hi", "max_tokens": 4}, timeout=60)
        assert r.status_code == 200 and r.headers["X-Cache-Action"] == "load_from_store"
        proc.send_signal(2)  # Ctrl-C
        assert proc.wait(30) == 0
    finally:
        proc.kill()
    _, err = proc.communicate()
    assert "a.gguf" in err and "stopping" in err
    for port in (store_port, worker_port):  # both services are gone
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/health", timeout=5)
    assert (tmp_path / "run" / "store.log").stat().st_size > 0 and (tmp_path / "cache" / "a.gguf").is_file()


def test_serve_refuses_a_port_in_use(stack, tmp_path):
    _, store = stack
    proc = _start_serve(["--store-port", str(store.port), "--worker-port", "1"], tmp_path)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and f"port {store.port} (the store's) is already in use" in err


def test_serve_help_names_its_settings():
    done = subprocess.run([sys.executable, "-m", "model_swap", "serve", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0
    for flag in ("--store-port", "--worker-port", "--models-dir", "--models-config", "--cache-dir", "--no-fetch"):
        assert flag in done.stdout
