"""Check that this environment holds exactly what a lock file in requirements/ names, or list what moved
between two lock files.

    python scripts/check_lock.py requirements/main.txt          # exit 1, naming each package that differs
    python scripts/check_lock.py --moved OLD.txt NEW.txt        # what a refresh changed (scripts/refresh_lock.sh)

The environment matches when every locked package is installed at its locked version, nothing else is
installed (beyond pip, setuptools and the project itself), and every installed distribution's requirements
hold, apart from the packages the lock leaves out on purpose (pip-compile's ``--unsafe-package`` list, which
its output names at the end) and the requirements of the packages it installs without their dependencies (the
block ``scripts/refresh_lock.sh`` appends from ``requirements/no-deps.in``, after ``NO_DEPS_HEADER``). The
project's extras are read from the pip-compile command in the lock's header.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

PROJECT = "selfbudget-pl"
BOOTSTRAP = {"pip", "setuptools", "wheel"}  # what `python -m venv` and the editable install bring
REFRESH = "bash scripts/refresh_lock.sh"
# Opens the block of packages installed without their declared dependencies (requirements/no-deps.in).
NO_DEPS_HEADER = "# Installed without their declared dependencies"


class Lock:
    """A pip-compile output: pinned versions, the packages it leaves out on purpose, the project's extras, and
    the pinned packages whose own requirements are not installed (``no_deps``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.versions: dict[str, str] = {}
        self.excluded: set[str] = set()
        self.extras: set[str] = set()
        self.no_deps: set[str] = set()
        in_excluded = in_no_deps = False
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            stripped = line.strip()
            if stripped.startswith("#    pip-compile "):
                self.extras = set(re.findall(r"--extra[= ](\S+)", stripped))
            elif stripped.startswith("# The following packages are considered to be unsafe"):
                in_excluded = True
            elif stripped.startswith(NO_DEPS_HEADER):
                in_excluded, in_no_deps = False, True
            elif in_excluded and stripped.startswith("# "):
                self.excluded.add(canonicalize_name(stripped[2:].strip()))
            elif stripped and not stripped.startswith(("#", "-")):
                name, separator, version = stripped.partition("==")
                if not separator:
                    raise SystemExit(f"{path}:{number}: {stripped!r} is not pinned (name==version): re-lock with {REFRESH}")
                self.versions[canonicalize_name(name)] = version.split(";")[0].strip()
                if in_no_deps:
                    self.no_deps.add(canonicalize_name(name))


def installed() -> dict[str, importlib.metadata.Distribution]:
    return {canonicalize_name(dist.metadata["Name"]): dist for dist in importlib.metadata.distributions()}


def unmet_requirements(dists: dict[str, importlib.metadata.Distribution], lock: Lock) -> list[str]:
    """``pip check`` without the packages the lock leaves out: each installed distribution's requirements
    (the project's with the lock's extras) that the installed versions do not meet."""
    problems = []
    for name, dist in sorted(dists.items()):
        if name in lock.no_deps:
            continue
        extras = lock.extras if name == PROJECT else set()
        for text in dist.requires or []:
            requirement = Requirement(text)
            required = canonicalize_name(requirement.name)
            markers = [{"extra": extra} for extra in extras or {""}]
            if required in lock.excluded or (requirement.marker and not any(map(requirement.marker.evaluate, markers))):
                continue
            have = dists.get(required)
            if have is None:
                problems.append(f"{required}: required by {name} ({requirement}), not installed and not in {lock.path}")
            elif not requirement.specifier.contains(have.version, prereleases=True):
                problems.append(f"{required}: installed {have.version}, but {name} requires {requirement}")
    return problems


def differences(lock: Lock) -> list[str]:
    """One line per package where this environment and ``lock`` disagree."""
    dists = installed()
    problems = []
    for name, version in sorted(lock.versions.items()):
        if name not in dists:
            problems.append(f"{name}: locked at {version} in {lock.path}, not installed")
        elif Version(dists[name].version) != Version(version):
            problems.append(f"{name}: installed {dists[name].version}, {lock.path} locks {version}")
    for name, dist in sorted(dists.items()):
        if name not in lock.versions and name not in BOOTSTRAP | {PROJECT}:
            problems.append(f"{name}: installed {dist.version}, not in {lock.path}")
    return problems + unmet_requirements(dists, lock)


def moved(old: Lock, new: Lock) -> list[str]:
    """The packages whose version a refresh changed, added or removed."""
    lines = []
    for name in sorted(old.versions.keys() | new.versions.keys()):
        before, after = old.versions.get(name), new.versions.get(name)
        if before != after:
            lines.append(f"{name}: {before or '(new)'} -> {after or '(removed)'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("lock", type=Path, nargs="+", help="the lock file; with --moved, the old and the new one")
    parser.add_argument("--moved", action="store_true", help="list what changed between two lock files")
    args = parser.parse_args(argv)
    if len(args.lock) != (2 if args.moved else 1):
        parser.error("one lock file to check, or --moved OLD NEW")
    if args.moved:
        old, new = (Lock(path) for path in args.lock)
        lines = moved(old, new)
        print(f"{new.path}: " + ("\n  ".join(["versions moved:", *lines]) if lines else "no version moved"))
        return 0
    (lock,) = (Lock(path) for path in args.lock)
    problems = differences(lock)
    if problems:
        print(f"this environment is not what {lock.path} locks (install it with: pip install --no-deps -r "
              f"{lock.path} -e .; move the lock with: {REFRESH}):", file=sys.stderr)
        print("\n".join(f"  {problem}" for problem in problems), file=sys.stderr)
        return 1
    print(f"{lock.path}: all {len(lock.versions)} locked versions installed, nothing else")
    return 0


if __name__ == "__main__":
    sys.exit(main())
