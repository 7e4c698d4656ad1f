"""The ImportError of a module whose optional dependencies (an extra of pyproject.toml) are missing."""

from __future__ import annotations


def missing_extra(error: ImportError, extra: str, needed_by: str) -> ImportError:
    """An ImportError that names the package that is missing and the extra that installs it.

    Use as ``try: import matplotlib.pyplot as plt`` / ``except ModuleNotFoundError as e: raise
    missing_extra(e, "plots", "mmalign.plots") from e``.
    """
    package = (getattr(error, "name", None) or str(error)).split(".")[0]
    return ImportError(f"{needed_by} needs {package}, which is not installed: pip install 'mmalign[{extra}]' "
                       f"(in the course folder: pip install -e '.[{extra}]')", name=package)
