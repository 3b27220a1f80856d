-- publish.lua: end a rebuild: the index answers for its token, unless a later rebuild
-- replaced the token meanwhile.
--
-- KEYS[1]  {i:N}:gen         string "<database_id>:<generation>" the index is written for
-- KEYS[2]  {i:N}:ready       string set to the token: queries may use the index
-- KEYS[3]  {i:N}:rebuilding  string deleted: no rebuild is under way
--
-- ARGV (worker/mirror.py PublishArgs):
local token = ARGV[1]  -- the generation's "<database_id>:<generation>"
--
-- Reply:   1 when published, 0 when a later generation took the index meanwhile.
if redis.call("GET", KEYS[1]) ~= token then
  return 0
end
redis.call("SET", KEYS[2], token)
redis.call("DEL", KEYS[3])
return 1
