"""`model-swap load / unload / evict / switch`: the store's /admin endpoints, with what they did."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from model_swap.commands.client import StoreClient
from model_swap.commands.views import size

SNAPSHOTS = ("before_unload", "after_unload", "after_settle", "after_load")


def _names(values: list[str]) -> str:
    return ", ".join(values) or "-"


def change(client: StoreClient, out: Console, action: str, model: str) -> dict:
    """POST /admin/<action> {"model"} and say what it did."""
    body = client.post(f"/admin/{action}", {"model": model})
    done = {"load": f"{body['model']} is in memory ({body.get('action')})", "unload": f"unloaded {body['model']}",
            "evict": f"evicted {body['model']}"}[action]
    out.print(done)
    out.print(f"  unloaded: {_names(body.get('unloaded', []))}   evicted: {_names(body.get('evicted', []))}")
    out.print(f"  in memory: {_names(body.get('loaded', []))}   on disk: {_names(body.get('cached', []))}")
    return body


def _gpu(reading: dict, key: str) -> str:
    gpus = reading.get("gpu")
    if not gpus:
        return "n/a"  # no GPU (or no NVML): the worker reports null, and so do we
    return " + ".join(size(g.get(key)) for g in gpus)


def switch(client: StoreClient, out: Console, model: str, exclusive: bool = False) -> dict:
    """POST /admin/switch and print the four memory snapshots."""
    body = client.post("/admin/switch", {"model": model, "exclusive": exclusive})
    settle = f"; waited {body['settle_s']}s for memory to settle" if body.get("settle_s") else ""
    out.print(f"switched to {body['model']} ({body.get('action')}) in {body.get('elapsed_ms', 0):.0f} ms; "
              f"unloaded: {_names(body.get('unloaded', []))}{settle}")
    table = Table(title="worker memory", title_justify="left")
    for column in ("STEP", "AT", "WORKER RSS", "HOST AVAILABLE", "GPU USED", "GPU FREE", "LOADED"):
        table.add_column(column, justify="left" if column in ("STEP", "LOADED") else "right")
    snapshots = body.get("snapshots", {})
    for step in SNAPSHOTS:
        reading = snapshots.get(step, {})
        if "error" in reading:
            table.add_row(step, f"{reading.get('at_ms', 0):.0f} ms", f"no reading ({reading['error']})", "", "", "", "")
            continue
        table.add_row(step, f"{reading.get('at_ms', 0):.0f} ms", size(reading.get("rss_bytes")),
                      size(reading.get("host_available_bytes")), _gpu(reading, "used_bytes"),
                      _gpu(reading, "free_bytes"), _names(reading.get("loaded", [])))
    out.print(table)
    return body
