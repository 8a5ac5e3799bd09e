"""supportbot runtime: model bundle, intent classifier, dialogue policy, responses, sessions.

The version has one source, pyproject.toml's [project].version, read through the installed
package's metadata; a checkout that was never installed reports "0+unknown" rather than a
second hard-coded number that could drift.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("supportbot")
except PackageNotFoundError:  # a bare checkout on sys.path, never pip-installed
    __version__ = "0+unknown"
