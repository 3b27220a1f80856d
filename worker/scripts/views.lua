-- Shared by apply.lua, delete.lua and build.lua (prepended when loaded): the precomputed views
-- of every user who may see a client, kept in step with the client's meetings.
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

-- For each user who may see `client` and holds a precomputed view matching (typ, status):
-- ZADD (op "add") or ZREM (op "rem") the member of that view's sort letter.  Only users
-- in both cu:<client> and vu:<view> are visited, so the cost follows the users who hold
-- precomputed sets, not all who may see the client.
local function fan_out(prefix, client, typ, status, members, op)
  local touched = 0
  for _, view in ipairs(views_for(prefix, typ, status)) do
    local users = redis.call("SINTER", K.client_users(prefix, client), K.view_users(prefix, view))
    local m = members[string.sub(view, 1, 1)]
    for _, user in ipairs(users) do
      local key = K.view_set(prefix, user, view)
      if op == "add" then redis.call("ZADD", key, 0, m) else redis.call("ZREM", key, m) end
      redis.call("DEL", K.view_head(prefix, user, view))  -- its cached head
      touched = touched + 1
    end
  end
  return touched
end

local function parse_head(value)
  return string.match(value, "^(%d+) (%S+) (%S+) (%d+) (%d+) (%d+)|")
end

local function members_of(id, meeting_s, updated_s)
  return {d = "d" .. struct.pack(">I4", tonumber(meeting_s)) .. id,
          u = "u" .. struct.pack(">I4", tonumber(updated_s)) .. id}
end
