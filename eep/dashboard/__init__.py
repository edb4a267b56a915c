"""The dashboard: a small offline web page over run directories (live or finished), read-only.

`eep dashboard RUN_DIR ...` serves it; `start_dashboard` does the same from a campaign.
"""

from eep.dashboard.server import DEFAULT_HOST, DEFAULT_PORT, dashboard_hint, start_dashboard

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "dashboard_hint", "start_dashboard"]
