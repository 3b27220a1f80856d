-- build.lua: build one user's precomputed set in slices, so that no single call holds
-- Redis for long, and without ever serving it half built or after an access change.
-- requires: views
--
-- KEYS[1]  {i:N}:uc:<user>  set   client ids the user may see
-- KEYS[2]  {i:N}:pv:<user>  hash  view -> last use; "b:<token>" while being built
-- KEYS[3]  {i:N}:ts         set   "type:status" pairs present
-- KEYS[4]  {i:N}:p:<user>:<view>  the set being built
-- KEYS[5]  {i:N}:ready      string "<database_id>:<generation>" of a complete index
-- ARGV[1]  key prefix "{i:N}:" (derives z:<client>:<type>:<status>, vu:<view>, views,
--          ph:<user>:<view>)
-- ARGV[2]  user id
-- ARGV[3]  view id, "<letter>:<types>:<statuses>" (see worker/keys.py)
-- ARGV[4]  build token
-- ARGV[5]  step: "begin", "slice" or "end"
-- ARGV[6], ARGV[7]  for "slice": first client (1-based, in sorted order) and how many
-- ARGV[8]  for "end": now, epoch seconds
-- ARGV[9]  token: the caller's "<database_id>:<generation>"; every step checks KEYS[5]
-- Reply:   "begin": the number of the user's clients; "slice": the sets merged;
--          "end": the entries in the finished set; -1 when the build was cancelled (an
--          access change or an eviction dropped the view meanwhile, or the index stopped
--          mirroring the caller's database).
--
-- From "begin" on the user is registered in vu:<view>, so every write to the user's
-- clients reaches the set while it grows; a write to a client of a later slice is merged
-- again by that slice (ZUNIONSTORE is idempotent), a delete removes the member from the
-- set and from the client's set alike.  Any access change drops the view (access.lua),
-- which cancels the build: the client list cannot change under it.
local prefix, user, view, token, step = ARGV[1], ARGV[2], ARGV[3], "b:" .. ARGV[4], ARGV[5]
local letter = string.sub(view, 1, 1)

if redis.call("GET", KEYS[5]) ~= ARGV[9] then
  return -1
end

if step == "begin" then
  redis.call("DEL", KEYS[4], prefix .. "ph:" .. user .. ":" .. view)
  redis.call("HSET", KEYS[2], view, token)
  redis.call("SADD", prefix .. "vu:" .. view, user)
  redis.call("SADD", prefix .. "views", view)
  return redis.call("SCARD", KEYS[1])
end

if redis.call("HGET", KEYS[2], view) ~= token then
  return -1
end

if step == "end" then
  redis.call("HSET", KEYS[2], view, ARGV[8])
  return redis.call("ZCARD", KEYS[4])
end

local pairs_ = {}
for _, pair in ipairs(redis.call("SMEMBERS", KEYS[3])) do
  local t, s = string.match(pair, "^(.-):(.*)$")
  if view_matches(view, t, s) then pairs_[#pairs_ + 1] = pair end
end
local clients = redis.call("SMEMBERS", KEYS[1])
table.sort(clients, function(a, b) return tonumber(a) < tonumber(b) end)
local first, count = tonumber(ARGV[6]), tonumber(ARGV[7])
-- Copy this slice's members of the view's letter straight into the set, a few hundred
-- per ZADD (a ZUNIONSTORE with the set itself as an input would copy it whole each time).
local lo, hi = "[" .. letter, "(" .. string.char(string.byte(letter) + 1)
local batch, merged = {}, 0
local function flush()
  if #batch > 0 then
    redis.call("ZADD", KEYS[4], unpack(batch))
    batch = {}
  end
end
for i = first, math.min(first + count - 1, #clients) do
  for _, pair in ipairs(pairs_) do
    local members = redis.call("ZRANGEBYLEX", prefix .. "z:" .. clients[i] .. ":" .. pair, lo, hi)
    for _, m in ipairs(members) do
      batch[#batch + 1] = 0
      batch[#batch + 1] = m
      if #batch >= 1000 then flush() end
    end
    merged = merged + 1
  end
end
flush()
return merged
