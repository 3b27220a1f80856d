"""The key templates of worker/keys.py and those the Lua scripts derive agree."""
import pytest

from tests.helpers import record
from worker import keys
from worker.access import change
from worker.ingest import ingest


def test_scripts_write_the_keys_python_names(clean):
    ctx = clean
    r = ctx.redis
    change(ctx, 7, 3, [11], "set")
    ingest(ctx, [record(installation_id=7, client_id=11, type="sms", status="closed")])
    r.zadd(keys.active_users(7), {"3": 1})
    expected = {keys.client_set(7, 11, "sms", "closed"), keys.payloads(7), keys.pairs(7), keys.user_clients(7, 3),
                keys.client_users(7, 11), keys.access_versions(7), keys.ready(7), keys.active_users(7),
                keys.generation(7), keys.writes(7), keys.data_version(7), keys.client_stamps(7),
                keys.user_stamps(7)}
    assert {k.decode() for k in r.keys("*")} - {keys.INSTALLATIONS, keys.DATABASE, keys.METRICS} == expected
    from tests.helpers import query
    query(ctx, installation_id=7, user_id=3)  # fills the d:*:* view
    assert r.exists(keys.view_set(7, 3, "d:*:*")) and r.hexists(keys.user_views(7, 3), "d:*:*")
    assert r.sismember(keys.view_users(7, "d:*:*"), 3) and r.sismember(keys.views(7), "d:*:*")


def test_every_key_of_an_installation_shares_its_hash_tag():
    for key in (keys.client_set(5, 1, "a", "b"), keys.payloads(5), keys.user_clients(5, 2), keys.view_set(5, 2, "d:*:*"),
                keys.ready(5), keys.scratch(5), keys.stats(5), keys.active_users(5), keys.access_versions(5),
                keys.generation(5), keys.writes(5), keys.data_version(5), keys.answer_cache(5, 2, "ab"),
                keys.client_stamps(5), keys.user_stamps(5)):
        assert key.startswith("{i:5}:")


def test_members_order_by_value_then_id():
    a = keys.member(b"d", 100, 2**52)
    b = keys.member(b"d", 101, 1)
    c = keys.member(b"d", 101, 2)
    assert a < b < c
    assert keys.member_id(c) == 2 and keys.member_seconds(c) == 101 and len(c) == 12
    assert keys.view_id("meeting_date", ["sms", "email", "sms"], None) == "d:email,sms:*"


def test_python_and_lua_key_templates_agree(redis_client):
    """worker/keys.py and worker/scripts/keys.lua make the same keys."""
    from worker.redis_index import _read
    lua = _read("keys") + """
local p = ARGV[1]
return {K.client_set(p, 11, "sms:closed"), K.client_users(p, 11), K.view_set(p, 3, "d:email:open"),
        K.view_head(p, 3, "d:email:open"), K.view_users(p, "d:email:open"), K.views(p)}
"""
    got = [k.decode() for k in redis_client.eval(lua, 0, keys.prefix(7))]
    assert got == [keys.client_set(7, 11, "sms", "closed"), keys.client_users(7, 11),
                   keys.view_set(7, 3, "d:email:open"), keys.view_head(7, 3, "d:email:open"),
                   keys.view_users(7, "d:email:open"), keys.views(7)]


def test_no_script_spells_a_key_template_itself():
    """Key templates live in keys.lua only; the scripts call them."""
    import glob
    import os
    import re
    scripts = os.path.join(os.path.dirname(keys.__file__), "scripts")
    for path in glob.glob(os.path.join(scripts, "*.lua")):
        if path.endswith("keys.lua"):
            continue
        with open(path) as f:
            text = f.read()
        assert not re.search(r'prefix \.\. "[a-z]+:?"', text), path


SCRIPT_ARGS = {"query": "worker.query:QueryArgs", "head": "worker.query:HeadArgs", "build": "worker.precompute:BuildArgs",
               "apply": "worker.redis_index:ApplyArgs", "delete": "worker.redis_index:DeleteArgs",
               "access": "worker.redis_index:AccessArgs", "answer_cache": "worker.answer_cache:AnswerCacheArgs",
               "publish": "worker.mirror:PublishArgs", "wipe": "worker.mirror:WipeArgs"}


def test_every_script_has_a_typed_argument_builder():
    from worker.redis_index import NAMES
    assert set(SCRIPT_ARGS) == set(NAMES)


@pytest.mark.parametrize("script", sorted(SCRIPT_ARGS))
def test_each_scripts_arguments_are_named_as_python_builds_them(script):
    """The script copies ARGV into named locals at its top; the Python structure that
    builds ARGV has the same names in the same order, and a variable tail (``rest``) is
    documented as ``ARGV[n..]`` right after them."""
    import dataclasses
    import importlib
    import re

    from worker.redis_index import ScriptArgs, _read
    module, name = SCRIPT_ARGS[script].split(":")
    builder = getattr(importlib.import_module(module), name)
    assert issubclass(builder, ScriptArgs)
    fields = [f.name for f in dataclasses.fields(builder)]
    text = _read(script)
    named = re.findall(r"^local (\w+) = ARGV\[(\d+)\]", text, re.M)
    fixed = [f for f in fields if f != "rest"]
    assert [n for n, _ in named] == fixed
    assert [int(i) for _, i in named] == list(range(1, len(fixed) + 1))
    tail = re.search(r"^-- ARGV\[(\d+)\.\.\] \(rest\)", text, re.M)
    assert ("rest" in fields) == (tail is not None)
    if tail:
        assert int(tail.group(1)) == len(fixed) + 1 and fields[-1] == "rest"
    assert re.search(r"^-- ARGV \(worker/[\w/]+\.py " + name + r"\):", text, re.M)


def test_no_script_is_longer_than_two_hundred_lines():
    import glob
    import os
    for path in glob.glob(os.path.join(os.path.dirname(keys.__file__), "scripts", "*.lua")):
        with open(path) as f:
            assert len(f.read().splitlines()) <= 200, path


def test_python_knows_the_head_size_the_scripts_cache():
    """query.py sends a first page to head.lua only when the cached head can hold it."""
    import re

    from worker.query import HEAD
    from worker.redis_index import _read
    assert re.search(r"^local HEAD = (\d+)$", _read("page"), re.M).group(1) == str(HEAD)
