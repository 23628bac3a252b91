"""The separation scan must find what is planted, and nothing that merely looks alike."""

import json
import struct

from schemas import default_store
from vtp.scan import Identifiers, scan_bytes, scan_files

VIN, OWNER, LAT = "LRW3E7EK4NC000001", "owner-0007", 31.230416
IDS = Identifiers(frozenset({VIN, OWNER}), frozenset({LAT, 121.473701, 31.23}))


def test_strings_and_positions_are_found_as_text_as_doubles_and_in_records():
    assert scan_bytes(IDS, f"log line about {VIN}".encode()) == {VIN}
    assert scan_bytes(IDS, json.dumps({"lat": LAT}).encode()) == {f"position {LAT}"}
    assert scan_bytes(IDS, b"\x01\x02\x03" + struct.pack("<d", LAT) + b"\x00") == {
        f"position {LAT}"
    }
    store = default_store()
    upload = store.encode(
        {
            "vin": VIN,
            "upload_id": "u",
            "sent_at_ms": 1,
            "gateway_firmware": "f",
            "samples": [{"event_time_ms": 1, "seq": 1, "latitude": LAT}],
        },
        store.get("VehicleUpload", 1),
    )
    assert scan_bytes(IDS, upload) == {VIN, f"position {LAT}"}
    assert IDS.in_value({"a": [{"b": LAT}], "c": OWNER}) == {f"position {LAT}", OWNER}


def test_other_quantities_that_look_alike_are_not_positions():
    # a 32-bit state of charge of 31.23 reads back as 31.229999542236328: not a position
    soc = struct.unpack("<f", struct.pack("<f", 31.23))[0]
    assert IDS.in_value({"soc": soc}) == set()
    assert scan_bytes(IDS, struct.pack("<f", 31.23) * 4 + b"speed 31.23") == set()
    assert 31.23 not in IDS.positions  # fewer than four decimals: could be anything


def test_files_are_read_whole_and_counted(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "segment.log").write_bytes(b"\x00" * 100 + VIN.encode() + b"\x00" * 1000)
    (tmp_path / "clean.txt").write_text("nothing here")
    report = scan_files(tmp_path, IDS)
    assert report.read["files"] == 2
    assert [(h.place.endswith("segment.log"), h.identifier) for h in report.hits] == [(True, VIN)]
