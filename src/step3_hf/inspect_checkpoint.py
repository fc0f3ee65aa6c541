"""`step3-inspect`: check a Step-3 checkpoint directory against its config, by default without reading any weights.

By default only `config.json`, the optional `model.safetensors.index.json` and the JSON header at the start of each
safetensors file are read, so inspecting the ~640 GB official release takes well under a second. The report gives the
parameter counts and KV-cache size the config implies, the dtypes on disk, and every missing, unexpected, wrong-shape
or wrong-dtype tensor against the official layout (`checkpoint_layout.official_tensor_shapes`) and the config's
`dtype` (`torch_dtype` in older files).

`--values` also reads every tensor once, a bounded slice at a time, and reports tensors holding NaN or Inf and tensors
that are all zero (a failed or unfinished write); it reads the whole checkpoint, so it takes as long as the disk does.

Exit codes: 0 the checkpoint matches its config, 1 any mismatch, 2 unusable input.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import struct
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub.errors import StrictDataclassError

from .checkpoint_layout import is_vision_tensor, official_tensor_shapes
from .fp8 import SCALE_SUFFIX, Fp8LayoutError, fp8_block_size, fp8_tensor_shapes, is_quantized_weight
from .vision_layout import count_vision_parameters, official_vision_tensor_shapes
from .configuration_step3 import Step3Config, Step3VLConfig
from .parameters import count_parameters, human_count, kv_cache_bytes_per_token

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
CONFIG_CLASSES: dict[str, type[Step3Config] | type[Step3VLConfig]] = {
    Step3VLConfig.model_type: Step3VLConfig,
    Step3Config.model_type: Step3Config,
}
# The safetensors format caps its header at 100 MB; a bigger length means the file is not safetensors.
MAX_HEADER_BYTES = 100_000_000
# Bytes per element of the safetensors dtypes, to cross-check each header entry's byte range against its shape.
DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip
# The safetensors dtype a config's `dtype` names (transformers writes the torch name without "torch.").
CONFIG_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}  # fmt: skip
# `--values` reads at most this many bytes of a tensor at once, so a 3.5 GB expert tensor never sits in memory whole.
VALUE_CHUNK_BYTES = 64 * 2**20
# Checkpoints at least this big get a progress bar while their values are read.
PROGRESS_MIN_BYTES = 2**30


class CheckpointError(Exception):
    """The directory cannot be inspected at all (exit code 2): no config, no weights, unreadable files."""


@dataclass(frozen=True)
class TensorHeader:
    """One tensor as its safetensors header describes it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    file: str
    data_end: int = 0
    """End of the tensor's byte range in the file's data section."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ShardHeader:
    """The parsed header of one safetensors file."""

    file: str
    tensors: list[TensorHeader]
    data_bytes_needed: int
    """End of the last tensor's byte range, per the header."""
    data_bytes_present: int
    """Bytes the file actually holds after the header; fewer than needed means an incomplete download."""

    @property
    def truncation(self) -> str | None:
        if self.data_bytes_present < self.data_bytes_needed:
            cut = [t.name for t in self.tensors if t.data_end > self.data_bytes_present]
            shown = ", ".join(cut[:8]) + (f" and {len(cut) - 8} more" if len(cut) > 8 else "")
            return (
                f"{self.file} is truncated: its header needs {self.data_bytes_needed} data bytes, "
                f"the file has {self.data_bytes_present}; cut off: {shown}"
            )
        return None


@dataclass(frozen=True)
class ShapeMismatch:
    name: str
    expected: tuple[int, ...]
    found: tuple[int, ...]
    file: str


@dataclass(frozen=True)
class DtypeRule:
    """Text tensors whose official name matches `pattern` (fnmatch) must be stored as one of `dtypes`.

    `dtype_rules` turns a config into a list of these, first match wins; a quantized layout (FP8 weights next to
    BF16 norms and router) is more rules, not more code."""

    pattern: str
    dtypes: tuple[str, ...]
    source: str
    """Where the rule comes from, for the report, e.g. "config dtype bfloat16"."""


@dataclass(frozen=True)
class DtypeMismatch:
    name: str
    expected: tuple[str, ...]
    found: str
    file: str
    source: str


@dataclass(frozen=True)
class DtypeUsage:
    tensors: int
    bytes: int


