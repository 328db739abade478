"""`model-swap ps` and `model-swap list`: what each worker holds, and what the store has, as tables."""

from __future__ import annotations

from rich.console import Console
from rich.filesize import decimal
from rich.table import Table

from model_swap.commands.client import StoreClient


def size(value: int | None) -> str:
    return "-" if value is None else decimal(value)


def duration(seconds: float) -> str:
    """4m 59s, 1h 2m, 12s."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 60}m {s % 60}s" if s >= 60 else f"{s}s"


def workers_of(listing: dict) -> list[dict]:
    """The store's per-worker views; an older store without a `workers` list has one, at the top level."""
    workers = listing.get("workers")
    if isinstance(workers, list) and workers:
        return workers
    memory = listing.get("memory", {})
    return [{"name": (listing.get("worker") or {}).get("name", "worker"), "cached": listing["policy"]["cached"],
             "loaded": memory.get("loaded", []), "memory": memory, "gates": listing.get("gates", {}),
             "in_flight": listing.get("in_flight", [])}]


def _reports(listing: dict) -> dict[str, dict]:
    """What each worker itself said (reachable or not), by name; `worker` may be one report or a list."""
    reports = listing.get("worker")
    reports = reports if isinstance(reports, list) else [reports] if isinstance(reports, dict) else []
    return {r.get("name"): r for r in reports}


def keep_alive_left(model: dict, uses: int) -> str:
    if model.get("pinned"):
        return "pinned"
    if uses:
        return "in use"
    if (model.get("keep_alive_s") or 0) < 0:
        return "forever"
    left = model.get("expires_in_s")
    return "-" if left is None else duration(left)


def show_ps(client: StoreClient, out: Console) -> dict:
    """Per worker: the loaded models with memory, keep-alive left and streams; the disk cache; transfers."""
    listing = client.get("/models")
    sizes = {m["name"]: m.get("size") for m in listing.get("models", [])}
    reports = _reports(listing)
    for worker in workers_of(listing):
        name = worker.get("name", "worker")
        memory = worker.get("memory", {})
        gates = worker.get("gates", {})
        uses, waiting = gates.get("uses", {}), gates.get("waiting", {})
        budget = memory.get("budget_bytes")
        title = (f"worker {name}: {size(memory.get('used_bytes'))} of {size(budget) if budget else 'no budget'}, "
                 f"{len(worker.get('loaded', []))} of {memory.get('max_loaded_models', '?')} models")
        if reports.get(name, {}).get("reachable") is False:
            title += " (not answering now)"
        out.print(f"[bold]{title}[/bold]", highlight=False, soft_wrap=True)  # a table title wraps at its width
        table = Table()
        for column in ("MODEL", "MEMORY", "STREAMS", "WAITING", "KEEP-ALIVE LEFT"):
            table.add_column(column, justify="left" if column == "MODEL" else "right")
        for model in worker.get("loaded", []):
            m = model["name"]
            table.add_row(m, size(model.get("memory_bytes")), str(uses.get(m, 0)), str(waiting.get(m, 0)),
                          keep_alive_left(model, uses.get(m, 0)))
        out.print(table if worker.get("loaded") else "  no model in memory")
        cached = worker.get("cached", [])
        out.print("  disk cache: " + (", ".join(f"{c} ({size(sizes.get(c))})" for c in cached) or "empty"))
        for op in worker.get("in_flight", []):
            total = op.get("bytes_total") or 0
            done = f" {100 * op.get('bytes_done', 0) // total}%" if total and op.get("op") == "transfer" else ""
            out.print(f"  {op.get('op')} {op.get('model')}{done} ({op.get('seconds', 0):.1f}s)")
    return listing


def show_list(client: StoreClient, out: Console) -> list[dict]:
    """The store's models: size, aliases, and where each is (memory, disk, or the store only)."""
    listing = client.get("/models")
    aliases = {t.get("file"): t.get("aliases", []) for t in client.get("/api/tags").get("models", [])}
    workers = workers_of(listing)
    rows = []
    for model in listing.get("models", []):
        name = model["name"]
        places = []
        for worker in workers:
            prefix = f"{worker.get('name')}: " if len(workers) > 1 else ""
            if name in [m["name"] for m in worker.get("loaded", [])]:
                places.append(prefix + "memory")
            elif name in worker.get("cached", []):
                places.append(prefix + "disk")
        rows.append({"name": name, "size": model.get("size"), "aliases": aliases.get(name, []),
                     "where": ", ".join(places) or "store"})
    table = Table()
    for column in ("MODEL", "SIZE", "ALIASES", "WHERE"):
        table.add_column(column, justify="right" if column == "SIZE" else "left")
    for row in rows:
        table.add_row(row["name"], size(row["size"]), ", ".join(row["aliases"]) or "-", row["where"])
    out.print(table)
    for bad in listing.get("unusable", []):
        out.print(f"[yellow]unusable:[/yellow] {bad['name']}: {bad['reason']}")
    return rows
