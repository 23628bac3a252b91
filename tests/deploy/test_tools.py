"""How the checking tools are made: Go builds that fail say so, vtp's own checks are
rebuilt when their source changes, and the schemas kubeconform reads are local and
closed."""

from __future__ import annotations

import shutil

import pytest

from deploy import gotools, k8s_schemas
from deploy.gotools import GoToolError, go_tool
from vtp.core.settings import Settings

pytestmark = pytest.mark.deploy


def test_a_tool_that_is_not_a_go_tool_is_refused(tmp_path):
    with pytest.raises(GoToolError, match="not a Go-built checking tool"):
        go_tool("kubectl", Settings(cache_dir=tmp_path))


def test_a_build_that_fails_says_what_go_said(tmp_path, monkeypatch):
    monkeypatch.setitem(
        gotools.UPSTREAM, "kubeconform", "github.com/yannh/kubeconform/cmd/kubeconform@v0.0.0-none"
    )
    with pytest.raises(GoToolError, match=r"go install .*@v0\.0\.0-none failed: .*v0\.0\.0-none"):
        go_tool("kubeconform", Settings(cache_dir=tmp_path))
    assert not (tmp_path / "tools" / "go" / "bin" / ".kubeconform.built").exists()


def test_vtp_s_own_checks_are_rebuilt_when_their_source_changes(tmp_path, monkeypatch):
    source = tmp_path / "checks"
    shutil.copytree(gotools.CHECKS, source)
    monkeypatch.setattr(gotools, "CHECKS", source)
    before = gotools._wanted("compose-check")
    main = source / "cmd" / "compose-check" / "main.go"
    main.write_text(main.read_text() + "\n// changed\n")
    assert gotools._wanted("compose-check") != before
    assert gotools._wanted("helm") == gotools.UPSTREAM["helm"]  # a pinned version


def test_kubernetes_refs_are_made_local():
    schema = {
        "properties": {"spec": {"$ref": "/api/_definitions.json#/$defs/io.k8s.Spec"}},
        "items": [{"$ref": "#/x"}],
    }
    assert k8s_schemas.local_refs(schema) == 1
    assert schema["properties"]["spec"]["$ref"] == "_definitions.json#/$defs/io.k8s.Spec"


def test_crd_objects_are_closed_but_their_one_of_branches_and_free_maps_stay_open():
    schema = {
        "type": "object",
        "properties": {
            "spec": {"type": "object", "properties": {"partitions": {"type": "integer"}}},
            "config": {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": True,
                "properties": {},
            },
            "env": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"name": {}},
                    "oneOf": [{"properties": {"value": {}}}],
                },
            },
        },
    }
    k8s_schemas.closed(schema)
    assert (
        schema["additionalProperties"] is False
        and schema["properties"]["spec"]["additionalProperties"] is False
    )
    assert "additionalProperties" not in schema["properties"]["config"]
    env = schema["properties"]["env"]["items"]
    assert env["additionalProperties"] is False and "additionalProperties" not in env["oneOf"][0]


def test_the_strimzi_generator_wants_a_jdk_21_or_newer(monkeypatch, tmp_path):
    monkeypatch.setattr(k8s_schemas, "JVM_ROOT", tmp_path)  # no JDK there
    with pytest.raises(k8s_schemas.SchemaError, match="JDK 21 or newer"):
        k8s_schemas._jdk21()
