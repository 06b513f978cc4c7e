"""Model runtimes: run a transformer under torch (float32 or bfloat16), ONNX Runtime fp32, or ONNX Runtime
dynamic int8.

Every encoder Sift runs (bi-encoder for passages and queries, cross-encoder, MaxSim, extractive reader) is
a Hugging Face transformer inside a wrapper (sentence-transformers or Sift's reader). `runtime_model` gives
the transformer to run instead (an `OnnxModel` with the same call signature and output names, or the same
model cast to bfloat16), and `use_runtime` swaps it into a sentence-transformers wrapper, so tokenisation,
pooling, normalisation, batching and length sorting stay the wrapper's own and do not depend on the runtime.

Invariants:
- An export is made once per (source weights, task, runtime, instruction set, exporter versions) and cached
  under `cache_dir` (default `$SIFT_RUNTIME_CACHE` or `~/.cache/sift/runtimes`) with a `meta.json` that
  records the SHA-256 of the `.onnx` file; it is published by an atomic rename, so concurrent processes
  (several server workers) never see half a file.
- A loaded export must (a) match its recorded SHA-256 and (b) agree with the torch model it replaces on a
  fixed probe set (cosine ≥ `MIN_AGREEMENT`, computed live at load). Either failure raises `RuntimeMismatch`
  naming the file and what to do; a mismatched export is never used.
- Dynamic int8 quantises only weight MatMuls (activations stay fp32 between layers, the embedding table is
  not quantised), per output channel; `reduce_range` (7-bit weights) is used only on CPUs without VNNI,
  where the 8-bit AVX2 kernels can saturate.
- On a GPU, `onnx*` runtimes fall back to torch in fp16 (ONNX Runtime's CUDA build is not a dependency).
- Every fallback (`resolve_runtime`) and the int8 reduced-range recipe are logged with their reason.

CPU features are read from /proc/cpuinfo (`_cpu_flags`). `SIFT_CPU_MASK` hides some of them from Sift, so that
the fallbacks of a smaller CPU can be run (and tested) on any machine: a comma-separated list of flag names
(`SIFT_CPU_MASK=avx512_bf16,amx_bf16,avx512_vnni,avx_vnni`) and/or `baseline`, which hides every flag beyond
AVX2 (those starting with `avx512`, `avx10`, `amx` or `avx_`: AVX-512, AVX10, AMX, AVX-VNNI...). Unset or empty
hides nothing. The mask is read at each call (only /proc/cpuinfo is cached), so setting it in-process takes effect at
once. It changes Sift's decisions only: `torch-bf16` then runs as torch, and int8 exports use the non-VNNI
recipe (`reduce_range`) and are cached under the masked instruction set (`export_key`); the kernels torch and
ONNX Runtime pick inside a call still follow the real CPU.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np

from indexer.bundle import publish_folder, sha256_file
from indexer.config import Runtime

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# the objects this module swaps runtimes in, read and changed by attribute (`sift_runtime`, `model`, `config`)
Model = Any  # a transformers PreTrainedModel, or the ONNX module standing in for one
Tokenizer = Any  # a Hugging Face tokenizer
Wrapper = Any  # a sentence-transformers SentenceTransformer or CrossEncoder

RUNTIMES: tuple[str, ...] = get_args(Runtime)
Task = Literal["feature-extraction", "sequence-classification", "question-answering"]
OUTPUTS: dict[str, tuple[str, ...]] = {
    "feature-extraction": ("last_hidden_state",),
    "sequence-classification": ("logits",),
    "question-answering": ("start_logits", "end_logits"),
}
MIN_AGREEMENT = 0.99
EXPORT_VERSION = 1  # bump when the export recipe changes: old cache entries are then ignored
PROBES: tuple[tuple[str, str], ...] = (
    ("what causes ozone depletion", "Chlorofluorocarbons release chlorine in the stratosphere, which destroys ozone."),
    ("when was the eiffel tower built", "The Eiffel Tower was completed in 1889 for the World's Fair in Paris."),
    ("effect of aspirin on heart attacks", "Low-dose aspirin reduced the risk of a first myocardial infarction."),
    (
        "boundary layer transition",
        "Transition of the laminar boundary layer depends on pressure gradient and roughness.",
    ),
    ("who wrote hamlet", "Photosynthesis converts light energy into chemical energy stored in glucose."),
    ("gene expression in mice", "Knockout mice lacking the receptor showed reduced expression of the target gene."),
    ("a", "b"),
    ("Supersonic flow over a wedge produces an oblique shock wave " * 4, "Shock waves " * 30),
)

# Held while a model is built from weights (and exported to ONNX). transformers' `from_pretrained` swaps
# functions process-wide for the length of a load (torch.nn.init's initialisers become no-ops, weight tying is
# switched off and redone at the end), so a second load in another thread at the same moment can come out
# untied: SmolLM2's lm_head then stays on the meta device ("Cannot copy out of meta tensor"). Loads are rare
# and CPU-bound, so serialising them costs nothing; re-entrant, since a load may export inside it.
MODEL_LOADS = threading.RLock()


class RuntimeMismatch(RuntimeError):
    """An export that is corrupt or does not reproduce the torch model it stands for."""


CPU_MASK = "SIFT_CPU_MASK"  # CPU flags Sift ignores (module docstring)
BEYOND_AVX2 = ("avx512", "avx10", "amx", "avx_")  # prefixes of the flags `SIFT_CPU_MASK=baseline` hides
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni")


@functools.cache
def _proc_cpu_flags() -> frozenset[str]:
    """This CPU's feature flags from /proc/cpuinfo (empty where there is none); read once per process."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def return_freed_memory() -> None:
    """Collect garbage and give the C heap's free pages back to the OS (`trim_heap`). What torch freed after a
    model's last batch stays in the process's heap otherwise: the build's closing steps (BM25, FAISS, the token
    codebook's training) would then sit on top of it, and a forking server's workers would copy the pages they
    reuse."""
    import gc

    gc.collect()
    trim_heap()


