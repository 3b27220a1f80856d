-- query.lua: one secured page of one user's meetings, in one atomic step.
--
-- Client security comes first: the answer is built only from the sorted sets of the
-- clients in the user's access list (intersected with the caller's client filter), as
-- the list stands at this instant.  Sort fields are fixed letters; no key or field name
-- comes from the caller.
--
-- KEYS[1]  {i:N}:m          hash  7-byte id -> "head|item JSON"
-- KEYS[2]  {i:N}:uc:<user>  set   client ids the user may see
-- KEYS[3]  {i:N}:ready      string, present while the index mirrors the database
-- KEYS[4]  {i:N}:pv:<user>  hash  view -> last use
-- KEYS[5]  {i:N}:tmp        scratch sorted set, deleted before the script returns
-- KEYS[6]  {i:N}:ts         set   "type:status" pairs present
-- KEYS[7]  {i:N}:active     zset  user -> last query time
-- KEYS[8]  {i:N}:stats      hash  hit / miss / fill counters of the precomputed sets
-- ARGV[1]  key prefix "{i:N}:" (derives z:<client>:<type>:<status>, p:<user>:<view>,
--          vu:<view> and views)
-- ARGV[2]  user id
-- ARGV[3]  view id when this query's shape may use a precomputed set, else ""
-- ARGV[4]  "0": only read a precomputed set; "1": fill it when missing; "2": rebuild it
--          (a rebuild is not a query: it leaves the user's last-query time alone)
-- ARGV[5]  sort letter, "d" or "u"
-- ARGV[6]  "1" for descending order
-- ARGV[7], ARGV[8]    lex bounds (min, max) of the whole result: the total counts these
-- ARGV[9], ARGV[10]   lex bounds (min, max) of the page (narrowed by a cursor)
-- ARGV[11], ARGV[12]  offset, limit (limit 0: count only)
-- ARGV[13] now, epoch seconds
-- ARGV[14] types, comma separated, "" for any
-- ARGV[15] statuses, comma separated, "" for any
-- ARGV[16] client filter, comma separated, "" for none
-- ARGV[17], ARGV[18]  lex bounds (min, max) on meeting_date members when the sort is
--          updated_at and a date range is given, else "": matches are then collected from
--          the date range and re-keyed by their updated_at
-- Reply:   {source, total, member1, payload1, member2, payload2, ...};
--          source is "notready" (and nothing else) when the index cannot answer.
local prefix, user, view, fill, letter = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local desc = ARGV[6] == "1"
local cmin, cmax, pmin, pmax = ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local offset, limit, now = tonumber(ARGV[11]), tonumber(ARGV[12]), ARGV[13]

if redis.call("EXISTS", KEYS[3]) == 0 then
  return {"notready"}
end
if fill ~= "2" then
  redis.call("ZADD", KEYS[7], now, user)
end

local function split(csv)
  local out = {}
  for token in string.gmatch(csv, "[^,]+") do out[#out + 1] = token end
  return out
end

local function answer(source, key)
  local total = redis.call("ZLEXCOUNT", key, cmin, cmax)
  local reply = {source, total}
  if limit > 0 and total > 0 then
    local page
    if desc then
      page = redis.call("ZREVRANGEBYLEX", key, pmax, pmin, "LIMIT", offset, limit)
    else
      page = redis.call("ZRANGEBYLEX", key, pmin, pmax, "LIMIT", offset, limit)
    end
    if #page > 0 then
      local ids = {}
      for i, m in ipairs(page) do ids[i] = string.sub(m, 6) end
      local values = redis.call("HMGET", KEYS[1], unpack(ids))
      for i, m in ipairs(page) do
        reply[#reply + 1] = m
        reply[#reply + 1] = values[i] or ""
      end
    end
  end
  return reply
end

local viewkey
if view ~= "" then
  viewkey = prefix .. "p:" .. user .. ":" .. view
  if fill ~= "2" and redis.call("HEXISTS", KEYS[4], view) == 1 then
    redis.call("HSET", KEYS[4], view, now)
    redis.call("HINCRBY", KEYS[8], "hit", 1)
    return answer("precomputed", viewkey)
  end
  if fill ~= "2" then
    redis.call("HINCRBY", KEYS[8], "miss", 1)
  end
end

-- The user's clients, narrowed by the caller's filter.
local clients = redis.call("SMEMBERS", KEYS[2])
if ARGV[16] ~= "" then
  local allowed = {}
  for _, c in ipairs(clients) do allowed[c] = true end
  clients = {}
  for _, c in ipairs(split(ARGV[16])) do
    if allowed[c] then clients[#clients + 1] = c end
  end
end

-- The (type, status) pairs asked for.
local wanted_types, wanted_statuses = {}, {}
for _, t in ipairs(split(ARGV[14])) do wanted_types[t] = true end
for _, s in ipairs(split(ARGV[15])) do wanted_statuses[s] = true end
local pairs_ = {}
for _, pair in ipairs(redis.call("SMEMBERS", KEYS[6])) do
  local t, s = string.match(pair, "^(.-):(.*)$")
  if (ARGV[14] == "" or wanted_types[t]) and (ARGV[15] == "" or wanted_statuses[s]) then
    pairs_[#pairs_ + 1] = pair
  end
end

local keys = {}
for _, c in ipairs(clients) do
  for _, pair in ipairs(pairs_) do
    keys[#keys + 1] = prefix .. "z:" .. c .. ":" .. pair
  end
end

-- Lua's unpack() takes a few thousand values at most: long argument lists go in slices.
local SLICE = 1000

if ARGV[17] ~= "" then
  local tmp = KEYS[5]
  redis.call("DEL", tmp)
  for _, key in ipairs(keys) do
    local found = redis.call("ZRANGEBYLEX", key, ARGV[17], ARGV[18])
    for first = 1, #found, SLICE do
      local ids = {}
      for i = first, math.min(first + SLICE - 1, #found) do ids[#ids + 1] = string.sub(found[i], 6) end
      local heads = redis.call("HMGET", KEYS[1], unpack(ids))
      local args = {}
      for i, value in ipairs(heads) do
        if value then
          local updated_s = string.match(value, "^%d+ %S+ %S+ %d+ (%d+) ")
          args[#args + 1] = 0
          args[#args + 1] = "u" .. struct.pack(">I4", tonumber(updated_s)) .. ids[i]
        end
      end
      if #args > 0 then redis.call("ZADD", tmp, unpack(args)) end
    end
  end
  local reply = answer("index", tmp)
  redis.call("DEL", tmp)
  return reply
end

local dest = KEYS[5]
local keep = false
if viewkey and fill ~= "0" then
  dest, keep = viewkey, true
end

if #keys == 1 and not keep then
  return answer("index", keys[1])
end

redis.call("DEL", dest)
for first = 1, #keys, SLICE do
  local last = math.min(first + SLICE - 1, #keys)
  local args = {}
  if first > 1 then args[1] = dest end
  for i = first, last do args[#args + 1] = keys[i] end
  redis.call("ZUNIONSTORE", dest, #args, unpack(args))
end
if keep then
  -- A view holds one sort letter: drop the other's members.
  local next_letter = string.char(string.byte(letter) + 1)
  redis.call("ZREMRANGEBYLEX", dest, "-", "(" .. letter)
  redis.call("ZREMRANGEBYLEX", dest, "[" .. next_letter, "+")
  -- Registered with the writers (apply.lua, delete.lua) in this same step: from now on
  -- every write to the user's clients reaches this set.
  redis.call("HSET", KEYS[4], view, now)
  redis.call("SADD", prefix .. "vu:" .. view, user)
  redis.call("SADD", prefix .. "views", view)
  redis.call("HINCRBY", KEYS[8], "fill", 1)
end
local reply = answer("index", dest)
if not keep then
  redis.call("DEL", dest)
end
return reply
