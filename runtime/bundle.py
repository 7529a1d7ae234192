"""The bundle on disk: manifest schema, file hashes and the detached Ed25519 signature.

A bundle is a directory::

    manifest.json        what is in the bundle (schema below), sha256 of every other file
    manifest.sig         base64 of the Ed25519 signature over the exact bytes of manifest.json
    step.onnx            fused step graph (transition + belief + obs -> belief' + action)
    encoder.onnx         context encoder alone
    policy.onnx          deterministic policy alone
    test_vectors.npz     inputs and expected outputs for the on-device self-test
    (step_int8.onnx)     optional INT8 variant of the step graph

The signature covers the manifest, and the manifest covers every file through its sha256, so one
signature check plus the hash checks authenticate the whole bundle (the Mender/RAUC scheme).
Only the stdlib, pydantic, numpy (through the adaptation declarations) and ``cryptography``
are used here: this module runs on the
device.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from runtime import RUNTIME_VERSION
from runtime.adaptation import Adaptation, check_graph_signatures
from runtime.errors import BundleError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
SCHEMA_VERSION = 2
#: Schema versions this runtime can read.
SUPPORTED_SCHEMAS = (2,)
#: Why older schemas are refused (schema 1: PEARL-only manifests, before the adaptation
#: contract; their policy graph takes z, not the belief).
RETIRED_SCHEMAS = {
    1: "schema 1 predates the adaptation contract (edgeadapt 0.1); re-export the run with "
    "`edgeadapt export RUN --out DIR` to get a schema 2 bundle"
}

SignatureStatus = Literal["ok", "missing", "invalid"]

_CHUNK = 1 << 20
_VERSION_RE = re.compile(r"^\d+(\.\d+)*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """One graph input or output; ``"batch"`` in ``shape`` marks the dynamic batch axis."""

    name: str
    shape: list[int | str]
    dtype: Literal["float32", "float16", "int64", "bool"]


class GraphSpec(_Strict):
    """One ONNX graph of the bundle and its I/O signature."""

    file: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    description: str = ""

    def input(self, name: str) -> TensorSpec:
        return _by_name(self.inputs, name, self.file)

    def output(self, name: str) -> TensorSpec:
        return _by_name(self.outputs, name, self.file)


class BoxSpec(_Strict):
    """A box space: ``dim`` values with per-dimension bounds (physical units of the family)."""

    dim: int = Field(ge=1)
    low: list[float]
    high: list[float]
    #: For actions: the policy emits a in [-1, 1]; physical = low + (high - low) / 2 * (a + 1).
    normalization: str = ""

    @field_validator("high")
    @classmethod
    def _same_len(cls, v: list[float], info: ValidationInfo) -> list[float]:
        low = info.data.get("low")
        if low is not None and len(low) != len(v):
            raise ValueError(f"low has {len(low)} values, high has {len(v)}")
        return v


class OODSpec(_Strict):
    """Out-of-distribution score and its thresholds, calibrated at export on in-distribution data.

    The score of a transition is the mean over latent dimensions of the squared distance between
    the transition's factor mean and the current belief mean, in units of their combined
    variance: ``mean_z((mu_i - m)^2 / (v + var_i))``. About 1 when evidence agrees with the
    belief; large when the world no longer matches what the belief expects. For a full belief
    it is the same over the factor's scalar measurements: the mean normalized innovation
    ``(y - h . m)^2 / (h^T cov h + noise)``.
    """

    score: Literal["surprise"] = "surprise"
    warn: float = Field(gt=0, description="score above this raises an 'ood_warn' event")
    alarm: float = Field(gt=0, description="score above this raises 'ood_alarm'")
    warn_quantile: float = Field(gt=0, lt=1)
    alarm_quantile: float = Field(gt=0, lt=1)
    calibration: dict[str, float | int | str] = Field(default_factory=dict)


class Manifest(_Strict):
    """``manifest.json``: the validated description of a bundle (schema version 2)."""

    schema_version: int
    bundle_id: str
    version: str
    created: str = Field(description="ISO 8601 UTC time of export")
    adaptation: Adaptation = Field(
        description="the family's adaptation state and graphs (see runtime.adaptation)"
    )
    env: str = Field(description="task family name")
    plugins: list[str] = Field(
        default_factory=list, description="modules that register the task family, if not built in"
    )
    profile: str | None = None
    min_runtime_version: str
    opset: int = Field(ge=17)
    graphs: dict[str, GraphSpec]
    files: dict[str, str] = Field(description="relative path -> sha256 hex of every other file")
    obs: BoxSpec
    act: BoxSpec
    obs_margin: float = Field(
        1.0,
        ge=0,
        description="observations beyond [low - m (high - low), high + m (high - low)] are "
        "refused like non-finite ones (m = obs_margin)",
    )
    horizon: int | None = None
    test_vectors: str
    test_tolerance: dict[str, float] = Field(
        default_factory=dict, description="graph name -> max abs error allowed in self-test"
    )
    ood: OODSpec
    providers: list[str] = Field(
        default_factory=lambda: ["CPUExecutionProvider"],
        description="execution providers in order of preference",
    )
    trt: dict[str, str | int | bool] | None = None
    provenance: dict[str, object] = Field(default_factory=dict)

    @property
    def algorithm(self) -> str:
        """The meta-RL family of the bundle ("pearl", "rl2", ...)."""
        return self.adaptation.algorithm

    @field_validator("min_runtime_version", "version")
    @classmethod
    def _dotted(cls, v: str) -> str:
        if not _VERSION_RE.match(v):
            raise ValueError(f"expected a dotted numeric version like 0.1.0, got {v!r}")
        return v

    @field_validator("files")
    @classmethod
    def _relative(cls, v: dict[str, str]) -> dict[str, str]:
        for path, digest in v.items():
            p = PurePosixPath(path)
            if p.is_absolute() or ".." in p.parts or path in (MANIFEST_FILE, SIGNATURE_FILE):
                raise ValueError(f"file entry {path!r} must be a relative path inside the bundle")
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError(f"file entry {path!r}: expected a sha256 hex digest")
        return v

    @model_validator(mode="after")
    def _graphs_follow_the_declaration(self) -> Manifest:
        """Step and act graphs must carry exactly the declared state (paired by name)."""
        io = {
            name: ([t.name for t in g.inputs], [t.name for t in g.outputs])
            for name, g in self.graphs.items()
        }
        problems = check_graph_signatures(self.adaptation, io)
        problems += self._state_shapes_agree()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _state_shapes_agree(self) -> list[str]:
        """Every graph input carrying a declared state tensor has shape [batch, *state.shape]
        (PEARL: the latent size; RL²: the hidden size)."""
        problems = []
        for s in self.adaptation.state:
            for gname, g in self.graphs.items():
                for t in g.inputs:
                    if t.name == s.name and list(t.shape[1:]) != list(s.shape):
                        problems.append(
                            f"graph {gname!r} input {s.name!r} has shape {t.shape}; the "
                            f"declared state is {s.shape} per agent"
                        )
        return problems

    def graph(self, name: str) -> GraphSpec:
        """The graph ``name``, with a clear error listing the ones present."""
        try:
            return self.graphs[name]
        except KeyError:
            raise BundleError(
                f"bundle has no graph {name!r}; it has: {', '.join(sorted(self.graphs))}"
            ) from None


@dataclass
class VerifyReport:
    """Outcome of :func:`verify_bundle`; ``reasons`` lists every failure found."""

    ok: bool
    signature: SignatureStatus
    hashes: str  # "ok" or the first reason they failed
    reasons: list[str] = field(default_factory=list)
    manifest: Manifest | None = None


# -- public API ------------------------------------------------------------------------------
def read_manifest(bundle_dir: str | Path) -> Manifest:
    """Parse and schema-check ``manifest.json`` (no hash or signature check)."""
    path = Path(bundle_dir) / MANIFEST_FILE
    return parse_manifest(_read_bytes(path), source=str(path))


def parse_manifest(raw: bytes, source: str = MANIFEST_FILE) -> Manifest:
    """Validate manifest bytes; unknown schema versions are refused before field checks."""
    try:
        data = json.loads(raw)
    except RecursionError:
        raise BundleError(f"{source}: not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, over-long integers
        raise BundleError(f"{source}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise BundleError(f"{source}: expected a JSON object")
    schema = data.get("schema_version")
    if schema in RETIRED_SCHEMAS:
        raise BundleError(f"{source}: manifest {RETIRED_SCHEMAS[schema]}")
    if schema not in SUPPORTED_SCHEMAS:
        raise BundleError(
            f"{source}: unknown manifest schema_version {schema!r} "
            f"(this runtime reads {', '.join(map(str, SUPPORTED_SCHEMAS))})"
        )
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first.get("loc", ())) or "<root>"
        raise BundleError(f"{source}: invalid manifest at '{key}': {first.get('msg')}") from None


def verify_bundle(
    bundle_dir: str | Path,
    pubkey: str | Path | bytes | None = None,
    require_signature: bool = False,
) -> VerifyReport:
    """Check schema, runtime compatibility, every file's sha256 and the signature.

    The signature is checked when ``pubkey`` is given; without a key a present signature is
    reported "missing" only if ``require_signature`` (it cannot be checked otherwise, and
    ``signature`` then says "missing" to make clear it was not verified).
    """
    bundle_dir = Path(bundle_dir)
    reasons: list[str] = []
    try:
        raw = _read_bytes(bundle_dir / MANIFEST_FILE)
        manifest = parse_manifest(raw, source=str(bundle_dir / MANIFEST_FILE))
    except BundleError as exc:
        return VerifyReport(False, "missing", str(exc), [str(exc)], None)
    signature = _check_signature(bundle_dir, raw, pubkey, reasons, require_signature)
    compat = check_compatible(manifest)
    if compat:
        reasons.append(compat)
    hash_problems = check_hashes(bundle_dir, manifest)
    reasons += hash_problems
    hashes = "ok" if not hash_problems else hash_problems[0]
    return VerifyReport(not reasons, signature, hashes, reasons, manifest)


def load_verified(
    bundle_dir: str | Path,
    pubkey: str | Path | bytes | None = None,
    require_signature: bool = False,
) -> Manifest:
    """The manifest of a bundle that passed :func:`verify_bundle`, else :class:`BundleError`."""
    report = verify_bundle(bundle_dir, pubkey, require_signature)
    if not report.ok or report.manifest is None:
        raise BundleError(f"{bundle_dir}: refused: " + "; ".join(report.reasons))
    return report.manifest


def check_compatible(manifest: Manifest, runtime_version: str = RUNTIME_VERSION) -> str | None:
    """A reason when this runtime is older than the bundle's ``min_runtime_version``."""
    if version_tuple(manifest.min_runtime_version) > version_tuple(runtime_version):
        return (
            f"bundle needs runtime >= {manifest.min_runtime_version}, "
            f"this runtime is {runtime_version}"
        )
    return None