@dataclass(frozen=True)
class ConfigSummary:
    """What the config alone implies: parameter counts and KV-cache bytes per token."""

    total_parameters: int
    activated_parameters: int
    routed_expert_parameters: int
    kv_cache_bytes_per_token_bf16: int
    kv_cache_bytes_per_token_fp8: int
    num_hidden_layers: int
    num_moe_layers: int


@dataclass
class InspectionReport:
    path: str
    model_type: str
    files: list[str]
    sharded: bool
    config: ConfigSummary
    text_tensors: int
    """Language-model tensors found in the checkpoint (vision tensors excluded)."""
    text_parameters: int
    """Sum of numel over those tensors, from their header shapes (FP8 scales are not parameters)."""
    vision_tensors_skipped: int
    """Vision tensors found. With a `step3_vl` config they are checked against its vision layout (missing,
    unexpected and mis-shaped ones are problems) unless the checkpoint holds none: a language-model-only export."""
    dtypes: dict[str, DtypeUsage]
    """Every tensor on disk, vision included, by safetensors dtype."""
    vision_parameters: int = 0
    """Sum of numel over those vision tensors, from their header shapes."""
    vision_parameters_expected: int | None = None
    """What a `step3_vl` config's vision tower, downsamplers and projector hold (1.90B for the release)."""
    missing: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """Expected name -> expected shape, for tensors the checkpoint lacks."""
    unexpected: dict[str, tuple[int, ...]] = field(default_factory=dict)
    wrong_shape: list[ShapeMismatch] = field(default_factory=list)
    file_problems: list[str] = field(default_factory=list)
    """Index/shard disagreements and files shorter than their headers say (an incomplete download)."""
    dtype_rules: list[DtypeRule] = field(default_factory=list)
    """What the dtypes were checked against; empty when the config names no dtype."""
    wrong_dtype: list[DtypeMismatch] = field(default_factory=list)
    bytes_on_disk: int = 0
    """Sum of the tensors' bytes over every file, from the headers."""
    bytes_expected: int = 0
    """What the config's layout takes: text and vision tensors in the config dtype, or block FP8 with its scales."""
    fp8_block_size: list[int] | None = None
    """`weight_block_size` of a block-FP8 checkpoint; its scales are checked like any tensor."""
    values_scanned: bool = False
    """True when every tensor's values were read (`--values`)."""
    non_finite: dict[str, int] = field(default_factory=dict)
    """Tensor name -> number of NaN or Inf values (only with `values_scanned`)."""
    all_zero: list[str] = field(default_factory=list)
    bad_scales: dict[str, str] = field(default_factory=dict)
    """FP8 scale name -> its zero or non-finite entries (only with `values_scanned`): a weight it scales is lost."""

    @property
    def ok(self) -> bool:
        return not (
            self.missing or self.unexpected or self.wrong_shape or self.file_problems or self.wrong_dtype
            or self.non_finite or self.all_zero or self.bad_scales
        )  # fmt: skip

    def problems(self) -> list[str]:
        """One line per problem, naming the tensor (official name) or file."""
        return (
            [f"missing {name} {_shape(shape)}" for name, shape in self.missing.items()]
            + [f"wrong shape {m.name}: expected {_shape(m.expected)}, found {_shape(m.found)}" for m in self.wrong_shape]
            + [
                f"wrong dtype {m.name}: expected {_dtypes(m.expected)} ({m.source}), found {m.found}"
                for m in self.wrong_dtype
            ]
            + [f"unexpected {name} {_shape(shape)}" for name, shape in self.unexpected.items()]
            + [f"non-finite values in {name}: {count:,} NaN or Inf" for name, count in self.non_finite.items()]
            + [f"all-zero tensor {name}" for name in self.all_zero]
            + [f"bad scale {name}: {what}" for name, what in self.bad_scales.items()]
            + self.file_problems
        )

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        # JSON has no tuples; lists keep the shapes comparable after a round trip.
        data["missing"] = {name: list(shape) for name, shape in self.missing.items()}
        data["unexpected"] = {name: list(shape) for name, shape in self.unexpected.items()}
        data["wrong_shape"] = [
            {"name": m.name, "expected": list(m.expected), "found": list(m.found), "file": m.file}
            for m in self.wrong_shape
        ]
        data["dtype_rules"] = [{**asdict(r), "dtypes": list(r.dtypes)} for r in self.dtype_rules]
        data["wrong_dtype"] = [{**asdict(m), "expected": list(m.expected)} for m in self.wrong_dtype]
        return data


