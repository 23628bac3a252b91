import os
from pathlib import Path

import pytest

from vtp.core.settings import (
    Settings,
    SettingsError,
    as_environment,
    documented_settings,
    load_settings,
    local_root,
    settings_table,
)


def test_defaults_run_locally_and_a_region_has_its_own_folder_and_topics():
    s = load_settings({})
    assert s.region == "" and s.warehouse == "chdb"
    cn = s.for_region("CN")
    assert cn.region == "cn" and cn.home == s.data_dir / "cn"
    assert cn.topics.validated == "vtp.cn.validated" and cn.topics.uploads == "vtp.cn.uploads"
    assert cn.topics.worker_app == "vtp-cn-worker" and cn.topics.sink_group == "vtp-cn-sink"
    assert cn.warehouse_path == s.data_dir / "cn" / "warehouse"
    assert cn.keys_path == s.data_dir / "cn" / "keys"


def test_environment_overrides():
    s = load_settings(
        {
            "VTP_REGION": "eu",
            "VTP_SINK_BATCH_MESSAGES": "10",
            "VTP_TOPIC_PREFIX": "x",
            "VTP_KAFKA_EXTRA": '{"security.protocol": "SSL"}',
            "VTP_KAFKA_BOOTSTRAP": "h:1",
        }
    )
    assert s.region == "eu" and s.sink_batch_messages == 10
    assert s.topics.uploads == "x.eu.uploads"
    assert s.kafka_extra == {"security.protocol": "SSL"}
    assert s.bootstrap() == "h:1"


def test_reading_settings_writes_nothing_to_the_environment():
    before = dict(os.environ)
    load_settings({"VTP_REGION": "eu", "VTP_TOPIC_PREFIX": "y"})
    assert dict(os.environ) == before


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"VTP_SINK_BATCH_MESSAGES": "many"}, "not a whole number"),
        ({"VTP_SINK_BATCH_MESSAGES": "0"}, "at least 1"),
        ({"VTP_MAX_CLOCK_SKEW_S": "soon"}, "not a number"),
        ({"VTP_KAFKA_EXTRA": "[1]"}, "JSON object"),
        ({"VTP_KAFKA_EXTRA": "{"}, "JSON object"),
        ({"VTP_REGION": "us"}, "not one of cn, eu"),  # a region is opened in code, not here
        ({"VTP_VEHICLE_STATE_TTL_S": "86400"}, "at least VTP_MAX_BACKLOG_S"),
        ({"VTP_CHANGELOG_COMPACTION_LAG_S": "0"}, "more than 0"),
        ({"VTP_TOPIC_MIN_INSYNC": "2"}, "at most VTP_TOPIC_REPLICATION"),
        ({"VTP_TOPIC_REPLICATION": "3", "VTP_TOPIC_MIN_INSYNC": "0"}, "at least 1"),
    ],
)
def test_bad_values_are_named(env, fragment):
    with pytest.raises(SettingsError, match=fragment):
        load_settings(env)


def test_a_region_bound_command_without_a_region_says_what_to_do():
    with pytest.raises(SettingsError, match="set VTP_REGION or pass --region"):
        load_settings({}).topics  # noqa: B018 - the property is what raises


def test_no_broker_configured_says_what_to_do(tmp_path):
    s = load_settings({"VTP_DATA_DIR": str(tmp_path), "VTP_REGION": "cn"})
    with pytest.raises(SettingsError, match="vtp stack up --region cn"):
        s.bootstrap()


def test_every_setting_is_documented_once_and_reaches_a_child_process_whole():
    documented = documented_settings()
    names = [d.variable for d in documented]
    assert len(names) == len(set(names)) and all(d.doc and d.type for d in documented)
    assert "VTP_KAFKA_BOOTSTRAP" in names and "VTP_REGION" in names
    custom = Settings(region="eu", max_clock_skew_s=7.5, kafka_extra={"a": "b"}, trip_gap_s=9.0)
    assert load_settings(as_environment(custom)) == custom


def test_the_readme_table_is_the_declaration():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert settings_table() in readme, "README out of date: paste `vtp config --markdown`"