def trim_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc `malloc_trim`; a no-op elsewhere). A long encode calls
    it between slices of passages: each slice's batches have other shapes, and the activations torch frees leave
    holes in the heap that later batches only partly reuse, so a SciFact build's resident memory crept up by
    hundreds of MB over the corpus without it (bench/memory.py)."""
    import contextlib
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _masked_flags() -> frozenset[str]:
    """The flags of this CPU that `SIFT_CPU_MASK` hides (read now, not cached)."""
    names = {name.strip().lower() for name in os.environ.get(CPU_MASK, "").split(",") if name.strip()}
    flags = _proc_cpu_flags()
    hidden = flags & names
    if "baseline" in names:
        hidden |= {flag for flag in flags if flag.startswith(BEYOND_AVX2)}
    return frozenset(hidden)


def _cpu_flags() -> frozenset[str]:
    """The CPU flags Sift goes by: /proc/cpuinfo's, less those hidden by `SIFT_CPU_MASK`."""
    return _proc_cpu_flags() - _masked_flags()


def _lacks(wanted: Sequence[str]) -> str:
    """Why none of the `wanted` flags is in `_cpu_flags()`: hidden by the mask, or absent from this CPU."""
    hidden = [flag for flag in wanted if flag in _masked_flags()]
    if hidden:
        return f"{'/'.join(hidden)} hidden by {CPU_MASK}={os.environ.get(CPU_MASK, '')}"
    return f"this CPU has no {'/'.join(wanted)}"


