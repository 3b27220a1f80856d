-- query.lua: one secured page of one user's meetings, in one atomic step.
--
-- Client security comes first: the answer is built only from the sorted sets of the
-- clients in the user's access list (intersected with the caller's client filter), as
-- the list stands at this instant.  Sort fields are fixed letters; no key or field name
-- comes from the caller.  Building precomputed sets is build.lua's job: this script only
-- reads them, and says when the user's view is missing.
--
-- KEYS[1]  {i:N}:m          hash  7-byte id -> "head|item JSON"
-- KEYS[2]  {i:N}:uc:<user>  set   client ids the user may see
-- KEYS[3]  {i:N}:ready      string "<database_id>:<generation>" of a complete index
-- KEYS[4]  {i:N}:pv:<user>  hash  view -> last use
-- KEYS[5]  {i:N}:tmp        scratch sorted set, deleted before the script returns
-- KEYS[6]  {i:N}:ts         set   "type:status" pairs present
-- KEYS[7]  {i:N}:active     zset  user -> last query time
-- KEYS[8]  {i:N}:stats      hash  hit / miss counters of the precomputed sets
--
-- Further keys derived from the prefix (keys.lua): z:<client>:<pair>, x:<user>:<pair>,
-- p:<user>:<view>, ph:<user>:<view>, tmpx.
-- requires: views
--
-- ARGV (worker/query.py QueryArgs):
local prefix = ARGV[1]         -- the installation's key prefix "{i:N}:" (worker/scripts/keys.lua)
local token = ARGV[2]          -- the caller's "<database_id>:<generation>": answer only when KEYS[3] holds it
local user = ARGV[3]           -- user id
local view = ARGV[4]           -- view id when a precomputed set may answer, else ""
local letter = ARGV[5]         -- sort letter, "d" or "u"
local descending = ARGV[6]     -- "1" for descending order
local cmin = ARGV[7]           -- lex bounds (min, max) of the whole result: the total counts these
local cmax = ARGV[8]
local pmin = ARGV[9]           -- lex bounds (min, max) of the page (narrowed by a cursor)
local pmax = ARGV[10]
local offset = ARGV[11]        -- rows to skip
local limit = ARGV[12]         -- rows to return (0: count only)
local now = ARGV[13]           -- epoch seconds
local types = ARGV[14]         -- types, comma separated, "" for any
local statuses = ARGV[15]      -- statuses, comma separated, "" for any
local client_filter = ARGV[16] -- client ids, comma separated, "" for no filter
local dmin = ARGV[17]          -- lex bounds on meeting_date members when the sort is updated_at and a
local dmax = ARGV[18]          --   date range is given, else "": matches are re-keyed by updated_at
local max_merge = ARGV[19]     -- most sorted sets one answer may merge (more would hold Redis too long)
local whole = ARGV[20]         -- "1" when the count bounds are the whole letter (no date range)
local first_page = ARGV[21]    -- "1" for offset 0 and no cursor: a precomputed set's head may answer
--
-- Reply:   {source, total, member1, payload1, member2, payload2, ...}; source is
--          "precomputed", "index", or "index:fill" (answered by the index; the user's
--          view `view` is missing and worth building); or, alone, "notready" (the index
--          does not mirror the caller's database and generation) or "toobig" (more than
--          max_merge sets to merge and no precomputed set).
--
-- A user's view being built in slices has the last-use value "b:<build>" in
-- pv:<user>: writers already keep it fresh, but it is not served until complete.
local desc = descending == "1"
offset, limit = tonumber(offset), tonumber(limit)

if redis.call("GET", KEYS[3]) ~= token then
  return {"notready"}
end

