-- answer_cache.lua: a user's cached answer (a report, a page of threads), if nothing it
-- could include changed since it was computed; and (when a user asks for a report) a note
-- of the request, so that the beat keeps recently asked reports computed.
--
-- KEYS[1]  {i:N}:ready           string "<database_id>:<generation>" of a complete index
-- KEYS[2]  {i:N}:dv              counter: the installation's data version (the stamps' source)
-- KEYS[3]  {i:N}:rr:<user>:<d>   hash  t -> "<token>|s<data version>", b -> answer JSON
-- KEYS[4]  {i:N}:rq              hash  "<user>:<d>" -> request JSON (see worker/keys.py)
-- KEYS[5]  {i:N}:uc:<user>       set   client ids the user may see
-- KEYS[6]  {i:N}:cs              hash  client -> stamp of the last write it could see
-- KEYS[7]  {i:N}:us              hash  user -> stamp of the last write to its mailbox or access
--
-- ARGV (worker/answer_cache.py AnswerCacheArgs):
local token = ARGV[1]         -- the caller's "<database_id>:<generation>"
local user = ARGV[2]          -- user id
local field = ARGV[3]         -- the request's field in KEYS[4], "<user>:<d>"
local request = ARGV[4]       -- the request JSON "[now, name, params]"
local max_requests = ARGV[5]  -- how many requests KEYS[4] may hold: a new one beyond that is not noted
local mode = ARGV[6]          -- "ask": a user asks for a report (note the request, return the copy);
                              -- "read": a user asks for another answer (note nothing, return the copy);
                              -- "check": the beat checks (note nothing, return no copy)
--
-- Reply:   {1, answer JSON ("" when checking), seconds the copy still lives, tag}: the copy
--          is current; {2, tag}: it is not (or there is none): compute it and store it
--          under the tag, read before computing, so that a write landing meanwhile makes the
--          stored copy stale at once; {0}: the index does not mirror the database for this
--          token, do not cache.
--
-- A copy stamped s is current when no client the user may see, and not the user, has a
-- stamp above s: every write stamps what it touched with the next data version
-- (views.lua stamp_touched), and a revocation stamps the user before the database commits.
if mode == "ask" and (redis.call("HEXISTS", KEYS[4], field) == 1 or
                      redis.call("HLEN", KEYS[4]) < tonumber(max_requests)) then
  redis.call("HSET", KEYS[4], field, request)
end
if redis.call("GET", KEYS[1]) ~= token then
  return {0}
end
local tag = token .. "|s" .. (redis.call("GET", KEYS[2]) or "0")
local stored_token, stored = string.match(redis.call("HGET", KEYS[3], "t") or "", "^(.*)|s(%d+)$")
if stored_token ~= token then
  return {2, tag}
end
stored = tonumber(stored)
if tonumber(redis.call("HGET", KEYS[7], user) or "0") > stored then
  return {2, tag}
end
local clients = redis.call("SMEMBERS", KEYS[5])
for first = 1, #clients, 1000 do
  local part = {}
  for i = first, math.min(first + 999, #clients) do part[#part + 1] = clients[i] end
  for _, value in ipairs(redis.call("HMGET", KEYS[6], unpack(part))) do
    if value and tonumber(value) > stored then
      return {2, tag}
    end
  end
end
local body = ""
if mode ~= "check" then
  body = redis.call("HGET", KEYS[3], "b")
  if not body then return {2, tag} end
end
return {1, body, redis.call("TTL", KEYS[3]), tag}