def cpu_isa() -> str:
    """The best integer-dot-product instruction set this CPU has (less `SIFT_CPU_MASK`): avx512_vnni,
    avx_vnni, avx512, avx2 or generic."""
    flags = _cpu_flags()
    for isa in VNNI_FLAGS:
        if isa in flags:
            return isa
    if "avx512bw" in flags:
        return "avx512"
    return "avx2" if "avx2" in flags else "generic"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    root = cache_dir or os.environ.get("SIFT_RUNTIME_CACHE") or Path.home() / ".cache" / "sift" / "runtimes"
    return Path(root).expanduser()


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 dot products natively (AVX512-BF16 or AMX); elsewhere torch
    emulates them, slower than float32."""
    return bool(set(BF16_FLAGS) & _cpu_flags())


def int8_reduce_range(isa: str) -> bool:
    """Whether dynamic int8 quantises weights to 7 bits for `isa` (see `_quantize`): everywhere but VNNI."""
    return isa not in VNNI_FLAGS


def resolve_runtime(runtime: str, device: str) -> str:
    """The runtime actually used on `device`: on CUDA every runtime but `torch` means `torch-fp16` (ONNX
    Runtime's CUDA build is not a dependency); `torch-bf16` on a CPU without native bf16 (or with it hidden by
    `SIFT_CPU_MASK`) means `torch`. A fallback is logged (warning) with its reason."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if str(device).startswith("cuda"):
        actual = "torch" if runtime == "torch" else "torch-fp16"
        if actual != runtime:
            log.warning(
                f"running {runtime} as {actual} on {device}: on a GPU every runtime but torch runs as torch in "
                "float16 (ONNX Runtime's CUDA build is not a dependency)"
            )
        return actual
    if runtime == "torch-bf16" and not cpu_has_bf16():
        log.warning(f"running torch-bf16 as torch: no native bfloat16 ({_lacks(BF16_FLAGS)})")
        return "torch"
    return runtime


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over the model's parameters and buffers (names, shapes, bytes): identifies the weights
    whatever folder or hub id they came from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _probe_inputs(tokenizer: Tokenizer, task: str, max_length: int) -> dict[str, np.ndarray]:
    if task == "feature-extraction":
        texts = [t for pair in PROBES for t in pair]
        enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="np")
    else:
        queries, passages = zip(*PROBES)
        enc = tokenizer(
            list(queries),
            list(passages),
            padding=True,
            truncation="longest_first",
            max_length=max_length,
            return_tensors="np",
        )
    return {
        k: np.asarray(v, dtype=np.int64)
        for k, v in enc.items()
        if k in ("input_ids", "attention_mask", "token_type_ids")
    }


def _torch_outputs(model: Model, inputs: dict[str, np.ndarray], task: str) -> list[np.ndarray]:
    import torch

    with torch.inference_mode():
        out = model(**{k: torch.from_numpy(v).to(_device_of(model)) for k, v in inputs.items()}, return_dict=True)
    return [out[name].float().cpu().numpy() for name in OUTPUTS[task]]


def agreement(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], mask: np.ndarray, task: str) -> float:
    """How well `candidate` outputs reproduce `reference`: for token states, the mean over probe texts of the
    cosine between the two mean-pooled vectors of a text; for scores and span logits, the cosine of the whole
    output over real (unpadded) tokens, centred (so that a constant shift does not count as agreement)."""
    if task == "feature-extraction":
        m = mask[..., None].astype(np.float32)
        a = (reference[0] * m).sum(1) / m.sum(1)
        b = (candidate[0] * m).sum(1) / m.sum(1)
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
        return float(cos.mean())
    if task == "sequence-classification":
        a, b = reference[0].ravel(), candidate[0].ravel()
    else:
        keep = mask.astype(bool)
        a = np.concatenate([r[keep] for r in reference])
        b = np.concatenate([c[keep] for c in candidate])
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def _device_of(model: torch.nn.Module) -> torch.device | str:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - every transformer has parameters
        return "cpu"


def OnnxModel(path: Path, config: Any, runtime: str, threads: int | None = None) -> Any:  # noqa: N802
    """An ONNX Runtime session that stands in for a transformers model: called with the tokenizer's tensors,
    it returns a dict of torch tensors named as the model's outputs (`last_hidden_state`, `logits`, or
    `start_logits`/`end_logits`), also readable as attributes. Thread-safe (ONNX Runtime sessions are)."""
    return _onnx_module_class()(path, config, runtime, threads)


