"""Typed access to the store's state on the current app."""

from __future__ import annotations

from flask import current_app

from model_store_server.config import StoreConfig
from model_store_server.core import StoreCore


def core() -> StoreCore:
    return current_app.extensions["store"]["core"]


def config() -> StoreConfig:
    return current_app.extensions["store"]["config"]


def sessions():
    """The chat sessions (model_store_server.session_chat.Sessions)."""
    return current_app.extensions["store"]["sessions"]
