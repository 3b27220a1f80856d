-- head.lua: the warm path of query.lua alone — the first page of a user's complete
-- precomputed set, as its cached head (page.lua head_of) — with none of the rest.
--
-- It answers only what query.lua's from_view would answer the same way at this instant:
-- the index mirrors the caller's token, the view is complete (not missing, not being
-- built in slices) and its head is cached.  Anything else is a miss, counted nowhere:
-- the caller then runs query.lua, which answers and counts it.  Heads are deleted by
-- every write that touches their set (views.lua, access.lua, build.lua), so a cached
-- head is the set's current first page.
--
-- standalone: it uses nothing of common.lua or keys.lua (its keys come from the caller).
--
-- KEYS[1]  {i:N}:ready              string "<database_id>:<generation>" of a complete index
-- KEYS[2]  {i:N}:pv:<user>          hash  view -> last use
-- KEYS[3]  {i:N}:ph:<user>:<view>   hash  "d"/"a" -> the view's cached head
-- KEYS[4]  {i:N}:stats              hash  hit / miss counters of the precomputed sets
-- KEYS[5]  {i:N}:active             zset  user -> last query time
--
-- ARGV (worker/query.py HeadArgs):
local token = ARGV[1]  -- the caller's "<database_id>:<generation>": answer only when KEYS[1] holds it
local user = ARGV[2]   -- user id
local view = ARGV[3]   -- the view id
local side = ARGV[4]   -- "d" (descending) or "a" (ascending)
local now = ARGV[5]    -- epoch seconds
--
-- Reply:   the head (a string), or 0: a miss, for query.lua to answer.
if redis.call("GET", KEYS[1]) ~= token then return 0 end
local used = redis.call("HGET", KEYS[2], view)
if not used or string.sub(used, 1, 2) == "b:" then return 0 end
local blob = redis.call("HGET", KEYS[3], side)
if not blob then return 0 end
-- As query.lua: last use and activity are kept to the minute.
if tonumber(now) - tonumber(used) >= 60 then
  redis.call("HSET", KEYS[2], view, now)
  redis.call("ZADD", KEYS[5], now, user)
end
redis.call("HINCRBY", KEYS[4], "hit", 1)
return blob
