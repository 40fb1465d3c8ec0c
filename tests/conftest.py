"""Shared pytest setup.

Under CI (CI=true) hypothesis draws the same examples on every run, so a red CI always reproduces; locally it keeps
exploring new ones.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
