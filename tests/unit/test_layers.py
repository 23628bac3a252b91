"""The import contract holds for the tree, and each of its rules catches what it names."""

from __future__ import annotations

from vtp.layers import check, graph, imports_of, main


def rules(edges: dict[str, set[str]]) -> list[str]:
    return [b.rule for b in check(edges)]


def test_the_tree_keeps_the_contract(capsys):
    assert main([]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "vtp.core -> schemas" in out and "0 broken rule(s)" in out


def test_the_graph_sees_lazy_and_relative_imports():
    edges = graph()
    assert "vtp.serve" in edges["vtp.cli"]  # imported inside a function
    assert "vtp.core.settings" in edges["sinks.sink"]
    assert "deploy.broker" not in edges["vtp.core.settings"]


def test_relative_imports_resolve_to_first_party_modules(tmp_path):
    path = tmp_path / "settings.py"
    path.write_text("from . import regions\nfrom .. import harness\nimport json\n")
    assert imports_of("vtp.core.settings", path) == {"vtp.core.regions", "vtp.harness"}


def test_a_stage_importing_the_application_is_refused():
    assert rules({"sinks.sink": {"vtp.harness"}, "vtp.harness": set()}) == [
        "the stages layer imports upward"
    ]


def test_the_kernel_importing_a_stage_or_the_launcher_is_refused():
    edges = {"vtp.core.settings": {"deploy.broker", "sinks.sink"}, "deploy.broker": set()}
    assert rules(edges) == ["the kernel layer imports upward"] * 2


def test_one_stage_importing_another_is_refused_the_application_may():
    assert rules({"owner_api.erasure": {"sinks.erased"}}) == ["one stage imports another"]
    assert rules({"vtp.serve": {"sinks.supervisor", "owner_api.app", "vtp.harness"}}) == []


def test_the_vehicle_sdk_imports_only_schemas():
    assert rules({"producers.sdk": {"vtp.core.kafka", "schemas.registry"}}) == [
        "the vehicle SDK imports only schemas"
    ]
    assert rules({"producers.spool": {"vtp.core.settings"}}) == [
        "the vehicle SDK imports only schemas"
    ]
    assert rules({"producers.publish": {"vtp.core.kafka"}}) == []


def test_the_vehicle_side_imports_itself_but_not_the_gateway_beside_it():
    edges = {"producers.uplink": {"producers.spool", "producers.edge_wire", "producers.edge"}}
    assert rules(edges) == ["the vehicle SDK imports only schemas"]


def test_a_package_outside_every_layer_is_refused_until_placed():
    assert rules({"gateway.edge": {"schemas"}}) == [
        "belongs to no layer (place it in vtp/layers.py)"
    ]


def test_an_import_circle_is_refused_even_inside_one_unit():
    edges = {"owner_api.app": {"owner_api.analyst"}, "owner_api.analyst": {"owner_api.app"}}
    assert rules(edges) == ["import circle among these modules"]


def test_the_readme_layout_names_every_unit_and_only_paths_that_exist():
    from vtp.layers import LAYERS, ROOT

    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```")[1]
    named = {
        w.rstrip("/,")
        for line in block.splitlines()
        for w in line.split()
        if w.endswith((".py", "/", "/,"))
    }
    assert named and all((ROOT / n).exists() for n in named), sorted(
        n for n in named if not (ROOT / n).exists()
    )
    for _, units in LAYERS:
        for unit in units:
            if unit != "vtp":
                path = unit.replace(".", "/")
                assert path in named or f"{path}.py" in named, f"{unit} missing from the layout"


def test_a_new_top_level_package_is_found_and_refused_until_placed(tmp_path):
    for package, body in [
        ("sinks", "import alerts\n"),
        ("alerts", "import vtp.harness\n"),
        ("vtp", ""),
    ]:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text(body)
    (tmp_path / "vtp" / "harness.py").write_text("")
    assert main([str(tmp_path)]) == 1
    broken = {str(b) for b in check(graph(tmp_path))}
    assert "alerts: belongs to no layer (place it in vtp/layers.py)" in broken
