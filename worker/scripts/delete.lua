-- delete.lua: remove meetings of one installation from the index, all or nothing.
--
-- KEYS[1]  {i:N}:m   hash  7-byte id -> "client type status meeting_s updated_s updated_us|json"
-- ARGV[1]  the installation's key prefix "{i:N}:" (derived keys as in apply.lua)
-- ARGV[2..] 7-byte meeting ids
-- Reply:   {removed, fanned_out}: meetings removed, precomputed-set entries removed.
local prefix = ARGV[1]
local removed, fanned = 0, 0
for i = 2, #ARGV do
  local id = ARGV[i]
  local old = redis.call("HGET", KEYS[1], id)
  if old then
    local oc, ot, os, oms, ous = parse_head(old)
    local gone = members_of(id, oms, ous)
    redis.call("ZREM", prefix .. "z:" .. oc .. ":" .. ot .. ":" .. os, gone.d, gone.u)
    fanned = fanned + fan_out(prefix, oc, ot, os, gone, "rem")
    redis.call("HDEL", KEYS[1], id)
    removed = removed + 1
  end
end
return {removed, fanned}
