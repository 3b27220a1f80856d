-- publish.lua: end a rebuild: the index answers for its token, unless a later rebuild
-- replaced the token meanwhile.
--
-- KEYS[1]  {i:N}:gen         string "<database_id>:<generation>" the index is written for
-- KEYS[2]  {i:N}:ready       string set to the token: queries may use the index
-- KEYS[3]  {i:N}:rebuilding  string deleted: no rebuild is under way
-- ARGV[1]  token of the finished rebuild
-- Reply:   1 when published, 0 when the rebuild was superseded.
if redis.call("GET", KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call("SET", KEYS[2], ARGV[1])
redis.call("DEL", KEYS[3])
return 1
