"""Every field rule of a meeting record."""
import pytest

from tests.helpers import record
from worker.errors import InvalidArgument
from worker.records import ID_SPACE, item_json, meeting_id, validate

BAD = [
    ("installation_id", 0), ("installation_id", -1), ("installation_id", "1"), ("installation_id", 1.0),
    ("installation_id", True), ("installation_id", None), ("installation_id", ID_SPACE + 1),
    ("source_id", ""), ("source_id", "x" * 256), ("source_id", 5), ("source_id", None), ("source_id", "a\x00b"),
    ("source_id", "\ud800"),
    ("client_id", 0), ("client_id", "7"), ("client_id", False), ("client_id", 2.5),
    ("type", "Email"), ("type", "1email"), ("type", "e" * 33), ("type", ""), ("type", "e-mail"), ("type", 3),
    ("type", "email\n"),
    ("status", "OPEN"), ("status", "open status"), ("status", None),
    ("meeting_date", "2024-01-01T10:00:00"), ("meeting_date", "2024-01-01"), ("meeting_date", "yesterday"),
    ("meeting_date", 1704103200), ("meeting_date", "1969-12-31T23:59:59Z"), ("meeting_date", "2200-01-01T00:00:00Z"),
    ("subject", "s" * 999), ("subject", 12),
    ("details", "text"), ("details", [1, 2]), ("details", {"big": "x" * (64 * 1024)}),
    ("details", {"nan": float("nan")}),
    ("updated_at", "2024-01-01 10:00"), ("updated_at", 5),
]


@pytest.mark.parametrize("field,value", BAD)
def test_each_bad_value_is_rejected_naming_its_field(field, value):
    with pytest.raises(InvalidArgument) as info:
        validate(record(**{field: value}))
    assert info.value.field == field or info.value.field == "record"
    assert str(info.value).startswith(field)


@pytest.mark.parametrize("field", ["installation_id", "source_id", "client_id", "type", "status", "meeting_date"])
def test_required_fields(field):
    rec = record()
    del rec[field]
    with pytest.raises(InvalidArgument, match=f"^{field}: is required"):
        validate(rec)


def test_unknown_field_and_non_object():
    with pytest.raises(InvalidArgument, match="^colour: is not a meeting field"):
        validate(record(colour="red"))
    with pytest.raises(InvalidArgument, match="^record: must be a JSON object"):
        validate(["not", "a", "dict"])


def test_good_values_at_the_limits():
    m = validate(record(source_id="x" * 255, subject="s" * 998, type="a" + "b" * 31,
                        meeting_date="2024-03-01T12:00:00.750+02:00", updated_at="2024-03-01T10:00:00.000001Z",
                        details={"k": "é" * 100}))
    assert m.meeting_s == 1709287200  # 10:00:00Z, the fraction dropped: one-second resolution
    assert m.updated_us == 1709287200_000001
    assert m.type == "a" + "b" * 31


def test_ids_are_stable_spread_and_exact_in_javascript():
    a = meeting_id(1, "m1")
    assert a == meeting_id(1, "m1")
    assert a != meeting_id(2, "m1") and a != meeting_id(1, "m2") and a != meeting_id(1, "m1", salt=1)
    ids = [meeting_id(1, f"m{n}") for n in range(2000)]
    assert all(0 < i <= 2**53 - 1 for i in ids)
    assert len(set(ids)) == 2000
    # Spread: no region of the key space gets most of the ids (no TiDB hotspot).
    buckets = [0] * 8
    for i in ids:
        buckets[i * 8 // 2**53] += 1
    assert max(buckets) < 2000 / 8 * 1.5


def test_item_json_is_the_contract_item():
    import json
    from worker.ingest import StoredRow
    row = StoredRow(12, 1, 'q"uote', 7, "email", "open", 1704103200, 1704103201, 1704103201_500000, None, '{"a":1}')
    assert json.loads(item_json(row)) == {
        "id": 12, "source_id": 'q"uote', "client_id": 7, "type": "email", "status": "open",
        "meeting_date": "2024-01-01T10:00:00Z", "updated_at": "2024-01-01T10:00:01.500000Z",
        "subject": None, "details": {"a": 1}}