@functools.cache
def _onnx_module_class() -> type:
    """The torch.nn.Module subclass behind `OnnxModel`, made on first use so that importing this module does
    not import torch."""
    import torch

    return type("OnnxModule", (_OnnxModuleMixin, torch.nn.Module), {})


class _Outputs(dict):
    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e


class _OnnxModuleMixin:
    def __init__(self, path: Path, config: Any, runtime: str, threads: int | None = None) -> None:
        import torch

        super().__init__()
        self.path, self.threads = Path(path), threads
        # whether ONNX Runtime's intra-op threads busy-wait between runs (its default); a server turns it off
        # for its models (app/threads.py) and the session reopens with it
        self.spin_wait = True
        self._reopen = threading.Lock()
        self._open_session()
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.config = config
        self.sift_runtime = runtime
        self.anchor = torch.nn.Parameter(torch.zeros(0), requires_grad=False)  # so .parameters() names a device

    @property
    def dtype(self) -> torch.dtype:
        import torch

        return torch.float32

    @property
    def device(self) -> torch.device:
        import torch

        return torch.device("cpu")

    def _open_session(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        if not self.spin_wait:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # no arena: it keeps the peak of the largest batch ever run (+0.7 GB for MiniLM after 32 × 256 tokens);
        # without it a session costs ~0.1 GB and a single query runs as fast (bench/workers.py)
        options.enable_cpu_mem_arena = False
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self._pid = os.getpid()

    def release_session(self) -> None:
        """Free the session (in the process that opened it); the next call opens a new one (with the
        module's `spin_wait` then)."""
        with self._reopen:
            self.session = None

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self.session is None or self._pid != os.getpid():
            with self._reopen:
                if self.session is not None and self._pid != os.getpid():
                    # a forked worker: the parent's session is kept, never freed here (its destructor would join
                    # intra-op threads that exist only in the parent, and hang holding the GIL)
                    self._inherited = self.session
                if self.session is None or self._pid != os.getpid():
                    self._open_session()
        feeds = {name: np.asarray(inputs[name], dtype=np.int64) for name in self.input_names if name in inputs}
        if "token_type_ids" in self.input_names and "token_type_ids" not in feeds:
            feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
        return self.session.run(self.output_names, feeds)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        **_: Any,
    ) -> _Outputs:
        import torch

        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        arrays = {k: v.cpu().numpy() for k, v in inputs.items() if v is not None}
        return _Outputs(zip(self.output_names, (torch.from_numpy(o) for o in self.run(arrays))))


def _export(model: Model, tokenizer: Tokenizer, task: str, dest: Path, max_length: int) -> None:
    """torch.export-based ONNX export of `model` (fp32, dynamic batch and sequence axes) to `dest`."""
    import torch

    inputs = _probe_inputs(tokenizer, task, max_length)
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in inputs]

    class Wrapped(torch.nn.Module):
        def __init__(self, inner: Model) -> None:
            super().__init__()
            self.inner = inner

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
        ) -> tuple[torch.Tensor, ...]:
            extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask, **extra, return_dict=True)
            return tuple(out[name] for name in OUTPUTS[task])

    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", max=max(512, max_length))
    shapes: dict[str, Any] = {n: {0: batch, 1: seq} for n in names}
    model = model.float().cpu().eval()
    quiet = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                Wrapped(model),
                tuple(torch.from_numpy(inputs[n]) for n in names),
                input_names=names,
                output_names=list(OUTPUTS[task]),
                dynamic_shapes=shapes,
                dynamo=True,
                optimize=True,
                verbose=False,
            )
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)
    if program is None:  # only the legacy exporter (dynamo=False) returns nothing
        raise RuntimeError(f"torch.onnx.export returned no program for {task}")
    program.save(str(dest), external_data=False)


