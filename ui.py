"""Widgets the Streamlit pages share (kept out of pages/ so Streamlit does not list it as a page)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

import cv2
import numpy as np
import streamlit as st

from engine import runs

DISPLAY_MAX_SIDE = 1600  # images are sent to the browser at most this large: a page column is narrower anyway
PROBABILITY_CACHE_BYTES = 256 * 2**20  # probability maps kept for threshold moves, all sessions together


def readiness_notice(info: dict[str, Any]) -> None:
    """A warning with the reason and the next steps when a completed run is not ready to serve."""
    ready, reason = runs.readiness(info)
    if ready or info.get("status") != "completed":
        return
    steps = "\n".join(f"- {step}" for step in runs.next_steps(info))
    st.warning(f"**Not ready:** {reason}. Its verdicts are not to be trusted yet.\n\nNext steps:\n{steps}")



def for_display(rgb: np.ndarray, max_side: int = DISPLAY_MAX_SIDE) -> np.ndarray:
    """An image shrunk to at most max_side pixels per side for st.image (a 4096² PNG per view stalls the page)."""
    height, width = rgb.shape[:2]
    factor = max_side / max(height, width)
    if factor >= 1:
        return rgb
    return cv2.resize(rgb, (max(1, round(width * factor)), max(1, round(height * factor))), interpolation=cv2.INTER_AREA)


class ArrayCache:
    """A thread-safe LRU of numpy arrays bounded by their total bytes (st.cache_data bounds only the count)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.bytes = max_bytes, 0
        self._items: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> np.ndarray | None:
        """The array stored under key (now the most recently used), or None."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            return None

    def put(self, key: Hashable, array: np.ndarray) -> None:
        """Store a read-only array; the least recently used ones go until the total fits."""
        array.flags.writeable = False
        with self._lock:
            if key in self._items:
                self.bytes -= self._items.pop(key).nbytes
            self._items[key] = array
            self.bytes += array.nbytes
            while self.bytes > self.max_bytes and len(self._items) > 1:
                self.bytes -= self._items.popitem(last=False)[1].nbytes


@st.cache_resource
def probability_cache() -> ArrayCache:
    """The process-wide cache of probability maps (float16) of the Inspect page."""
    return ArrayCache(PROBABILITY_CACHE_BYTES)
