"""The warehouse driver's pure parts: text results, what a cluster adds to each client."""

from vtp.core.warehouse import _tsv_value


def test_tab_separated_fields_are_unescaped_as_clickhouse_escapes_them():
    assert _tsv_value(r"Literal 'a\\b'") == "Literal 'a\\b'"
    assert _tsv_value(r"x\ty\nz\\") == "x\ty\nz\\"
    assert _tsv_value(r"it\'s \0") == "it's \0"
    assert _tsv_value("plain") == "plain"