def _quantize(source: Path, dest: Path, isa: str) -> None:
    """Dynamic int8 of the fp32 export `source` into `dest`, for instruction set `isa` (`cpu_isa()`): weight
    MatMuls only, per output channel; 8-bit weights on VNNI, 7-bit (`reduce_range`) elsewhere, where AVX2's
    u8 x s8 pair sums can saturate int16 (255 * 127 * 2 > 32767; 7-bit weights, |w| <= 64: 255 * 64 * 2 fits).

    Documented fallback without VNNI (or with it hidden by `SIFT_CPU_MASK`): 7-bit weights cost precision.
    Measured on an AVX2 CPU, bi-encoder all-MiniLM-L6-v2 against torch float32:
    - tests/test_runtime.py's set (60 example passages, 5 queries): vector cosine min 0.990, mean 0.994;
      top-10 overlap >= 9 of 10, and the documents that cross rank 10 lie within 0.0143 of torch's 10th score;
    - all 147 example passages, 152 queries (those 5 and every title): overlap >= 7 of 10, crossings within
      0.0365 (90% of queries within 0.018).
    The test's tolerance without VNNI is thus crossings within 0.02 and >= 8 of 10 kept (with VNNI: within
    0.01, as before); the 8-bit export, run on the same AVX2 CPU, moves a document at 0.0257: outside it."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(source),
        str(dest),
        op_types_to_quantize=["MatMul"],
        per_channel=True,
        reduce_range=int8_reduce_range(isa),
        weight_type=QuantType.QInt8,
        extra_options={"MatMulConstBOnly": True},
    )


def export_key(fingerprint: str, task: str, runtime: str, isa: str) -> str:
    import onnxruntime
    import torch

    raw = json.dumps([EXPORT_VERSION, fingerprint, task, runtime, isa, torch.__version__, onnxruntime.__version__])
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


def export_folder(fingerprint: str, task: str, runtime: str, cache_dir: str | Path | None = None) -> Path:
    """Where the export of weights `fingerprint` for `task` under `runtime` lives in the cache."""
    return cache_root(cache_dir) / f"{task}-{runtime}-{export_key(fingerprint, task, runtime, cpu_isa())}"


def get_export(
    model: Model,
    tokenizer: Tokenizer,
    task: str,
    runtime: str,
    cache_dir: str | Path | None = None,
    max_length: int = 256,
) -> Path:
    """The cached `.onnx` file for `model` under `runtime` (`onnx` or `onnx-int8`), exporting it first if
    there is none. Returns the folder holding `model.onnx` and `meta.json`."""
    isa = cpu_isa()
    fingerprint = weights_fingerprint(model)
    folder = export_folder(fingerprint, task, runtime, cache_dir)
    if (folder / "meta.json").is_file():
        return folder
    with MODEL_LOADS:  # one export at a time, and never while another thread loads a model (it traces one)
        if (folder / "meta.json").is_file():
            return folder
        folder.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".export-", dir=folder.parent))
        try:
            log.info("exporting model to ONNX", extra={"task": task, "runtime": runtime, "isa": isa, "to": str(folder)})
            _export(model, tokenizer, task, work / "fp32.onnx", max_length)
            if runtime == "onnx-int8":
                _quantize(work / "fp32.onnx", work / "model.onnx", isa)
                (work / "fp32.onnx").unlink()
            else:
                (work / "fp32.onnx").rename(work / "model.onnx")
            meta = {
                "task": task,
                "runtime": runtime,
                "isa": isa,
                "weights": fingerprint,
                "sha256": sha256_file(work / "model.onnx"),
                "export_version": EXPORT_VERSION,
            }
            (work / "meta.json").write_text(json.dumps(meta, indent=2))
            publish_folder(work, folder, "meta.json")  # another process may have published it first
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return folder


def load_export(folder: Path, config: Any, runtime: str, threads: int | None = None) -> Any:
    """Open a cached export after checking its SHA-256 against `meta.json`."""
    meta_file = folder / "meta.json"
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as e:
        raise RuntimeMismatch(f"{meta_file}: unreadable ({e}); delete {folder} to export again") from e
    onnx_file = folder / "model.onnx"
    if not onnx_file.is_file() or sha256_file(onnx_file) != meta.get("sha256"):
        raise RuntimeMismatch(
            f"{onnx_file}: corrupt or replaced (SHA-256 differs from meta.json); delete {folder} to export again"
        )
    try:
        return OnnxModel(onnx_file, config, runtime, threads)
    except Exception as e:  # onnxruntime raises its own exception types for invalid graphs
        raise RuntimeMismatch(f"{onnx_file}: ONNX Runtime cannot load it ({e}); delete {folder} to export again") from e


def runtime_model(
    model: Model,  # torch, float32
    tokenizer: Tokenizer,
    task: str,
    runtime: str,
    cache_dir: str | Path | None = None,
    threads: int | None = None,
    max_length: int = 256,
    min_agreement: float = MIN_AGREEMENT,
) -> Model:
    """`model` as `runtime` runs it (see `resolve_runtime` for the device rules): itself (torch), cast to
    float16 (CUDA), or — verified on `PROBES` against its own float32 outputs — cast to bfloat16 or replaced by
    its ONNX export (made or found in the cache). Raises `RuntimeMismatch` below `min_agreement`. The result
    has `.sift_runtime` and, when verified, `.agreement`."""
    import torch

    actual = resolve_runtime(runtime, str(_device_of(model)))
    if actual in ("torch", "torch-fp16"):
        model = model if actual == "torch" else model.to(torch.float16)
        model.sift_runtime = actual
        return model
    inputs = _probe_inputs(tokenizer, task, max_length)
    reference = _torch_outputs(model, inputs, task)
    if actual == "torch-bf16":
        candidate = model.to(torch.bfloat16)
        outputs, what, remedy = (
            _torch_outputs(candidate, inputs, task),
            f"{task} model in bfloat16",
            "use runtime torch",
        )
    else:
        if actual == "onnx-int8" and int8_reduce_range(cpu_isa()):
            log.info(f"onnx-int8 quantises weights to 7 bits (reduce_range): no VNNI ({_lacks(VNNI_FLAGS)})")
        folder = get_export(model, tokenizer, task, actual, cache_dir, max_length)
        candidate = load_export(folder, model.config, actual, threads)
        outputs, what = candidate.run(inputs), str(folder / "model.onnx")
        remedy = f"use runtime torch (or onnx), or delete {folder} if the export is stale"
    score = agreement(reference, outputs, inputs["attention_mask"], task)
    candidate.sift_runtime, candidate.agreement = actual, score
    if score < min_agreement:
        raise RuntimeMismatch(
            f"{what}: {actual} output agrees with torch at cosine {score:.4f} < {min_agreement}; {remedy}"
        )
    log.info("runtime ready", extra={"task": task, "runtime": actual, "agreement": round(score, 5)})
    return candidate


def use_runtime(
    wrapper: Wrapper,
    task: str,
    runtime: str,
    cache_dir: str | Path | None = None,
    threads: int | None = None,
) -> Wrapper:
    """Run a sentence-transformers model (bi-encoder or cross-encoder) under `runtime`, in place: its
    transformer module's model becomes `runtime_model(...)`, so tokenisation, pooling and batching stay
    sentence-transformers' own. Returns `wrapper`, with `wrapper.sift_runtime` naming what runs."""
    module = wrapper[0]
    max_length = int(getattr(wrapper, "max_seq_length", None) or getattr(wrapper, "max_length", None) or 256)
    module.model = runtime_model(module.model, wrapper.tokenizer, task, runtime, cache_dir, threads, max_length)
    wrapper.sift_runtime = module.model.sift_runtime
    return wrapper
