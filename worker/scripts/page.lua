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

-- The item JSON of each member of `page` (its payload without the head), or nil when a
-- payload is missing (the index has drifted).
local function items_of(q, page)
  local items = {}
  if #page == 0 then return items end
  local ids = {}
  for i, m in ipairs(page) do ids[i] = string.sub(m, 6) end
  for i, value in ipairs(redis.call("HMGET", q.payloads, unpack(ids))) do
    if not value then return nil end
    items[i] = string.sub(value, string.find(value, "|", 1, true) + 1)
  end
  return items
end

-- The reply, packed: {source, total, the page's members concatenated (12 bytes each), the
-- page's items as one JSON array}; {"drift"} when a payload is missing.
local function packed(q, source, total, page)
  local items = items_of(q, page)
  if not items then return {"drift"} end
  return {source, total, table.concat(page), "[" .. table.concat(items, ",") .. "]"}
end

-- The members of the page of one sorted set, and the total; `whole`: the set holds only
-- members of this query's letter and the query has no date range, so the total is the
-- set's size.  `size`: how many members (default: the query's limit).
local function range(q, key, whole, size)
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
  return page, total
end

-- The answer from one sorted set.
local function answer(q, source, key, whole)
  local page, total = range(q, key, whole)
  return packed(q, source, total, page)
end

-- The head of a precomputed set: its first HEAD members and items, in one string per
-- order in ph:<user>:<view>, so that the most common query (the first page) reads one
-- value and returns it as it is, for the caller to cut (worker/query.py unpack_head):
-- total and count (4 bytes each), the members (12 bytes each), the end offset of each
-- item in the items text (4 bytes each), the items joined by ",".  Every write that
-- touches the set deletes its head (views.lua, access.lua, build.lua, precompute.py).
-- nil when a payload is missing.
local HEAD = 21
local function head_of(q, key)
  local page, total = range(q, key, true, HEAD)
  local items = items_of(q, page)
  if not items then return nil end
  local offsets, pos = {}, 0
  for i, item in ipairs(items) do
    pos = pos + #item + (i > 1 and 1 or 0)
    offsets[i] = struct.pack(">I4", pos)
  end
  return struct.pack(">I4>I4", total, #page) .. table.concat(page) .. table.concat(offsets) .. table.concat(items, ",")
end

-- Values per call of a command with many arguments (Lua's unpack() takes a few thousand
-- values at most).
local SLICE = 1000

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