# ---------------------------------------------------------------------------------------------- reading


def read_safetensors_header(path: Path) -> ShardHeader:
    """Parse the header of one safetensors file: an 8-byte little-endian length, then that much JSON.

    The data section is never read; only the file size is compared with the byte ranges the header claims.
    """
    file_size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path.name}: {file_size} bytes is too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(MAX_HEADER_BYTES, file_size - 8):
            raise CheckpointError(
                f"{path.name}: header length {header_len} exceeds the file ({file_size} bytes); "
                f"not a safetensors file or truncated inside the header"
            )
        raw = handle.read(header_len)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path.name}: header is not valid JSON ({err})") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: header is not a JSON object")
    header.pop("__metadata__", None)
    tensors = [_tensor_header(path.name, name, entry) for name, entry in header.items()]
    return ShardHeader(
        file=path.name,
        tensors=tensors,
        data_bytes_needed=max((entry["data_offsets"][1] for entry in header.values()), default=0),
        data_bytes_present=file_size - 8 - header_len,
    )


def _tensor_header(file: str, name: str, entry: Any) -> TensorHeader:
    try:
        dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        if not all(isinstance(x, int) and x >= 0 for x in (*shape, begin, end)) or end < begin:
            raise ValueError
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{file}: malformed header entry for tensor {name!r}: {entry!r}") from err
    tensor = TensorHeader(name=name, dtype=str(dtype), shape=shape, nbytes=end - begin, file=file, data_end=end)
    itemsize = DTYPE_BYTES.get(tensor.dtype)
    if itemsize is not None and tensor.nbytes != tensor.numel * itemsize:
        raise CheckpointError(
            f"{file}: tensor {name!r} ({tensor.dtype}, shape {shape}) spans {tensor.nbytes} bytes, "
            f"expected {tensor.numel * itemsize}"
        )
    return tensor


def load_config(directory: Path) -> Step3Config | Step3VLConfig:
    """Build the config class named by `model_type`; every invalid field becomes a `CheckpointError`."""
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"no {CONFIG_FILE} in {directory}")
    try:
        raw = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_path} is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_path} is not a JSON object")
    model_type = raw.get("model_type")
    config_class = CONFIG_CLASSES.get(model_type)
    if config_class is None:
        raise CheckpointError(
            f"{config_path}: model_type {model_type!r} is not a Step-3 config (expected 'step3_vl' or 'step3_text')"
        )
    # Step3VLConfig would silently drop a foreign `text_config.model_type`; a llama text config is not Step-3.
    text_config = raw.get("text_config")
    text_type = text_config.get("model_type") if isinstance(text_config, dict) else None
    if config_class is Step3VLConfig and text_type not in (None, Step3Config.model_type):
        raise CheckpointError(f"{config_path}: text_config has model_type {text_type!r}, expected 'step3_text'")
    # `model_type` is a class attribute; passing it as a field would be redundant at best.
    fields = {key: value for key, value in raw.items() if key != "model_type"}
    try:
        return config_class(**fields)
    except (ValueError, TypeError, AttributeError, StrictDataclassError) as err:  # AttributeError: unknown dtype
        raise CheckpointError(f"invalid {config_path}: {err}") from err