def check_hashes(bundle_dir: Path, manifest: Manifest) -> list[str]:
    """One reason per listed file that is missing or whose sha256 differs; graphs must be listed."""
    problems: list[str] = []
    for rel, expected in sorted(manifest.files.items()):
        path = bundle_dir / rel
        if not path.is_file():
            problems.append(f"missing file {rel}")
        elif sha256_file(path) != expected:
            problems.append(f"hash mismatch for {rel}")
    needed = [g.file for g in manifest.graphs.values()] + [manifest.test_vectors]
    problems += [
        f"{rel} is not covered by the manifest hashes"
        for rel in needed
        if rel not in manifest.files
    ]
    return problems


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def version_tuple(version: str) -> tuple[int, ...]:
    """``"0.10.2"`` -> ``(0, 10, 2)``, for ordering."""
    if not _VERSION_RE.match(version):
        raise BundleError(f"not a dotted numeric version: {version!r}")
    return tuple(int(p) for p in version.split("."))


# -- signatures ------------------------------------------------------------------------------
def sign_bytes(data: bytes, private_key_pem: bytes) -> bytes:
    """Base64 Ed25519 signature of ``data`` (the content of ``manifest.sig``)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(private_key_pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError("signing key is not an Ed25519 private key")
    return base64.b64encode(key.sign(data)) + b"\n"


def load_public_key(pubkey: str | Path | bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM bytes/text, raw 32 bytes, or a path to a PEM file."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    if isinstance(pubkey, bytes) and len(pubkey) == 32:
        return Ed25519PublicKey.from_public_bytes(pubkey)
    if isinstance(pubkey, str) and pubkey.lstrip().startswith("-----BEGIN"):
        pem = pubkey.encode()
    elif isinstance(pubkey, bytes):
        pem = pubkey
    else:
        pem = _read_bytes(Path(pubkey))
    try:
        key = load_pem_public_key(pem)
    except ValueError as exc:
        raise BundleError(f"public key is not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError("public key is not an Ed25519 key")
    return key


def verify_signature(data: bytes, signature_b64: bytes, pubkey: str | Path | bytes) -> bool:
    """True when ``signature_b64`` is a valid Ed25519 signature of ``data`` under ``pubkey``."""
    from cryptography.exceptions import InvalidSignature

    key = load_public_key(pubkey)
    try:
        sig = base64.b64decode(signature_b64.strip(), validate=True)
        key.verify(sig, data)
    except (InvalidSignature, ValueError):
        return False
    return True


# -- helpers ---------------------------------------------------------------------------------
def _check_signature(
    bundle_dir: Path,
    manifest_raw: bytes,
    pubkey: str | Path | bytes | None,
    reasons: list[str],
    require_signature: bool,
) -> SignatureStatus:
    sig_path = bundle_dir / SIGNATURE_FILE
    if not sig_path.is_file():
        if require_signature or pubkey is not None:
            reasons.append(f"signature missing ({SIGNATURE_FILE} not found)")
        return "missing"
    if pubkey is None:
        if require_signature:
            reasons.append("signature required but no public key configured")
        return "missing"
    if verify_signature(manifest_raw, sig_path.read_bytes(), pubkey):
        return "ok"
    reasons.append("signature invalid: manifest.json was not signed by this key or was modified")
    return "invalid"


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"{path}: not found") from None
    except OSError as exc:
        raise BundleError(f"{path}: cannot read ({exc.strerror})") from None


def _by_name(specs: list[TensorSpec], name: str, where: str) -> TensorSpec:
    for spec in specs:
        if spec.name == name:
            return spec
    raise BundleError(f"{where}: no tensor named {name!r}")
