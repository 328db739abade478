"""`model-swap events`: follow the store's /events, with a progress bar per transfer."""

from __future__ import annotations

import json
import time

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from model_swap.commands.client import StoreClient, StoreUnreachable, data_events


def describe(event: dict) -> str:
    """One line for an event: its time, kind, model and the fields that matter for it."""
    at = time.strftime("%H:%M:%S", time.localtime(event.get("ts", time.time())))
    extra = {k: v for k, v in event.items() if k not in ("event", "ts", "model", "worker")}
    details = " ".join(f"{k}={v}" for k, v in extra.items())
    return f"{at} {event.get('event')} {event.get('model', '')} {details}".rstrip()


def follow(client: StoreClient, out: Console, err: Console, until: str | None = None, as_json: bool = False) -> int:
    """Print events as they come until `until` is seen (or forever); transfers get a progress bar."""
    connected = False
    bars: dict[str, int] = {}
    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                        console=out, transient=True)
    try:
        for kind, event in data_events(client.sse("/events")):
            if not connected:  # the store's first frame: from here on, nothing is missed
                err.print(f"following {client.url}/events (Ctrl-C stops)", highlight=False)
                connected = True
            if kind == "comment" or not isinstance(event, dict):
                continue
            if as_json:
                out.file.write(json.dumps(event) + "\n")
                out.file.flush()
            elif out.is_terminal:
                _show(progress, bars, event, out)
            elif event.get("event") != "transfer_progress":  # a pipe gets lines, not bars
                out.print(describe(event), markup=False, highlight=False, soft_wrap=True)
            if until is not None and event.get("event") == until:
                return 0
    finally:
        if bars:  # stopping a progress display that never started still prints a blank line
            progress.stop()
    # The store ends the stream only when it stops (it says so in a last comment): exit 3, not done.
    raise StoreUnreachable(f"{client.url} closed the event stream: the store is stopping")


def _show(progress: Progress, bars: dict[str, int], event: dict, out: Console) -> None:
    kind, model = event.get("event"), str(event.get("model"))
    if kind == "transfer_started":
        if not bars:
            progress.start()
        bars[model] = progress.add_task(f"sending {model}", total=event.get("bytes_total"))
    elif kind == "transfer_progress" and model in bars:
        progress.update(bars[model], completed=event.get("bytes_done", 0))
        return  # the bar says it; no line per tick
    elif kind in ("transfer_done", "transfer_failed") and model in bars:
        progress.remove_task(bars.pop(model))
        if not bars:
            progress.stop()
    (progress.console if bars else out).print(describe(event), markup=False, highlight=False, soft_wrap=True)