def checkpoint_files(directory: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files `from_pretrained` would read, and the index's weight map when sharded.

    Like transformers, a single `model.safetensors` wins over an index.
    """
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE], None
    index_path = directory / INDEX_FILE
    if not index_path.is_file():
        found = sorted(p.name for p in directory.glob("*.safetensors"))
        extra = f" (found only {', '.join(found)})" if found else ""
        raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}{extra}")
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map must map tensor names to file names")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index_path} has no usable weight_map: {err!r}") from err
    if not weight_map:
        raise CheckpointError(f"{index_path} lists no tensors")
    files = []
    for file in sorted(set(weight_map.values())):
        if not (directory / file).is_file():
            example = next(name for name, f in weight_map.items() if f == file)
            raise CheckpointError(f"{INDEX_FILE} names shard {file} (e.g. for {example}), which is not in {directory}")
        files.append(directory / file)
    return files, weight_map


# -------------------------------------------------------------------------------------------- comparing


def summarize_config(config: Step3Config | Step3VLConfig) -> ConfigSummary:
    """Parameter counts and KV-cache bytes per token implied by a config; no checkpoint needed."""
    text = config.get_text_config()
    counts = count_parameters(text)
    return ConfigSummary(
        total_parameters=counts.total,
        activated_parameters=counts.activated,
        routed_expert_parameters=counts.routed_experts,
        kv_cache_bytes_per_token_bf16=kv_cache_bytes_per_token(text, 2),
        kv_cache_bytes_per_token_fp8=kv_cache_bytes_per_token(text, 1),
        num_hidden_layers=text.num_hidden_layers,
        num_moe_layers=len(text.moe_layer_indices),
    )


def dtype_rules(config: Step3Config | Step3VLConfig, block_size: tuple[int, int] | None) -> list[DtypeRule]:
    """The dtypes the config's `dtype` (top level first, then `text_config`) allows for the text tensors.

    `block_size` is the config's block-FP8 `weight_block_size` as `fp8.fp8_block_size` parsed it (None: not
    quantized). A config without a dtype, or naming one that is not a float type, gives no rule. In the FP8 layout
    each tensor may be float8 or the config dtype: which tensors stay unquantized (norms, router, embeddings) is not
    pinned until the FP8 release's layout is, so that rule is deliberately loose."""
    text = config.get_text_config()
    dtype = getattr(config, "dtype", None) or getattr(text, "dtype", None)
    name = str(dtype).removeprefix("torch.") if dtype is not None else None
    stored = CONFIG_DTYPES.get(name)
    if stored is None:
        return []
    if block_size is None:
        return [DtypeRule("*", (stored,), f"config dtype {name}")]
    return [
        DtypeRule("*" + SCALE_SUFFIX, ("F32",), "fp8 weight_scale_inv"),
        DtypeRule("fp8-quantized", ("F8_E4M3",), "fp8 quantization_config"),  # the only fmt fp8_block_size takes
        DtypeRule("*", (stored,), f"config dtype {name}, kept unquantized in fp8"),
    ]


def _rule_matches(rule: DtypeRule, name: str) -> bool:
    # "fp8-quantized" names the weights the FP8 layout stores as float8 (`fp8.is_quantized_weight`).
    return is_quantized_weight(name) if rule.pattern == "fp8-quantized" else fnmatch.fnmatchcase(name, rule.pattern)


def check_dtypes(tensors: list[TensorHeader], rules: list[DtypeRule]) -> list[DtypeMismatch]:
    """Every tensor that a rule covers and whose dtype the rule does not allow."""
    mismatches = []
    for t in tensors:
        rule = next((r for r in rules if _rule_matches(r, t.name)), None)
        if rule is not None and t.dtype not in rule.dtypes:
            mismatches.append(DtypeMismatch(t.name, rule.dtypes, t.dtype, t.file, rule.source))
    return mismatches


def scan_values(
    files: list[Path], progress: bool | None = None
) -> tuple[dict[str, int], list[str], list[str], dict[str, int]]:
    """Read every tensor of `files` once and return (name -> NaN/Inf count, all-zero names, unreadable files,
    FP8 scale name -> number of zero entries).

    safetensors maps the file; each tensor is read in slices of at most `VALUE_CHUNK_BYTES` along its first axis,
    so memory stays bounded however large the tensor. `progress`: a tqdm bar on stderr (None: only for
    checkpoints of `PROGRESS_MIN_BYTES` or more, and only on a terminal)."""
    import torch
    from safetensors import safe_open
    from tqdm import tqdm

    total = sum(f.stat().st_size for f in files)
    if progress is None:
        disable = None if total >= PROGRESS_MIN_BYTES else True  # None: tqdm shows it on a terminal only
    else:
        disable = not progress
    non_finite: dict[str, int] = {}
    all_zero: list[str] = []
    unreadable: list[str] = []
    zero_scales: dict[str, int] = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="reading values", disable=disable, file=sys.stderr) as bar:
        for file in files:
            try:
                with safe_open(file, framework="pt") as handle:
                    for name in handle.keys():
                        bad, nonzero, nbytes, zeros = _scan_tensor(handle, name, torch)
                        if bad:
                            non_finite[name] = bad
                        if not nonzero:
                            all_zero.append(name)
                        if zeros and name.endswith(SCALE_SUFFIX):
                            zero_scales[name] = zeros
                        bar.update(nbytes)
            except Exception as err:  # safetensors raises its own error types; any of them means unreadable data
                unreadable.append(f"{file.name}: tensor data could not be read ({type(err).__name__}: {err})")
    return non_finite, all_zero, unreadable, zero_scales


