-- access.lua: change the clients one user may see, and drop the user's precomputed sets.
--
-- KEYS[1]  {i:N}:uc:<user>  set   client ids the user may see
-- KEYS[2]  {i:N}:av         hash  user -> access version now in Redis
-- KEYS[3]  {i:N}:pv:<user>  hash  view -> last use of the user's precomputed sets
-- ARGV[1]  the installation's key prefix "{i:N}:" (derives cu:<client>, p:<user>:<view>,
--          ph:<user>:<view>, vu:<view>)
-- ARGV[2]  user id
-- ARGV[3]  mode: "remove" takes the listed clients away now (before the database commits,
--          so a revocation is never late); "set" makes the listed clients the whole list,
--          unless Redis already holds this or a newer version
-- ARGV[4]  access version (for "set"; ignored by "remove")
-- ARGV[5..] client ids
-- Reply:   1 when the list was written, 0 when a newer version was already there.
local prefix, user, mode = ARGV[1], ARGV[2], ARGV[3]

local function drop_views()
  local views = redis.call("HKEYS", KEYS[3])
  for _, view in ipairs(views) do
    redis.call("DEL", prefix .. "p:" .. user .. ":" .. view, prefix .. "ph:" .. user .. ":" .. view)
    redis.call("SREM", prefix .. "vu:" .. view, user)
  end
  redis.call("DEL", KEYS[3])
end

if mode == "remove" then
  for i = 5, #ARGV do
    redis.call("SREM", KEYS[1], ARGV[i])
    redis.call("SREM", prefix .. "cu:" .. ARGV[i], user)
  end
  drop_views()
  return 1
end

local stored = redis.call("HGET", KEYS[2], user)
if stored and tonumber(stored) >= tonumber(ARGV[4]) then
  return 0
end
local wanted = {}
for i = 5, #ARGV do wanted[ARGV[i]] = true end
for _, client in ipairs(redis.call("SMEMBERS", KEYS[1])) do
  if not wanted[client] then
    redis.call("SREM", prefix .. "cu:" .. client, user)
  end
end
redis.call("DEL", KEYS[1])
for i = 5, #ARGV do
  redis.call("SADD", KEYS[1], ARGV[i])
  redis.call("SADD", prefix .. "cu:" .. ARGV[i], user)
end
redis.call("HSET", KEYS[2], user, ARGV[4])
drop_views()
return 1
