"""`python -m hpsearch._dashboard [optuna-dashboard options]`: optuna-dashboard on the storage URL in
$HPSEARCH_DASHBOARD_STORAGE.

optuna-dashboard takes the URL as an argument, and a process's arguments are visible to every user
of the machine (`ps`); its environment is not. So `hpsearch dashboard` puts the URL there, and this
hands it to optuna-dashboard's own command line inside the process.
"""

from __future__ import annotations

import os
import sys

STORAGE_ENV = "HPSEARCH_DASHBOARD_STORAGE"


def main() -> None:
    """Run optuna-dashboard's command line with the storage URL taken from the environment."""
    from optuna_dashboard._cli import main as dashboard

    url = os.environ.pop(STORAGE_ENV, None)  # popped: servers it forks need not see it again
    if not url:
        sys.exit(f"Error: set {STORAGE_ENV} to the Optuna storage URL.")
    sys.argv = ["optuna-dashboard", url, *sys.argv[1:]]  # Python's copy only; /proc/PID/cmdline keeps the original
    dashboard()


if __name__ == "__main__":
    main()