def test_secrets_are_masked_wherever_settings_are_shown():
    s = Settings(
        warehouse="https://vtp:hunter2@clickhouse.cn.internal:8443",
        kafka_extra={
            "sasl.password": "hunter3",
            "ssl.key.pem": "-----BEGIN",
            "sasl.jaas.config": 'org.apache...PlainLoginModule password="hunter4";',
            "sasl.oauthbearer.config": "clientId=vtp clientSecret=hunter5",
            "a.key.librdkafka.adds.next.year": "hunter6",
            "security.protocol": "SASL_SSL",
        },
    )
    for shown in (repr(s), s.shown("warehouse"), s.shown("kafka_extra")):
        assert "hunter" not in shown and "BEGIN" not in shown
    assert "vtp:***@clickhouse.cn.internal" in repr(
        s
    ) and '"security.protocol": "SASL_SSL"' in repr(s)
    secret = {d.variable for d in documented_settings() if d.secret}
    assert secret == {"VTP_WAREHOUSE", "VTP_KAFKA_EXTRA"}


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://u:p@ss@h:8123/db", "http://u:***@h:8123/db"),
        ("http://:s3cret@h/db", "http://:***@h/db"),
        ("https://h:8443/vtp_{region}", "https://h:8443/vtp_{region}"),
        ("chdb", "chdb"),
    ],
)
def test_a_warehouse_url_is_shown_without_its_password_however_written(url, shown):
    assert Settings(warehouse=url).shown("warehouse") == shown


def test_a_bad_warehouse_setting_is_refused_without_printing_its_password(tmp_path):
    from vtp.core.warehouse import WarehouseError, open_warehouse

    s = Settings(warehouse="clickhouse://u:s3cret@h:9000/vtp", region="eu", data_dir=tmp_path)
    with pytest.raises(WarehouseError, match=r"clickhouse://u:\*\*\*@h:9000/vtp") as refused:
        open_warehouse(s)
    assert "s3cret" not in str(refused.value)


def test_an_installed_vtp_keeps_its_state_outside_site_packages(tmp_path, monkeypatch):
    installed = tmp_path / "lib/python3.11/site-packages/vtp/core/settings.py"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert local_root("var", "XDG_DATA_HOME", ".local/share", installed) == tmp_path / "data/vtp"
    checkout = Path(__file__).resolve().parents[2]
    assert Settings().data_dir == checkout / "var" and Settings().cache_dir == checkout / ".cache"


def test_the_sasl_password_comes_from_a_file_and_never_shows(tmp_path):
    secret = tmp_path / "password"
    secret.write_text("s3cret-from-a-secret\n")
    extra = '{"security.protocol": "SASL_SSL", "sasl.username": "vtp-cn"}'
    settings = load_settings(
        {"VTP_KAFKA_EXTRA": extra, "VTP_KAFKA_SASL_PASSWORD_FILE": str(secret)}
    )
    assert settings.kafka_extra["sasl.password"] == "s3cret-from-a-secret"
    assert "s3cret" not in settings.shown("kafka_extra") + repr(settings)
    assert load_settings(as_environment(settings)) == settings  # a child process reads it again
    assert settings.for_region("cn").kafka_extra == settings.kafka_extra


@pytest.mark.parametrize(
    ("content", "extra", "refusal"),
    [
        (None, "{}", "No such file"),
        ("", "{}", "is empty"),
        ("one", '{"sasl.password": "other"}', "keep one"),
    ],
)
def test_a_sasl_password_file_that_cannot_be_used_is_named(tmp_path, content, extra, refusal):
    secret = tmp_path / "password"
    if content is not None:
        secret.write_text(content)
    with pytest.raises(SettingsError, match=refusal):
        load_settings({"VTP_KAFKA_EXTRA": extra, "VTP_KAFKA_SASL_PASSWORD_FILE": str(secret)})


def test_a_warehouse_cluster_is_an_identifier_on_a_server_only():
    server = {"VTP_WAREHOUSE": "http://u:p@ch:8123/vtp_{region}"}
    assert (
        load_settings({**server, "VTP_WAREHOUSE_CLUSTER": "vtp_eu"}).warehouse_cluster == "vtp_eu"
    )
    assert load_settings(server).warehouse_cluster == ""  # one server, as before
    with pytest.raises(SettingsError, match=r"VTP_WAREHOUSE_CLUSTER.*not a ClickHouse identifier"):
        load_settings({**server, "VTP_WAREHOUSE_CLUSTER": "eu-1; DROP"})
    with pytest.raises(SettingsError, match=r"needs a ClickHouse server.*'chdb'"):
        load_settings({"VTP_WAREHOUSE_CLUSTER": "vtp_eu"})