local function split(csv)
  local out = {}
  for item in string.gmatch(csv, "[^,]+") do out[#out + 1] = item end
  return out
end

-- The reply: source, total, then each member of the page with its payload.
local function with_payloads(reply, page)
  if #page > 0 then
    local ids = {}
    for i, m in ipairs(page) do ids[i] = string.sub(m, 6) end
    local values = redis.call("HMGET", KEYS[1], unpack(ids))
    for i, m in ipairs(page) do
      reply[#reply + 1] = m
      reply[#reply + 1] = values[i] or ""
    end
  end
  return reply
end

-- The answer from one sorted set; `whole`: the set holds only members of this query's
-- letter and the query has no date range, so the total is the set's size.  `size`: how
-- many members to return (default: the query's limit).
local function answer(source, key, whole, size)
  size = size or limit
  local total
  if whole then
    total = redis.call("ZCARD", key)
  else
    total = redis.call("ZLEXCOUNT", key, cmin, cmax)
  end
  local page = {}
  if size > 0 and total > 0 then
    if desc then
      page = redis.call("ZREVRANGEBYLEX", key, pmax, pmin, "LIMIT", offset, size)
    else
      page = redis.call("ZRANGEBYLEX", key, pmin, pmax, "LIMIT", offset, size)
    end
  end
  return with_payloads({source, total}, page)
end

-- The head of a precomputed set: its first HEAD members with their payloads, in one
-- string per order in ph:<user>:<view>, so that the most common query (the first page)
-- reads one value instead of a range and a payload per item.  Every write that touches
-- the set deletes its head (views.lua, access.lua, build.lua, precompute.py).
local HEAD = 21
local function pack_head(reply)
  local parts = {struct.pack(">I4", reply[2])}
  for i = 3, #reply do parts[#parts + 1] = struct.pack(">I4", #reply[i]) .. reply[i] end
  return table.concat(parts)
end
local function unpack_head(blob, source, size)
  local total = struct.unpack(">I4", blob, 1)
  local reply = {source, total}
  local pos, n = 5, 0
  while pos <= #blob and n < 2 * size do
    local len = struct.unpack(">I4", blob, pos)
    reply[#reply + 1] = string.sub(blob, pos + 4, pos + 3 + len)
    pos = pos + 4 + len
    n = n + 1
  end
  return reply
end

-- A member's order as numbers (Lua compares strings with the server's locale, not
-- byte for byte): seconds, then the 7-byte id, exact below 2^53.
local function order_of(m)
  local b1, b2, b3, b4, b5, b6, b7 = string.byte(m, 6, 12)
  return struct.unpack(">I4", m, 2), ((((((b1 * 256 + b2) * 256 + b3) * 256 + b4) * 256 + b5) * 256 + b6) * 256 + b7)
end

-- The answer from many sorted sets without merging them: the total is the sum of their
-- counts, and the page comes from a k-way merge that reads one member of a set at a time,
-- so it costs about (sets + offset + limit) reads, however large the sets are.
local function merged(source, keys)
  local total = 0
  for _, key in ipairs(keys) do total = total + redis.call("ZLEXCOUNT", key, cmin, cmax) end
  if limit == 0 or total == 0 then return {source, total} end
  local heap, n = {}, 0
  local function before(a, b)
    if a[3] ~= b[3] then
      if desc then return a[3] > b[3] else return a[3] < b[3] end
    end
    if desc then return a[4] > b[4] else return a[4] < b[4] end
  end
  local function push(m, k)
    local s, id = order_of(m)
    n = n + 1
    heap[n] = {m, k, s, id}
    local i = n
    while i > 1 do
      local parent = math.floor(i / 2)
      if not before(heap[i], heap[parent]) then break end
      heap[i], heap[parent] = heap[parent], heap[i]
      i = parent
    end
  end
  local function pop()
    local top = heap[1]
    heap[1] = heap[n]
    heap[n] = nil
    n = n - 1
    local i = 1
    while true do
      local l, r, best = 2 * i, 2 * i + 1, i
      if l <= n and before(heap[l], heap[best]) then best = l end
      if r <= n and before(heap[r], heap[best]) then best = r end
      if best == i then break end
      heap[i], heap[best] = heap[best], heap[i]
      i = best
    end
    return top
  end
  local function next_of(key, after)
    local found
    if desc then
      found = redis.call("ZREVRANGEBYLEX", key, after and ("(" .. after) or pmax, pmin, "LIMIT", 0, 1)
    else
      found = redis.call("ZRANGEBYLEX", key, after and ("(" .. after) or pmin, pmax, "LIMIT", 0, 1)
    end
    return found[1]
  end
  for k, key in ipairs(keys) do
    local m = next_of(key, nil)
    if m then push(m, k) end
  end
  local page, taken = {}, 0
  while taken < offset + limit and n > 0 do
    local top = pop()
    taken = taken + 1
    if taken > offset then page[#page + 1] = top[1] end
    local m = next_of(keys[top[2]], top[1])
    if m then push(m, top[2]) end
  end
  return with_payloads({source, total}, page)
end

-- Merge `keys` into `dest` with ZUNIONSTORE, in slices (Lua's unpack() takes a few
-- thousand values at most).
local SLICE = 1000
local function union_into(dest, keys)
  redis.call("DEL", dest)
  for first = 1, #keys, SLICE do
    local args = {}
    if first > 1 then args[1] = dest end
    for i = first, math.min(first + SLICE - 1, #keys) do args[#args + 1] = keys[i] end
    redis.call("ZUNIONSTORE", dest, #args, unpack(args))
  end
end

local used
if view ~= "" then
  used = redis.call("HGET", KEYS[4], view)
  if used and string.sub(used, 1, 2) ~= "b:" then
    local viewkey = K.view_set(prefix, user, view)
    -- Last use and activity are kept to the minute: most hits write nothing else.
    if tonumber(now) - tonumber(used) >= 60 then
      redis.call("HSET", KEYS[4], view, now)
      redis.call("ZADD", KEYS[7], now, user)
    end
    redis.call("HINCRBY", KEYS[8], "hit", 1)
    if first_page == "1" and whole == "1" and limit <= HEAD then
      local headkey, side = K.view_head(prefix, user, view), desc and "desc" or "asc"
      local blob = redis.call("HGET", headkey, side)
      if blob then
        return unpack_head(blob, "precomputed", limit)
      end
      local reply = answer("precomputed", viewkey, true, HEAD)
      redis.call("HSET", headkey, side, pack_head(reply))
      return unpack_head(pack_head(reply), "precomputed", limit)
    end
    return answer("precomputed", viewkey, whole == "1")
  end
  redis.call("HINCRBY", KEYS[8], "miss", 1)
end
redis.call("ZADD", KEYS[7], now, user)

-- The user's clients, narrowed by the caller's filter; `outside`: filtered clients the
-- user may not see, whose emails the user may still see (own mailbox, other links).
local clients = redis.call("SMEMBERS", KEYS[2])
local outside, any_outside = {}, false
if client_filter ~= "" then
  local allowed = {}
  for _, c in ipairs(clients) do allowed[c] = true end
  clients = {}
  for _, c in ipairs(split(client_filter)) do
    if allowed[c] then
      clients[#clients + 1] = c
    elseif not outside[c] then
      outside[c], any_outside = true, true
    end
  end
end

-- The (type, status) pairs asked for.
local wanted_types, wanted_statuses = {}, {}
for _, t in ipairs(split(types)) do wanted_types[t] = true end
for _, s in ipairs(split(statuses)) do wanted_statuses[s] = true end
local pairs_ = {}
for _, pair in ipairs(redis.call("SMEMBERS", KEYS[6])) do
  local t, s = string.match(pair, "^(.-):(.*)$")
  if (types == "" or wanted_types[t]) and (statuses == "" or wanted_statuses[s]) then
    pairs_[#pairs_ + 1] = pair
  end
end

if #clients * #pairs_ > tonumber(max_merge) then
  return {"toobig"}
end
redis.call("HINCRBY", KEYS[8], "answer:index", 1)
local keys = {}
for _, c in ipairs(clients) do
  for _, pair in ipairs(pairs_) do
    keys[#keys + 1] = K.client_set(prefix, c, pair)
  end
end

-- The emails the user sees without seeing their client: disjoint from the client sets
-- (views.lua), so totals stay sums.  Under a client filter, only those whose client_id
-- the filter names, copied into a scratch set.
local scratch_extra = K.scratch_extra(prefix)
if client_filter == "" then
  for _, pair in ipairs(pairs_) do
    local xkey = K.extra_set(prefix, user, pair)
    if redis.call("EXISTS", xkey) == 1 then keys[#keys + 1] = xkey end
  end
elseif any_outside then
  redis.call("DEL", scratch_extra)
  local found = 0
  for _, pair in ipairs(pairs_) do
    local members = redis.call("ZRANGEBYLEX", K.extra_set(prefix, user, pair), "[d", "(e")
    for first = 1, #members, SLICE do
      local ids = {}
      for i = first, math.min(first + SLICE - 1, #members) do ids[#ids + 1] = string.sub(members[i], 6) end
      local heads = redis.call("HMGET", KEYS[1], unpack(ids))
      for i, value in ipairs(heads) do
        if value then
          local client, _, _, meeting_s, updated_s = parse_head(value)
          if outside[client] then
            redis.call("ZADD", scratch_extra, 0, "d" .. struct.pack(">I4", tonumber(meeting_s)) .. ids[i],
                       0, "u" .. struct.pack(">I4", tonumber(updated_s)) .. ids[i])
            found = found + 1
          end
        end
      end
    end
  end
  if found > 0 then keys[#keys + 1] = scratch_extra end
end

local function respond(reply)
  redis.call("DEL", scratch_extra)
  return reply
end

if dmin ~= "" then
  -- Sorted by updated_at, filtered on meeting_date: collect the matches from the date
  -- range and re-key them by their updated_at.
  local tmp = KEYS[5]
  redis.call("DEL", tmp)
  for _, key in ipairs(keys) do
    local found = redis.call("ZRANGEBYLEX", key, dmin, dmax)
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
  return respond(reply)
end

-- A missing view (not one being built) is worth building: build.lua's job, asked for by
-- the source.
local source = (view ~= "" and not used) and "index:fill" or "index"
if #keys == 1 then
  return respond(answer(source, keys[1]))
end
if #keys <= 8 or offset + limit > 2000 then
  union_into(KEYS[5], keys)
  local reply = answer(source, KEYS[5])
  redis.call("DEL", KEYS[5])
  return respond(reply)
end
return respond(merged(source, keys))
