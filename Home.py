"""The app's entry point: the page list, declared once in app_pages/ui.py (PAGES), as the navigation (`streamlit run Home.py`)."""

from __future__ import annotations

import streamlit as st

from app_pages.ui import PAGES

st.set_page_config(page_title="Defect inspection", page_icon=":material/precision_manufacturing:", layout="wide")
st.navigation([st.Page(page.path, title=page.title, icon=page.icon, url_path=page.url, default=page is PAGES[0])
               for page in PAGES]).run()
