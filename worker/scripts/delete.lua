-- delete.lua: remove meetings of one installation from the index, all or nothing.
-- requires: views
--
-- KEYS[1]  {i:N}:m   hash  7-byte id -> "client type status meeting_s updated_s updated_us|json"
-- KEYS[2]  {i:N}:gen string "<database_id>:<generation>" the index is written for
--
-- ARGV (worker/redis_index.py DeleteArgs):
local prefix = ARGV[1]  -- the installation's key prefix "{i:N}:" (derived keys as in apply.lua)
local token = ARGV[2]   -- the caller's "<database_id>:<generation>": nothing is removed unless KEYS[2] holds it
-- ARGV[3..] (rest)     7-byte meeting ids
--
-- Reply:   {removed, fanned_out}: meetings removed, precomputed-set entries removed;
--          {-1, 0} when the index is not written for the caller's token.
if redis.call("GET", KEYS[2]) ~= token then
  return {-1, 0}
end
local removed, fanned = 0, 0
for i = 3, #ARGV do
  local id = ARGV[i]
  local old = redis.call("HGET", KEYS[1], id)
  if old then
    local oc, ot, os, oms, ous, _, oreach = parse_head(old)
    touch(oc, oreach)
    local gone = members_of(id, oms, ous)
    redis.call("ZREM", K.client_set(prefix, oc, ot .. ":" .. os), gone.d, gone.u)
    fanned = fanned + fan_out(prefix, oc, ot, os, gone, "rem")
    fanned = fanned + reach_write(prefix, id, oc, ot, os, gone, oreach, "rem")
    redis.call("HDEL", KEYS[1], id)
    removed = removed + 1
  end
end
stamp_touched(prefix)
return {removed, fanned}
