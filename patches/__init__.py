"""Version-guarded fixes to upstream libraries (installed as `selfee_plugin.patches`); see README.md here."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from packaging.version import Version


def installed_version(package: str) -> Version | None:
    try:
        return Version(version(package))
    except PackageNotFoundError:
        return None


def version_in_range(package: str, versions: tuple[Version, Version], installed: Version | None = None) -> bool:
    """Whether `package` (or `installed`) is inside [low, high): a patch never touches other versions."""
    installed = installed if installed is not None else installed_version(package)
    return installed is not None and versions[0] <= installed < versions[1]
