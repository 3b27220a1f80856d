-- report_cache.lua: a user's cached report, if it is still what the database would say;
-- and a note that the user asked for it (the beat keeps recently asked reports computed).
--
-- KEYS[1]  {i:N}:ready           string "<database_id>:<generation>" of a complete index
-- KEYS[2]  {i:N}:dv              counter bumped by every write to the installation's index
-- KEYS[3]  {i:N}:rc:<user>:<d>   string "<token>|<data version>\n<report JSON>"
-- KEYS[4]  {i:N}:rq              hash "<user>:<d>" -> request JSON (see worker/keys.py)
--
-- ARGV (worker/reports.py ReportCacheArgs):
local token = ARGV[1]         -- the caller's "<database_id>:<generation>"
local field = ARGV[2]         -- the request's field in KEYS[4], "<user>:<d>"
local request = ARGV[3]       -- the request JSON "[now, name, params]"
local max_requests = ARGV[4]  -- how many requests KEYS[4] may hold: a new one beyond that is not noted
--
-- Reply:   {1, json} the cached report; {2, "<token>|<version>"}: not cached, compute it
--          and store it under that tag (read before computing, so that a write landing
--          meanwhile makes the stored copy stale at once); {0}: the index does not mirror
--          the database for this token, do not cache.
if redis.call("HEXISTS", KEYS[4], field) == 1 or redis.call("HLEN", KEYS[4]) < tonumber(max_requests) then
  redis.call("HSET", KEYS[4], field, request)
end
if redis.call("GET", KEYS[1]) ~= token then
  return {0}
end
local tag = token .. "|" .. (redis.call("GET", KEYS[2]) or "0")
local entry = redis.call("GET", KEYS[3])
if entry then
  local cut = string.find(entry, "\n", 1, true)
  if cut and string.sub(entry, 1, cut - 1) == tag then
    return {1, string.sub(entry, cut + 1)}
  end
end
return {2, tag}
