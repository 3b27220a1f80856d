-- apply.lua: write meetings of one installation into the index, all or nothing.
-- requires: views
--
-- KEYS[1]  {i:N}:m    hash  7-byte id -> "client type status meeting_s updated_s updated_us|json"
-- KEYS[2]  {i:N}:ts   set   "type:status" pairs present
-- KEYS[3]  {i:N}:gen  string "<database_id>:<generation>" the index is written for
-- KEYS[4]  {i:N}:w    list  ids of the last writes applied, newest first
--
-- ARGV (worker/redis_index.py ApplyArgs):
local prefix = ARGV[1]    -- the installation's key prefix "{i:N}:"; derives z:<client>:<type>:<status>,
                          -- cu:<client>, views, vu:<view>, p:<user>:<view>, ph:<user>:<view> (keys.lua)
local token = ARGV[2]     -- the caller's "<database_id>:<generation>": nothing is written unless KEYS[3] holds it
local write_id = ARGV[3]  -- write id to remember in KEYS[4], or ""
-- ARGV[4..] (rest)       for each meeting: 7-byte id, head "client type status meeting_s updated_s
--                        updated_us[ reach]", item JSON (reach: an email's "<secondary clients>/<mailbox
--                        users>", views.lua)
--
-- Reply:   {written, fanned_out}: meetings written (a meeting whose stored version is newer
--          or identical is left alone) and precomputed-set entries touched; {-1, 0} when
--          the index is not written for the caller's token.
if redis.call("GET", KEYS[3]) ~= token then
  return {-1, 0}
end
local written, fanned = 0, 0
local pairs_added = {}
for i = 4, #ARGV, 3 do
  local id, head, json = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local value = head .. "|" .. json
  local old = redis.call("HGET", KEYS[1], id)
  local client, typ, status, meeting_s, updated_s, updated_us, reach =
    parse_head(head)
  local skip = false
  if old then
    local oc, ot, os, oms, ous, ouus, oreach = parse_head(old)
    if old == value or tonumber(ouus) > tonumber(updated_us) then
      skip = true
    else
      touch(oc, oreach)
      local gone = members_of(id, oms, ous)
      redis.call("ZREM", K.client_set(prefix, oc, ot .. ":" .. os), gone.d, gone.u)
      fanned = fanned + fan_out(prefix, oc, ot, os, gone, "rem")
      fanned = fanned + reach_write(prefix, id, oc, ot, os, gone, oreach, "rem")
    end
  end
  if not skip then
    touch(client, reach)
    local new = members_of(id, meeting_s, updated_s)
    redis.call("ZADD", K.client_set(prefix, client, typ .. ":" .. status), 0, new.d, 0, new.u)
    redis.call("HSET", KEYS[1], id, value)
    local pair = typ .. ":" .. status
    if not pairs_added[pair] then
      redis.call("SADD", KEYS[2], pair)
      pairs_added[pair] = true
    end
    fanned = fanned + fan_out(prefix, client, typ, status, new, "add")
    fanned = fanned + reach_write(prefix, id, client, typ, status, new, reach, "add")
    written = written + 1
  end
end
remember_write(KEYS[4], write_id)
stamp_touched(prefix)
return {written, fanned}
