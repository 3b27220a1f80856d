-- wipe.lua: remove a batch of an installation's keys at the start of a rebuild, unless a
-- later rebuild replaced the rebuild's token meanwhile (then that rebuild owns the keys,
-- and may have written some of them already).
--
-- KEYS[1]   {i:N}:gen   string "<database_id>:<generation>" the index is written for
-- KEYS[2..] keys of the same installation to remove
--
-- ARGV (worker/mirror.py WipeArgs):
local token = ARGV[1]  -- the generation's "<database_id>:<generation>"
--
-- Reply:    1 when removed, 0 when a later generation took the index (nothing removed).
if redis.call("GET", KEYS[1]) ~= token then
  return 0
end
if #KEYS > 1 then
  redis.call("UNLINK", unpack(KEYS, 2))
end
return 1
