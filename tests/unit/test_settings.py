import pytest

from vtp.settings import SettingsError, documented_variables, load_settings


def test_defaults_run_locally():
    s = load_settings({})
    assert s.regions == ("cn", "eu")
    assert s.warehouse == "chdb"
    assert s.topics.validated("cn") == "vtp.validated.cn"
    assert s.warehouse_path("eu").parts[-2:] == ("warehouse", "eu")


def test_environment_overrides():
    s = load_settings(
        {"VTP_REGIONS": "CN, EU ,us", "VTP_SINK_BATCH_MESSAGES": "10", "VTP_TOPIC_PREFIX": "x",
         "VTP_KAFKA_EXTRA": '{"security.protocol": "SSL"}', "VTP_KAFKA_BOOTSTRAP": "h:1"}
    )  # fmt: skip
    assert s.regions == ("cn", "eu", "us")
    assert s.sink_batch_messages == 10
    assert s.topics.uploads == "x.uploads"
    assert s.kafka_extra == {"security.protocol": "SSL"}
    assert s.bootstrap() == "h:1"


@pytest.mark.parametrize(
    "env, fragment",
    [
        ({"VTP_SINK_BATCH_MESSAGES": "many"}, "not a whole number"),
        ({"VTP_SINK_BATCH_MESSAGES": "0"}, "at least 1"),
        ({"VTP_MAX_CLOCK_SKEW_S": "soon"}, "not a number"),
        ({"VTP_KAFKA_EXTRA": "[1]"}, "JSON object"),
        ({"VTP_KAFKA_EXTRA": "{"}, "JSON object"),
        ({"VTP_REGIONS": " , "}, "no region"),
    ],
)
def test_bad_values_are_named(env, fragment):
    with pytest.raises(SettingsError, match=fragment):
        load_settings(env)


def test_no_broker_configured_says_what_to_do(tmp_path):
    s = load_settings({"VTP_DATA_DIR": str(tmp_path)})
    with pytest.raises(SettingsError, match="vtp stack up"):
        s.bootstrap()


def test_every_variable_is_documented():
    names = [n for n, _ in documented_variables()]
    assert "VTP_KAFKA_BOOTSTRAP" in names and "VTP_WAREHOUSE" in names
