-- merge.lua: one page of an answer spread over many sorted sets (required by query.lua,
-- after page.lua): a k-way merge that reads one member of a set at a time, or a
-- ZUNIONSTORE into a scratch set.

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
  if q.limit == 0 or total == 0 then return {source, total, "", "[]"} end
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
  return packed(q, source, total, page)
end

-- Merge `keys` into `dest` with ZUNIONSTORE, SLICE sets at a time.
local function union_into(dest, keys)
  redis.call("DEL", dest)
  for first = 1, #keys, SLICE do
    local args = {}
    if first > 1 then args[1] = dest end
    for i = first, math.min(first + SLICE - 1, #keys) do args[#args + 1] = keys[i] end
    redis.call("ZUNIONSTORE", dest, #args, unpack(args))
  end
end
