-- build.lua: build one user's precomputed set for one view: whole in one call when the
-- view merges few enough sets, else in slices, so that no single call holds Redis for
-- long, and never served half built or after an access change.
-- requires: views
--
-- KEYS[1]  {i:N}:uc:<user>  set   client ids the user may see
-- KEYS[2]  {i:N}:pv:<user>  hash  view -> last use; "b:<build>" while being built in slices
-- KEYS[3]  {i:N}:ts         set   "type:status" pairs present
-- KEYS[4]  {i:N}:p:<user>:<view>  the set being built
-- KEYS[5]  {i:N}:ready      string "<database_id>:<generation>" of a complete index
--
-- ARGV (worker/precompute.py BuildArgs):
local prefix = ARGV[1]    -- the installation's key prefix "{i:N}:" (worker/scripts/keys.lua)
local token = ARGV[2]     -- the caller's "<database_id>:<generation>"; every step checks KEYS[5]
local user = ARGV[3]      -- user id
local view = ARGV[4]      -- view id "<letter>:<types>:<statuses>" (worker/keys.py view_id)
local build = ARGV[5]     -- "b:<random>": names one build in slices
local step = ARGV[6]      -- "whole", "begin", "slice" or "end"
local first = ARGV[7]     -- "slice": first client (1-based, in sorted order)
local count = ARGV[8]     -- "slice": how many clients
local now = ARGV[9]       -- "whole" and "end": epoch seconds, the view's last use
local max_sets = ARGV[10] -- "whole": most sets merged in this one call
--
-- Reply:   "whole": the entries of the finished set, or -2 when the view merges more
--          than max_sets sets (nothing changed: build it in slices); "begin": the number
--          of the user's clients; "slice": the sets merged; "end": the entries of the
--          finished set; -1 when a build in slices was cancelled (an access change or an
--          eviction dropped the view meanwhile); -3 when the index does not mirror the
--          caller's database and generation.
--
-- From "begin" on the user is registered in vu:<view>, so every write to the user's
-- clients reaches the set while it grows; a write to a client of a later slice is copied
-- again by that slice (ZADD is idempotent), a delete removes the member from the set and
-- from the client's set alike.  Any access change drops the view (access.lua), which
-- cancels the build: the client list cannot change under it.
local letter = string.sub(view, 1, 1)
local lo, hi = "[" .. letter, "(" .. string.char(string.byte(letter) + 1)

if redis.call("GET", KEYS[5]) ~= token then
  return -3
end

-- The (type, status) pairs of the view present in the installation.
local function view_pairs()
  local found = {}
  for _, pair in ipairs(redis.call("SMEMBERS", KEYS[3])) do
    local t, s = string.match(pair, "^(.-):(.*)$")
    if view_matches(view, t, s) then found[#found + 1] = pair end
  end
  return found
end

-- Copy the members of the view's letter from the sets of clients[from..to] into the
-- set, a few hundred per ZADD; returns the sets read.
local function copy_sets(sets)
  local batch = {}
  local function flush()
    if #batch > 0 then
      redis.call("ZADD", KEYS[4], unpack(batch))
      batch = {}
    end
  end
  for _, key in ipairs(sets) do
    for _, m in ipairs(redis.call("ZRANGEBYLEX", key, lo, hi)) do
      batch[#batch + 1] = 0
      batch[#batch + 1] = m
      if #batch >= 1000 then flush() end
    end
  end
  flush()
  return #sets
end

local function copy(clients, pairs_, from, to)
  local sets = {}
  for i = from, to do
    for _, pair in ipairs(pairs_) do sets[#sets + 1] = K.client_set(prefix, clients[i], pair) end
  end
  return copy_sets(sets)
end

-- The emails the user sees without seeing their client (x:<user>:<pair>, views.lua).
local function copy_extra(pairs_)
  local sets = {}
  for _, pair in ipairs(pairs_) do sets[#sets + 1] = K.extra_set(prefix, user, pair) end
  return copy_sets(sets)
end

local function register(last_use)
  redis.call("HSET", KEYS[2], view, last_use)
  redis.call("SADD", K.view_users(prefix, view), user)
  redis.call("SADD", K.views(prefix), view)
end

if step == "whole" then
  local clients, pairs_ = redis.call("SMEMBERS", KEYS[1]), view_pairs()
  if (#clients + 1) * #pairs_ > tonumber(max_sets) then
    return -2
  end
  redis.call("DEL", KEYS[4], K.view_head(prefix, user, view))
  copy(clients, pairs_, 1, #clients)
  copy_extra(pairs_)
  -- Registered with the writers (apply.lua, delete.lua) in this same step: from now on
  -- every write to the user's clients reaches this set.
  register(now)
  return redis.call("ZCARD", KEYS[4])
end

if step == "begin" then
  redis.call("DEL", KEYS[4], K.view_head(prefix, user, view))
  register(build)
  -- The user's extra sets now; from here on their writers (views.lua) reach the set too.
  copy_extra(view_pairs())
  return redis.call("SCARD", KEYS[1])
end

if redis.call("HGET", KEYS[2], view) ~= build then
  return -1
end

if step == "end" then
  redis.call("HSET", KEYS[2], view, now)
  return redis.call("ZCARD", KEYS[4])
end

local clients = redis.call("SMEMBERS", KEYS[1])
table.sort(clients, function(a, b) return tonumber(a) < tonumber(b) end)
return copy(clients, view_pairs(), tonumber(first), math.min(tonumber(first) + tonumber(count) - 1, #clients))
