"""Widgets the Streamlit pages share (kept out of pages/ so Streamlit does not list it as a page)."""

from __future__ import annotations

from typing import Any

import streamlit as st

from engine import runs


def readiness_notice(info: dict[str, Any]) -> None:
    """A warning with the reason and the next steps when a completed run is not ready to serve."""
    ready, reason = runs.readiness(info)
    if ready or info.get("status") != "completed":
        return
    steps = "\n".join(f"- {step}" for step in runs.next_steps(info))
    st.warning(f"**Not ready:** {reason}. Its verdicts are not to be trusted yet.\n\nNext steps:\n{steps}")

