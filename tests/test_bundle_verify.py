"""Bundle integrity: manifest schema, sha256 of every file, Ed25519 signature, compatibility.

Every refusal is checked on a real exported bundle that a test then damages in one way.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from bundle_fixtures import cached_bundle, cached_keys, copy_bundle

from export.signing import generate_keypair
from runtime.agent import Agent
from runtime.bundle import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    load_verified,
    read_manifest,
    sha256_file,
    verify_bundle,
)
from runtime.errors import BundleError


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return cached_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def pubkey(tmp_path_factory) -> Path:
    return cached_keys(tmp_path_factory)[1]


@pytest.fixture()
def damaged(bundle, tmp_path) -> Path:
    return copy_bundle(bundle, tmp_path / "copy")


def _rewrite_manifest(bundle_dir: Path, **changes) -> None:
    path = bundle_dir / MANIFEST_FILE
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_keygen_writes_private_key_readable_only_by_owner(tmp_path):
    private, public = generate_keypair(tmp_path / "k")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert public.name == "k.pub" and b"BEGIN PUBLIC KEY" in public.read_bytes()
    with pytest.raises(BundleError, match="exists"):
        generate_keypair(tmp_path / "k")


def test_every_file_is_hashed_in_the_manifest(bundle):
    manifest = read_manifest(bundle)
    on_disk = {p.name for p in bundle.iterdir()} - {MANIFEST_FILE, SIGNATURE_FILE}
    assert set(manifest.files) == on_disk
    for rel, digest in manifest.files.items():
        assert sha256_file(bundle / rel) == digest


def test_signed_bundle_verifies_with_its_key(bundle, pubkey):
    report = verify_bundle(bundle, pubkey, require_signature=True)
    assert report.ok and report.signature == "ok" and report.hashes == "ok"
    assert report.reasons == []
    assert load_verified(bundle, pubkey, require_signature=True).bundle_id


def test_other_key_is_an_invalid_signature(bundle, tmp_path):
    _, other = generate_keypair(tmp_path / "other")
    report = verify_bundle(bundle, other)
    assert not report.ok and report.signature == "invalid"
    with pytest.raises(BundleError, match="signature invalid"):
        Agent.load(bundle, pubkey=other)


def test_missing_signature_is_refused_when_a_key_is_configured(damaged, pubkey):
    (damaged / SIGNATURE_FILE).unlink()
    report = verify_bundle(damaged, pubkey)
    assert report.signature == "missing" and not report.ok
    assert verify_bundle(damaged).ok  # no key configured, no signature required
    with pytest.raises(BundleError, match="signature missing"):
        load_verified(damaged, pubkey)


def test_signature_required_without_a_key_is_refused(bundle):
    report = verify_bundle(bundle, None, require_signature=True)
    assert not report.ok and "no public key" in report.reasons[0]


def test_modified_graph_is_refused_naming_the_file(damaged, pubkey):
    graph = damaged / "step.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    report = verify_bundle(damaged, pubkey)
    assert report.signature == "ok"  # the manifest itself is intact ...
    assert report.hashes == "hash mismatch for step.onnx"  # ... the file is not
    with pytest.raises(BundleError, match=r"hash mismatch for step\.onnx"):
        Agent.load(damaged, pubkey=pubkey)


def test_missing_file_is_refused_naming_the_file(damaged):
    (damaged / "encoder.onnx").unlink()
    with pytest.raises(BundleError, match=r"missing file encoder\.onnx"):
        load_verified(damaged)


def test_edited_manifest_breaks_the_signature(damaged, pubkey):
    _rewrite_manifest(damaged, obs_margin=0.5)
    assert verify_bundle(damaged, pubkey).signature == "invalid"
    assert verify_bundle(damaged).ok  # hashes still fine: only the signature can catch it


def test_unknown_schema_version_is_refused(damaged):
    _rewrite_manifest(damaged, schema_version=99)
    with pytest.raises(BundleError, match="unknown manifest schema_version 99"):
        load_verified(damaged)


def test_newer_min_runtime_version_is_refused(damaged):
    _rewrite_manifest(damaged, min_runtime_version="99.0.0")
    with pytest.raises(BundleError, match=r"needs runtime >= 99\.0\.0"):
        Agent.load(damaged)


def test_file_entry_escaping_the_bundle_is_invalid(damaged):
    data = json.loads((damaged / MANIFEST_FILE).read_text())
    data["files"]["../evil"] = "0" * 64
    (damaged / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(BundleError, match="relative path inside the bundle"):
        read_manifest(damaged)


def test_malformed_manifest_names_the_key(damaged):
    _rewrite_manifest(damaged, latent_dim="five")
    with pytest.raises(BundleError, match="latent_dim"):
        read_manifest(damaged)
    (damaged / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        read_manifest(damaged)


def test_missing_bundle_is_a_clear_error(tmp_path):
    with pytest.raises(BundleError, match="not found"):
        load_verified(tmp_path / "nope")


def test_a_declared_state_that_contradicts_the_graphs_is_refused(damaged):
    """The state size (PEARL: latent_dim) must match the graphs' state inputs."""
    data = json.loads((damaged / MANIFEST_FILE).read_text())
    z = data["adaptation"]["latent_dim"]
    for s in data["adaptation"]["state"]:
        s["shape"] = [z + 1]
    (damaged / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(BundleError, match=r"input 'precision' has shape \['batch', \d+\]; the "):
        load_verified(damaged)


def test_a_graph_spec_that_contradicts_the_onnx_file_is_refused_at_load(damaged):
    """Manifest consistent with itself, but the file's real shapes differ: Agent refuses."""
    data = json.loads((damaged / MANIFEST_FILE).read_text())
    z = data["adaptation"]["latent_dim"]
    for s in data["adaptation"]["state"]:
        s["shape"] = [z + 1]
    for g in data["graphs"].values():
        for t in g["inputs"] + g["outputs"]:
            if t["name"] in ("precision", "eta", "precision_out", "eta_out", "mu", "var"):
                t["shape"] = ["batch", z + 1]
    (damaged / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(BundleError, match="manifest says shape"):
        Agent.load(damaged)