def _scan_tensor(handle: Any, name: str, torch: Any) -> tuple[int, bool, int, int]:
    """(NaN/Inf count, whether any value is non-zero, bytes read, zero count) of one tensor, slice by slice."""
    view = handle.get_slice(name)
    shape = view.get_shape()
    itemsize = DTYPE_BYTES.get(view.get_dtype(), 1)
    if not shape:
        chunks = [handle.get_tensor(name)]
    else:
        row = max(1, math.prod(shape[1:]) * itemsize)
        step = max(1, VALUE_CHUNK_BYTES // row)
        chunks = (view[start : start + step] for start in range(0, shape[0], step))
    bad, nonzero, nbytes, zeros = 0, False, 0, 0
    for chunk in chunks:
        nbytes += chunk.numel() * chunk.element_size()
        if chunk.is_floating_point():
            if chunk.element_size() == 1:  # float8 has no isfinite kernel on every device
                chunk = chunk.float()
            bad += int((~torch.isfinite(chunk)).sum())
        chunk_zeros = int((chunk == 0).sum())  # one pass: the zero count also says whether anything is non-zero
        zeros += chunk_zeros
        nonzero = nonzero or chunk_zeros < chunk.numel()
    return bad, nonzero, nbytes, zeros


def index_problems(tensors: list[TensorHeader], weight_map: dict[str, str]) -> list[str]:
    """Where the index and the shards disagree; a loader trusting the index would miss these tensors."""
    located = {(t.name, t.file) for t in tensors}
    problems = [
        f"{INDEX_FILE} maps {name} to {file}, which does not contain it"
        for name, file in sorted(weight_map.items())
        if (name, file) not in located
    ]
    problems += [
        f"{t.file} holds {t.name}, which {INDEX_FILE} does not map to that file"
        for t in tensors
        if weight_map.get(t.name) != t.file
    ]
    return problems


def compare_tensors(
    config: Step3Config | Step3VLConfig,
    tensors: list[TensorHeader],
    *,
    path: str = "",
    files: list[str] | None = None,
    sharded: bool = False,
) -> InspectionReport:
    """Check tensor headers against the official layout of `config` (header-level API, no files needed)."""
    text = config.get_text_config()
    try:
        block_size = fp8_block_size(config)
    except Fp8LayoutError as err:
        raise CheckpointError(f"{CONFIG_FILE}: {err}") from err
    text_layout = fp8_tensor_shapes(text, block_size) if block_size else official_tensor_shapes(text)
    has_vision_config = getattr(config, "vision_config", None) is not None
    dtypes: dict[str, DtypeUsage] = {}
    for t in tensors:
        usage = dtypes.get(t.dtype, DtypeUsage(0, 0))
        dtypes[t.dtype] = DtypeUsage(usage.tensors + 1, usage.bytes + t.nbytes)

    report = InspectionReport(
        path=path,
        model_type=config.model_type,
        files=list(files or []),
        sharded=sharded,
        config=summarize_config(config),
        text_tensors=0,
        text_parameters=0,
        vision_tensors_skipped=0,
        vision_parameters_expected=count_vision_parameters(config) if has_vision_config else None,
        dtypes=dict(sorted(dtypes.items())),
    )
    check_vision = has_vision_config and any(is_vision_tensor(t.name) for t in tensors)
    expected = {**text_layout, **official_vision_tensor_shapes(config)} if check_vision else text_layout
    seen: dict[str, TensorHeader] = {}
    for t in tensors:
        if t.name in seen:
            report.file_problems.append(f"{t.name} is stored twice: in {seen[t.name].file} and {t.file}")
            continue
        seen[t.name] = t
        if is_vision_tensor(t.name):
            report.vision_tensors_skipped += 1
            report.vision_parameters += t.numel
            if not check_vision:
                continue
        else:
            report.text_tensors += 1
            if not (block_size and t.name.endswith(SCALE_SUFFIX)):
                report.text_parameters += t.numel
        if t.name not in expected:
            report.unexpected[t.name] = t.shape
        elif t.shape != expected[t.name]:
            report.wrong_shape.append(ShapeMismatch(t.name, expected[t.name], t.shape, t.file))
    report.missing = {name: shape for name, shape in expected.items() if name not in seen}
    report.bytes_on_disk = sum(t.nbytes for t in tensors)
    report.bytes_expected = expected_bytes(config, text_layout)
    report.fp8_block_size = list(block_size) if block_size else None
    report.dtype_rules = dtype_rules(config, block_size)
    report.wrong_dtype = check_dtypes([t for t in seen.values() if t.name in expected], report.dtype_rules)
    return report


def expected_bytes(config: Step3Config | Step3VLConfig, layout: dict[str, tuple[int, ...]]) -> int:
    """Bytes of the tensors `layout` (a language-model layout) plus the vision tower, in the config's dtype (bf16
    when it names none); FP8 weights (those whose scale the layout holds, as in `fp8.fp8_tensor_shapes`) take one
    byte per value and their scales four."""
    dtype = getattr(config, "dtype", None) or getattr(config.get_text_config(), "dtype", None)
    itemsize = DTYPE_BYTES.get(CONFIG_DTYPES.get(str(dtype).removeprefix("torch."), "BF16"), 2)
    total = 0
    for name, shape in layout.items():
        each = 4 if name.endswith(SCALE_SUFFIX) else 1 if name + SCALE_SUFFIX in layout else itemsize
        total += math.prod(shape) * each
    if getattr(config, "vision_config", None) is not None:
        total += count_vision_parameters(config) * itemsize
    return total


def inspect_checkpoint(directory: str | Path, values: bool = False, progress: bool | None = None) -> InspectionReport:
    """Inspect a checkpoint directory from its config and safetensors headers; raises `CheckpointError`.

    `values=True` also reads every tensor once (see `scan_values`) and reports NaN/Inf and all-zero tensors."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory")
    config = load_config(directory)
    files, weight_map = checkpoint_files(directory)
    shards = [read_safetensors_header(file) for file in files]
    tensors = [t for shard in shards for t in shard.tensors]
    report = compare_tensors(
        config, tensors, path=str(directory), files=[f.name for f in files], sharded=weight_map is not None
    )
    if weight_map is not None:
        report.file_problems += index_problems(tensors, weight_map)
    report.file_problems += [problem for shard in shards if (problem := shard.truncation)]
    if values:
        # A truncated shard is already a problem, and safetensors refuses to map it.
        readable = [file for file, shard in zip(files, shards) if shard.truncation is None]
        report.non_finite, report.all_zero, unreadable, zero_scales = scan_values(readable, progress)
        report.file_problems += unreadable
        for name in sorted({*zero_scales, *(n for n in report.non_finite if n.endswith(SCALE_SUFFIX))}):
            what = [f"{zero_scales[name]:,} zero" if name in zero_scales else "",
                    f"{report.non_finite[name]:,} NaN or Inf" if name in report.non_finite else ""]  # fmt: skip
            report.bad_scales[name] = ", ".join(w for w in what if w) + " entries"
        report.values_scanned = True
    return report


# ------------------------------------------------------------------------------------------- reporting


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _dtypes(dtypes: tuple[str, ...]) -> str:
    return " or ".join(dtypes)


def format_report(report: InspectionReport) -> str:
    c = report.config
    layout = f"{len(report.files)} shard(s) + index" if report.sharded else report.files[0]
    lines = [
        f"Step-3 checkpoint {report.path}",
        f"  config            {report.model_type}, {c.num_hidden_layers} layers ({c.num_moe_layers} MoE)",
        f"  files             {layout}",
        f"  parameters        {human_count(c.total_parameters)} total ({c.total_parameters:,})",
        f"  activated/token   {human_count(c.activated_parameters)} ({c.activated_parameters:,}); "
        f"routed experts {human_count(c.routed_expert_parameters)}",
        f"  KV cache/token    {c.kv_cache_bytes_per_token_bf16:,} B bf16, {c.kv_cache_bytes_per_token_fp8:,} B fp8",
        f"  text tensors      {report.text_tensors:,} holding {report.text_parameters:,} parameters",
        f"  vision tensors    {report.vision_tensors_skipped:,} holding {report.vision_parameters:,} parameters"
        + (
            f" (the config's vision side: {human_count(report.vision_parameters_expected)}, "
            f"{report.vision_parameters_expected:,})"
            if report.vision_parameters_expected is not None
            else ""
        ),
        "  dtypes            "
        + ", ".join(f"{d}: {u.tensors:,} tensors, {human_count(u.bytes, 'B')}" for d, u in report.dtypes.items()),
        "  dtype check       "
        + (
            "; ".join(f"{_dtypes(r.dtypes)} ({r.source})" for r in report.dtype_rules)
            or "none (the config names no dtype)"
        ),
        f"  bytes on disk     {human_count(report.bytes_on_disk, 'B')} ({report.bytes_on_disk:,}); the config's "
        f"layout: {human_count(report.bytes_expected, 'B')} ({report.bytes_expected:,})",
        "  fp8               "
        + (
            f"block FP8 e4m3, weight_block_size {report.fp8_block_size}, scales checked by name and shape"
            if report.fp8_block_size
            else "no (unquantized)"
        ),
        "  values            "
        + ("every tensor read" if report.values_scanned else "not read (headers only; --values reads them)"),
    ]
    if report.missing:
        lines.append(f"  MISSING ({len(report.missing)}):")
        lines += [f"    {name}  expected {_shape(shape)}" for name, shape in report.missing.items()]
    if report.wrong_shape:
        lines.append(f"  WRONG SHAPE ({len(report.wrong_shape)}):")
        lines += [
            f"    {m.name}  expected {_shape(m.expected)}, found {_shape(m.found)} in {m.file}"
            for m in report.wrong_shape
        ]
    if report.wrong_dtype:
        lines.append(f"  WRONG DTYPE ({len(report.wrong_dtype)}):")
        lines += [
            f"    {m.name}  expected {_dtypes(m.expected)} ({m.source}), found {m.found} in {m.file}"
            for m in report.wrong_dtype
        ]
    if report.unexpected:
        lines.append(f"  UNEXPECTED ({len(report.unexpected)}):")
        lines += [f"    {name}  {_shape(shape)}" for name, shape in report.unexpected.items()]
    if report.non_finite:
        lines.append(f"  NON-FINITE VALUES ({len(report.non_finite)}):")
        lines += [f"    {name}  {count:,} NaN or Inf" for name, count in report.non_finite.items()]
    if report.all_zero:
        lines.append(f"  ALL-ZERO ({len(report.all_zero)}):")
        lines += [f"    {name}" for name in report.all_zero]
    if report.bad_scales:
        lines.append(f"  BAD SCALES ({len(report.bad_scales)}):")
        lines += [f"    {name}  {what}" for name, what in report.bad_scales.items()]
    if report.file_problems:
        lines.append(f"  FILE PROBLEMS ({len(report.file_problems)}):")
        lines += [f"    {problem}" for problem in report.file_problems]
    if report.ok:
        lines.append(
            "  result            OK: every tensor matches the config"
            + (", no NaN, Inf or all-zero tensor" if report.values_scanned else "")
        )
    else:
        lines.append(f"  result            MISMATCH: {len(report.problems())} problem(s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="step3-inspect",
        description="Check a Step-3 checkpoint directory against its config.json: tensor names, shapes and dtypes "
        "from safetensors headers only, unless --values. Exit 0: matches; 1: mismatch; 2: unusable input.",
    )
    parser.add_argument("checkpoint", type=Path, help="directory with config.json and safetensors files")
    parser.add_argument("--json", action="store_true", help="print a machine-readable JSON object")
    parser.add_argument(
        "--values", action="store_true",
        help="also read every tensor once (a slice at a time) and report NaN/Inf and all-zero tensors; "
        "reads the whole checkpoint, with a progress bar on stderr for large ones",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        report = inspect_checkpoint(args.checkpoint, values=args.values)
    except CheckpointError as err:
        if args.json:
            print(json.dumps({"path": str(args.checkpoint), "ok": False, "error": str(err)}))
        else:
            print(f"step3-inspect: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_json(), indent=2) if args.json else format_report(report))
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
