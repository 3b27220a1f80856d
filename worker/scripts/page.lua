-- page.lua: reading one page of an answer from sorted sets (required by query.lua).
--
-- `q` is the page asked for: {payloads = the payload hash's key, desc = true for
-- descending order, offset, limit = numbers, cmin, cmax = lex bounds of the whole answer
-- (what the total counts), pmin, pmax = lex bounds of the page (narrowed by a cursor)}.

local function split(csv)
  local out = {}
  for item in string.gmatch(csv, "[^,]+") do out[#out + 1] = item end
  return out
end

-- The reply: source, total, then each member of the page with its payload.
local function with_payloads(q, reply, page)
  if #page > 0 then
    local ids = {}
    for i, m in ipairs(page) do ids[i] = string.sub(m, 6) end
    local values = redis.call("HMGET", q.payloads, unpack(ids))
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
local function answer(q, source, key, whole, size)
  size = size or q.limit
  local total
  if whole then
    total = redis.call("ZCARD", key)
  else
    total = redis.call("ZLEXCOUNT", key, q.cmin, q.cmax)
  end
  local page = {}
  if size > 0 and total > 0 then
    if q.desc then
      page = redis.call("ZREVRANGEBYLEX", key, q.pmax, q.pmin, "LIMIT", q.offset, size)
    else
      page = redis.call("ZRANGEBYLEX", key, q.pmin, q.pmax, "LIMIT", q.offset, size)
    end
  end
  return with_payloads(q, {source, total}, page)
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

-- A binary heap of {member, set index, seconds, id} in the page's order.
local function new_heap(desc)
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
  return push, pop, function() return n end
end

-- The answer from many sorted sets without merging them: the total is the sum of their
-- counts, and the page comes from a k-way merge that reads one member of a set at a time,
-- so it costs about (sets + offset + limit) reads, however large the sets are.
local function merged(q, source, keys)
  local total = 0
  for _, key in ipairs(keys) do total = total + redis.call("ZLEXCOUNT", key, q.cmin, q.cmax) end
  if q.limit == 0 or total == 0 then return {source, total} end
  local push, pop, size = new_heap(q.desc)
  local function next_of(key, after)
    local found
    if q.desc then
      found = redis.call("ZREVRANGEBYLEX", key, after and ("(" .. after) or q.pmax, q.pmin, "LIMIT", 0, 1)
    else
      found = redis.call("ZRANGEBYLEX", key, after and ("(" .. after) or q.pmin, q.pmax, "LIMIT", 0, 1)
    end
    return found[1]
  end
  for k, key in ipairs(keys) do
    local m = next_of(key, nil)
    if m then push(m, k) end
  end
  local page, taken = {}, 0
  while taken < q.offset + q.limit and size() > 0 do
    local top = pop()
    taken = taken + 1
    if taken > q.offset then page[#page + 1] = top[1] end
    local m = next_of(keys[top[2]], top[1])
    if m then push(m, top[2]) end
  end
  return with_payloads(q, {source, total}, page)
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

-- For the members `found` (of any sets of the installation), SLICE at a time: read their
-- payload heads, and ZADD into `dest` the members pick(client, members_of(...)) returns
-- (a list, or false to skip).  Returns how many meetings were picked.
local function copy_heads(payloads, found, dest, pick)
  local picked = 0
  for first = 1, #found, SLICE do
    local ids = {}
    for i = first, math.min(first + SLICE - 1, #found) do ids[#ids + 1] = string.sub(found[i], 6) end
    local args = {}
    for i, value in ipairs(redis.call("HMGET", payloads, unpack(ids))) do
      if value then
        local client, _, _, meeting_s, updated_s = parse_head(value)
        local chosen = pick(client, members_of(ids[i], meeting_s, updated_s))
        if chosen then
          for _, m in ipairs(chosen) do args[#args + 1] = 0; args[#args + 1] = m end
          picked = picked + 1
        end
      end
    end
    if #args > 0 then redis.call("ZADD", dest, unpack(args)) end
  end
  return picked
end
