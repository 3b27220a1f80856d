-- query.lua: one secured page of one user's meetings, in one atomic step.
--
-- Client security comes first: the answer is built only from the sorted sets of the
-- clients in the user's access list (intersected with the caller's client filter), as
-- the list stands at this instant, and from the user's extra sets (emails seen through
-- another link or the user's own mailbox).  Sort fields are fixed letters; no key or
-- field name comes from the caller.  Building precomputed sets is build.lua's job: this
-- script only reads them, and says when the user's view is missing.
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
-- requires: page, merge
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
-- Reply:   {source, total, members, items}: the page's members concatenated (12 bytes
--          each), its items as one JSON array; source is "precomputed", "index", or
--          "index:fill" (answered by the index; the user's view `view` is missing and
--          worth building); or {"precomputed:head", head}: the first page of the user's
--          precomputed set as its cached head (page.lua head_of), for the caller to cut
--          (moving 6 KB through Lua strings costs more than the rest of the script); or,
--          alone, "notready" (the index does not mirror the caller's database and
--          generation), "toobig" (more than max_merge sets to merge and no precomputed
--          set) or "drift" (a member without its payload).
-- A view being built in slices has the last use "b:<build>": not served until complete.
local q = {payloads = KEYS[1], desc = descending == "1", offset = tonumber(offset), limit = tonumber(limit),
           cmin = cmin, cmax = cmax, pmin = pmin, pmax = pmax}

-- The answer from the user's precomputed set for `view` when it is there and complete
-- (nil otherwise); and the view's last use (nil: the view is missing).
local function from_view()
  if view == "" then return nil, nil end
  local used = redis.call("HGET", KEYS[4], view)
  if not used or string.sub(used, 1, 2) == "b:" then
    redis.call("HINCRBY", KEYS[8], "miss", 1)
    return nil, used
  end
  local viewkey = K.view_set(prefix, user, view)
  -- Last use and activity are kept to the minute: most hits write nothing else.
  if tonumber(now) - tonumber(used) >= 60 then
    redis.call("HSET", KEYS[4], view, now)
    redis.call("ZADD", KEYS[7], now, user)
  end
  redis.call("HINCRBY", KEYS[8], "hit", 1)
  if first_page == "1" and whole == "1" and q.limit <= HEAD then
    -- Fields "d" and "a" (an earlier layout used "desc" and "asc": never read as this one).
    local headkey, side = K.view_head(prefix, user, view), q.desc and "d" or "a"
    local blob = redis.call("HGET", headkey, side)
    if not blob then
      blob = head_of(q, viewkey)
      if not blob then return {"drift"}, used end
      redis.call("HSET", headkey, side, blob)
    end
    return {"precomputed:head", blob}, used
  end
  return answer(q, "precomputed", viewkey, whole == "1"), used
end

-- The user's clients, narrowed by the caller's filter; and `outside`: filtered clients
-- the user may not see, whose emails the user may still see (own mailbox, other links).
local function visible_clients()
  local clients = redis.call("SMEMBERS", KEYS[2])
  local outside, any_outside = {}, false
  if client_filter == "" then return clients, outside, any_outside end
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
  return clients, outside, any_outside
end

-- The (type, status) pairs asked for, among those present.
local function wanted_pairs()
  local wanted_types, wanted_statuses = {}, {}
  for _, t in ipairs(split(types)) do wanted_types[t] = true end
  for _, s in ipairs(split(statuses)) do wanted_statuses[s] = true end
  local found = {}
  for _, pair in ipairs(redis.call("SMEMBERS", KEYS[6])) do
    local t, s = string.match(pair, "^(.-):(.*)$")
    if (types == "" or wanted_types[t]) and (statuses == "" or wanted_statuses[s]) then
      found[#found + 1] = pair
    end
  end
  return found
end

-- The user's extra sets to merge: disjoint from the client sets (views.lua), so totals
-- stay sums.  Under a client filter, only the emails whose client_id the filter names,
-- copied into a scratch set.
local function extra_sets(pairs_, outside, any_outside)
  local found = {}
  if client_filter == "" then
    for _, pair in ipairs(pairs_) do
      local xkey = K.extra_set(prefix, user, pair)
      if redis.call("EXISTS", xkey) == 1 then found[#found + 1] = xkey end
    end
    return found
  end
  if not any_outside then return found end
  local scratch = K.scratch_extra(prefix)
  redis.call("DEL", scratch)
  local copied = 0
  for _, pair in ipairs(pairs_) do
    copied = copied + copy_heads(KEYS[1], redis.call("ZRANGEBYLEX", K.extra_set(prefix, user, pair), "[d", "(e"),
                                 scratch, function(client, m) return outside[client] and {m.d, m.u} end)
  end
  if copied > 0 then found[#found + 1] = scratch end
  return found
end

-- Sorted by updated_at, filtered on meeting_date: the matches of the date range, re-keyed
-- by their updated_at in the scratch set, answer.
local function rekeyed(keys)
  local tmp = KEYS[5]
  redis.call("DEL", tmp)
  for _, key in ipairs(keys) do
    copy_heads(KEYS[1], redis.call("ZRANGEBYLEX", key, dmin, dmax), tmp, function(_, m) return {m.u} end)
  end
  local reply = answer(q, "index", tmp)
  redis.call("DEL", tmp)
  return reply
end

if redis.call("GET", KEYS[3]) ~= token then
  return {"notready"}
end
local reply, used = from_view()
if reply then return reply end
redis.call("ZADD", KEYS[7], now, user)
local clients, outside, any_outside = visible_clients()
local pairs_ = wanted_pairs()
if #clients * #pairs_ > tonumber(max_merge) then
  return {"toobig"}
end
redis.call("HINCRBY", KEYS[8], "answer:index", 1)
local keys = {}
for _, c in ipairs(clients) do
  for _, pair in ipairs(pairs_) do keys[#keys + 1] = K.client_set(prefix, c, pair) end
end
for _, key in ipairs(extra_sets(pairs_, outside, any_outside)) do keys[#keys + 1] = key end
-- A missing view (not one being built) is worth building: build.lua's job, asked for by
-- the source.
local source = (view ~= "" and not used) and "index:fill" or "index"
if dmin ~= "" then
  reply = rekeyed(keys)
elseif #keys == 1 then
  reply = answer(q, source, keys[1])
elseif #keys <= 8 or q.offset + q.limit > 2000 then
  union_into(KEYS[5], keys)
  reply = answer(q, source, KEYS[5])
  redis.call("DEL", KEYS[5])
else
  reply = merged(q, source, keys)
end
redis.call("DEL", K.scratch_extra(prefix))
return reply
