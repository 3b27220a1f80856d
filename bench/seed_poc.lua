-- The seed's proof of concept (shared/seeds/002), faithfully, on its own key layout.
-- Fixed: its temporary sets are deleted before it returns (the seed let them pile up).
-- Added so that it answers the benchmark's query: DESC (newest first).
--
-- KEYS[1]  user id
-- KEYS[2]  sort field (a field of the meeting:<id> hashes)
-- KEYS[3]  offset, KEYS[4] count
-- ARGV     the filter sets to intersect (meeting_type:email_ins_1, meeting_status:open_ins_1)
-- Reply:   the details of the page, joined as the seed joins them
local user_id = KEYS[1]
local sort_by = KEYS[2]
local start_limit = KEYS[3]
local end_limit = KEYS[4]

redis.call("sinterstore", "sampleset1" .. user_id, unpack(ARGV))
local mfs = redis.call("sinter", unpack(ARGV))
local clients_for_user_set_name = 'clients_for_user:' .. user_id
redis.call("smembers", clients_for_user_set_name)

for _, key in ipairs(mfs) do
  local obtained_client_ids = redis.call("HGET", 'meeting:' .. key, "clientid")
  local val = redis.call("sismember", clients_for_user_set_name, obtained_client_ids)
  if val == 1 then
    redis.call("sadd", "sampleset2" .. user_id, 'meeting:' .. key)
  end
end

redis.call("smembers", "sampleset2" .. user_id)
local sorted_content = redis.call("sort", "sampleset2" .. user_id, "by", '*->' .. sort_by,
                                  "limit", start_limit, end_limit, "desc")
local allString = ""
for _, value in ipairs(sorted_content) do
  local details_str = redis.call("HGET", value, "details")
  allString = allString .. ', ' .. tostring(details_str)
end
redis.call("del", "sampleset1" .. user_id, "sampleset2" .. user_id)
return allString
