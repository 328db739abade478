"""The RDMA transport on the store: sends run in a helper process, `python -m model_store_server.rdma_transport`.

Why a helper process: pyverbs 56 holds the GIL while it blocks (route resolution, connect,
disconnect), which would stall every thread of the store for as long; and a fault in native verbs
code then ends the helper, not the store, so the send fails with a clear code (and falls back to
HTTP where allowed). The helper stays up between sends, so its start-up (about 0.5 s of imports)
is paid once. It reads one JSON job per line on stdin and answers one JSON line on stdout:
{"ok": true, "seconds": ...} or {"ok": false, "code": ..., "message": ...}. It exits when its
stdin closes, that is when the store goes away.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import select
import subprocess
import sys
import threading
import time

from model_store_server.catalog import StoredModel
from model_store_server.transport import Sent
from model_swap.errors import ApiError
from model_swap.rdma.protocol import DEFAULT_CHUNK, DEFAULT_DEPTH, DEFAULT_TIMEOUT_S

log = logging.getLogger("model_store_server.rdma_transport")  # also when run as __main__

TOKEN_ENV = "MODEL_SWAP_RDMA_TOKEN"  # the worker token travels by environment, never on a command line
INSTALL_HINT = "install the rdma extra: pip install 'model-swap[rdma]'"
SLOWEST_BYTES_PER_S = 20e6  # for the overall bound on one send: slower than this, the helper is wedged


class RdmaTransport:
    """Sends a model to the worker's RDMA listener at host:port, verified on the worker's disk."""

    name = "rdma"

    def __init__(self, host: str, port: int, token: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        self._token = token
        self._lock = threading.Lock()  # one send at a time through the helper
        self._helper: subprocess.Popen | None = None

    def send(self, model: StoredModel, progress=None) -> Sent:
        """Send one model through the helper; raise ApiError(502, rdma_* or the worker's code) on failure.

        The helper process reports only at the end, so progress hears of the whole file then."""
        self._check_available()
        job = {"host": self.host, "port": self.port, "name": model.name, "path": str(model.path),
               "size": model.size, "sha256": model.sha256, "timeout_s": self.timeout_s}
        started = time.perf_counter()
        with self._lock:
            result = self._exchange(job, 3 * self.timeout_s + model.size / SLOWEST_BYTES_PER_S)
        seconds = time.perf_counter() - started
        if not result.get("ok"):
            raise ApiError(502, str(result.get("code", "rdma_transfer_failed")), str(result.get("message", "")))
        if progress is not None:
            progress(model.size)
        log.info("[rdma] sent %s (%d bytes) in %.1fms, %.1fms of it moving bytes (%.2f GB/s)", model.name,
                 model.size, seconds * 1000, result["seconds"] * 1000,
                 model.size / result["seconds"] / 1e9 if result["seconds"] else 0.0)
        return Sent(self.name, seconds)

    @staticmethod
    def _check_available() -> None:
        """Fail fast, in this process, when pyverbs or a device is missing: no helper needed to say so."""
        if importlib.util.find_spec("pyverbs") is None:
            raise ApiError(502, "rdma_unavailable",
                           f"pyverbs is not installed in the store's environment; {INSTALL_HINT}")
        from model_swap.rdma.verbs import rdma_devices  # listing devices does not block

        rdma_devices()

    def _exchange(self, job: dict, limit_s: float) -> dict:
        """Hand the job to the helper (starting it if needed) and wait up to limit_s for its answer."""
        helper = self._running_helper()
        try:
            helper.stdin.write(json.dumps(job) + "\n")
            helper.stdin.flush()
            ready, _, _ = select.select([helper.stdout], [], [], limit_s)
            line = helper.stdout.readline() if ready else ""
        except OSError as err:
            line, why = "", f"lost the RDMA sender: {err}"
        else:
            why = f"the RDMA sender gave no answer within {limit_s:.0f}s" if not ready else \
                "the RDMA sender exited without an answer; see the store's log"
        try:
            answer = json.loads(line)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            self.close()  # a wedged or dead helper is replaced on the next send
            raise ApiError(502, "rdma_transfer_failed", why)
        return answer

    def _running_helper(self) -> subprocess.Popen:
        if self._helper is None or self._helper.poll() is not None:
            env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
            if self._token:
                env[TOKEN_ENV] = self._token
            try:
                self._helper = subprocess.Popen([sys.executable, "-m", "model_store_server.rdma_transport"],
                                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
            except OSError as err:
                raise ApiError(502, "rdma_unavailable", f"cannot start the RDMA sender: {err}") from None
        return self._helper

    def close(self) -> None:
        """Stop the helper, if one runs."""
        helper, self._helper = self._helper, None
        if helper is not None and helper.poll() is None:
            helper.kill()
            helper.wait()


def send_job(job: dict) -> dict:
    """Run one job in the helper: connect, send, disconnect; the answer as a dict."""
    from model_swap.rdma.protocol import ChannelSpec, send_file
    from model_swap.rdma.verbs import connect

    try:
        channel = connect(job["host"], int(job["port"]), ChannelSpec.for_sender(DEFAULT_CHUNK, DEFAULT_DEPTH))
        try:
            report = send_file(channel, job["name"], job["path"], int(job["size"]), job["sha256"],
                               token=os.environ.get(TOKEN_ENV) or None, timeout_s=float(job["timeout_s"]))
        finally:
            channel.close()
    except ApiError as err:
        log.warning("[rdma] send of %s failed: %s (%s)", job.get("name"), err.code, err.message)
        return {"ok": False, "code": err.code, "message": err.message}
    except Exception as err:  # a bug or a pyverbs surprise: say so, and keep the traceback in the log
        log.exception("[rdma] send of %s failed unexpectedly", job.get("name"))
        return {"ok": False, "code": "rdma_transfer_failed", "message": f"RDMA sender failed: {err.__class__.__name__}"}
    return {"ok": True, "seconds": report.seconds, "chunks": report.chunks, "chunk": report.chunk,
            "credit_waits": report.credit_waits}


def main() -> int:
    """The helper: answer each job line on stdin with a result line on stdout, until stdin closes."""
    from model_swap.rdma.verbs import claim_stdout
    from model_swap.serving import configure_logging

    configure_logging(os.environ.get("LOG_LEVEL", "INFO"))  # before pyverbs, whose import configures logging
    answers = claim_stdout()
    for line in sys.stdin:
        try:
            result = send_job(json.loads(line))
        except (ValueError, KeyError, TypeError) as err:
            result = {"ok": False, "code": "rdma_transfer_failed", "message": f"bad job for the RDMA sender: {err}"}
        answers.write(json.dumps(result) + "\n")
        answers.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
