-- access.lua: change the clients one user may see, recompute the emails the user sees
-- without seeing their client (x:<user>:*, views.lua), and drop the user's precomputed sets.
-- requires: views
--
-- KEYS[1]  {i:N}:uc:<user>  set   client ids the user may see
-- KEYS[2]  {i:N}:av         hash  user -> access version now in Redis
-- KEYS[3]  {i:N}:pv:<user>  hash  view -> last use of the user's precomputed sets
-- KEYS[4]  {i:N}:gen        string "<database_id>:<generation>" the index is written for
-- KEYS[5]  {i:N}:w          list  ids of the last writes applied
--
-- ARGV (worker/redis_index.py AccessArgs):
local prefix = ARGV[1]    -- the installation's key prefix "{i:N}:" (derives cu:<client>, p:<user>:<view>,
                          -- ph:<user>:<view>, vu:<view>, x:<user>:<pair>, mb:<user>, sc:<client>, m, ts)
local token = ARGV[2]     -- the caller's "<database_id>:<generation>": nothing is written unless KEYS[4] holds it
local user = ARGV[3]      -- user id
local mode = ARGV[4]      -- "remove" takes the listed clients away now (under the user's row lock, before
                          -- the database commits, so a revocation is never late); "set" makes the listed
                          -- clients the whole list unless Redis already holds this or a newer version;
                          -- "force" makes them the whole list at this version whatever Redis holds (a
                          -- repair made under the user's row lock)
local version = ARGV[5]   -- access version (for "set" and "force")
local write_id = ARGV[6]  -- write id to remember in KEYS[5], or ""
-- ARGV[7..] (rest)       client ids
local FIRST_CLIENT = 7
--
-- Reply:   1 when the list was written, 0 when a newer version was already there, -1 when
--          the index is not written for the caller's token.

if redis.call("GET", KEYS[4]) ~= token then
  return -1
end

-- The user's cached answers are stale from this step on (answer_cache.lua).
touched_users[user] = true
local function drop_views()
  local views = redis.call("HKEYS", KEYS[3])
  for _, view in ipairs(views) do
    redis.call("DEL", K.view_set(prefix, user, view), K.view_head(prefix, user, view))
    redis.call("SREM", K.view_users(prefix, view), user)
  end
  redis.call("DEL", KEYS[3])
end

if mode == "remove" then
  for i = FIRST_CLIENT, #ARGV do
    redis.call("SREM", KEYS[1], ARGV[i])
    redis.call("SREM", K.client_users(prefix, ARGV[i]), user)
  end
  rebuild_extra(prefix, user, K.payloads(prefix))
  drop_views()
  stamp_touched(prefix)
  return 1
end

local stored = redis.call("HGET", KEYS[2], user)
if mode == "set" and stored and tonumber(stored) >= tonumber(version) then
  return 0
end
local wanted = {}
for i = FIRST_CLIENT, #ARGV do wanted[ARGV[i]] = true end
for _, client in ipairs(redis.call("SMEMBERS", KEYS[1])) do
  if not wanted[client] then
    redis.call("SREM", K.client_users(prefix, client), user)
  end
end
redis.call("DEL", KEYS[1])
for i = FIRST_CLIENT, #ARGV do
  redis.call("SADD", KEYS[1], ARGV[i])
  redis.call("SADD", K.client_users(prefix, ARGV[i]), user)
end
redis.call("HSET", KEYS[2], user, version)
rebuild_extra(prefix, user, K.payloads(prefix))
drop_views()
remember_write(KEYS[5], write_id)
stamp_touched(prefix)
return 1
