-- views.lua: prepended to the scripts that write meetings or access lists (apply.lua,
-- delete.lua, access.lua, build.lua: their "requires" line): the precomputed views of
-- every user who may see a client, and the emails' reach (extra sets), kept in step with
-- the meetings.
local function view_matches(view, typ, status)
  local _, _, tlist, slist = string.find(view, "^(.-):(.-)$", 3)
  local function has(list, token)
    return list == "*" or string.find("," .. list .. ",", "," .. token .. ",", 1, true) ~= nil
  end
  return has(tlist, typ) and has(slist, status)
end

-- The views held by at least one user that (typ, status) belongs to; looked up once per
-- script call and per (typ, status).
local view_ids = nil
local views_cache = {}
local function views_for(prefix, typ, status)
  if view_ids == nil then
    view_ids = redis.call("SMEMBERS", K.views(prefix))
  end
  local pair = typ .. ":" .. status
  local found = views_cache[pair]
  if found == nil then
    found = {}
    for _, view in ipairs(view_ids) do
      if view_matches(view, typ, status) and redis.call("EXISTS", K.view_users(prefix, view)) == 1 then
        found[#found + 1] = view
      end
    end
    views_cache[pair] = found
  end
  return found
end

-- A precomputed view changed: drop its cached head, once per script call (only query.lua
-- writes heads, so one DEL per view stays true however many of its entries change).
local heads_dropped = {}
local function drop_head(prefix, user, view)
  local key = K.view_head(prefix, user, view)
  if not heads_dropped[key] then
    redis.call("DEL", key)
    heads_dropped[key] = true
  end
end

-- The users of (client, view), looked up once per script call: apply.lua and delete.lua
-- change neither set.
local holders_cache = {}

-- For each user who may see `client` and holds a precomputed view matching (typ, status):
-- ZADD (op "add") or ZREM (op "rem") the member of that view's sort letter.  Only users
-- in both cu:<client> and vu:<view> are visited, so the cost follows the users who hold
-- precomputed sets, not all who may see the client.
local function fan_out(prefix, client, typ, status, members, op)
  local touched = 0
  for _, view in ipairs(views_for(prefix, typ, status)) do
    local ck = client .. " " .. view
    local users = holders_cache[ck]
    if users == nil then
      users = redis.call("SINTER", K.client_users(prefix, client), K.view_users(prefix, view))
      holders_cache[ck] = users
    end
    local m = members[string.sub(view, 1, 1)]
    for _, user in ipairs(users) do
      local key = K.view_set(prefix, user, view)
      if op == "add" then redis.call("ZADD", key, 0, m) else redis.call("ZREM", key, m) end
      drop_head(prefix, user, view)
      touched = touched + 1
    end
  end
  return touched
end

-- An email's reach "<clients>/<users>": the clients it links to besides its own and the
-- users from whose mailboxes it was read.
local function split_reach(reach)
  local clients, users = {}, {}
  local cs, us = string.match(reach or "", "^([%d,]*)/([%d,]*)$")
  for c in string.gmatch(cs or "", "%d+") do clients[#clients + 1] = c end
  for u in string.gmatch(us or "", "%d+") do users[#users + 1] = u end
  return clients, users
end

-- What this script call touched, for the cached answers (answer_cache.lua): the clients
-- (a meeting's own client, old and new, and the others an email links to) and the users
-- (whose mailbox an email was read from, or whose access list changed).
local touched_clients, touched_users = {}, {}
local function touch(client, reach)
  if client then touched_clients[client] = true end
  local clients, users = split_reach(reach)
  for _, c in ipairs(clients) do touched_clients[c] = true end
  for _, u in ipairs(users) do touched_users[u] = true end
end

-- Stamp what was touched with the installation's next data version (worker/keys.py
-- client_stamps, user_stamps); nothing when nothing was touched.
local function stamp_touched(prefix)
  local fields = {[K.client_stamps(prefix)] = touched_clients, [K.user_stamps(prefix)] = touched_users}
  local version
  for key, set in pairs(fields) do
    local args = {}
    for id in pairs(set) do
      version = version or redis.call("INCR", K.data_version(prefix))
      args[#args + 1] = id
      args[#args + 1] = version
      if #args >= 1000 then redis.call("HSET", key, unpack(args)); args = {} end
    end
    if #args > 0 then redis.call("HSET", key, unpack(args)) end
  end
end

-- Op "add": remember the email in mb:<user> and sc:<client> of its reach, and put it in
-- x:<user>:<type>:<status> (and the matching precomputed views) of every user it reaches
-- who may not see its own client, so that each user sees it through exactly one set.
-- Op "rem": undo all of that for every user it reached.  Returns the view entries touched.
local function reach_write(prefix, id, client, typ, status, members, reach, op)
  local clients, users = split_reach(reach)
  if #clients == 0 and #users == 0 then return 0 end
  local add = op == "add"
  for _, u in ipairs(users) do redis.call(add and "SADD" or "SREM", K.mailbox(prefix, u), id) end
  for _, c in ipairs(clients) do redis.call(add and "SADD" or "SREM", K.secondary(prefix, c), id) end
  local reached, seen = {}, {}
  local function reach_user(u)
    if not seen[u] then seen[u] = true; reached[#reached + 1] = u end
  end
  for _, u in ipairs(users) do reach_user(u) end
  for _, c in ipairs(clients) do
    for _, u in ipairs(redis.call("SMEMBERS", K.client_users(prefix, c))) do reach_user(u) end
  end
  local views = views_for(prefix, typ, status)
  local touched = 0
  for _, u in ipairs(reached) do
    if not add or redis.call("SISMEMBER", K.user_clients(prefix, u), client) == 0 then
      local key = K.extra_set(prefix, u, typ .. ":" .. status)
      if add then
        redis.call("ZADD", key, 0, members.d, 0, members.u)
      else
        redis.call("ZREM", key, members.d, members.u)
      end
      for _, view in ipairs(views) do
        if redis.call("SISMEMBER", K.view_users(prefix, view), u) == 1 then
          local vkey, m = K.view_set(prefix, u, view), members[string.sub(view, 1, 1)]
          if add then redis.call("ZADD", vkey, 0, m) else redis.call("ZREM", vkey, m) end
          drop_head(prefix, u, view)
          touched = touched + 1
        end
      end
    end
  end
  return touched
end

-- Recompute x:<user>:* from the user's mailbox and the secondary links of the clients
-- the user may see now (after any change of the user's access list).
local function rebuild_extra(prefix, user, payloads_key)
  local pairs_ = redis.call("SMEMBERS", K.pairs(prefix))
  for _, pair in ipairs(pairs_) do redis.call("DEL", K.extra_set(prefix, user, pair)) end
  local allowed = {}
  local clients = redis.call("SMEMBERS", K.user_clients(prefix, user))
  for _, c in ipairs(clients) do allowed[c] = true end
  local ids, seen = {}, {}
  local function take(list)
    for _, id in ipairs(list) do
      if not seen[id] then seen[id] = true; ids[#ids + 1] = id end
    end
  end
  take(redis.call("SMEMBERS", K.mailbox(prefix, user)))
  for _, c in ipairs(clients) do take(redis.call("SMEMBERS", K.secondary(prefix, c))) end
  for first = 1, #ids, 500 do
    local batch = {}
    for i = first, math.min(first + 499, #ids) do batch[#batch + 1] = ids[i] end
    local heads = redis.call("HMGET", payloads_key, unpack(batch))
    for i, value in ipairs(heads) do
      if value then
        local client, typ, status, meeting_s, updated_s = parse_head(value)
        if not allowed[client] then
          local members = members_of(batch[i], meeting_s, updated_s)
          redis.call("ZADD", K.extra_set(prefix, user, typ .. ":" .. status), 0, members.d, 0, members.u)
        end
      end
    end
  end
end
