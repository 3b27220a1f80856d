-- Shared by apply.lua and delete.lua (prepended when loaded): the precomputed views
-- of every user who may see a client, kept in step with the client's meetings.
local function view_matches(view, typ, status)
  local _, _, tlist, slist = string.find(view, "^(.-):(.-)$", 3)
  local function has(list, token)
    return list == "*" or string.find("," .. list .. ",", "," .. token .. ",", 1, true) ~= nil
  end
  return has(tlist, typ) and has(slist, status)
end

-- For each user who may see `client` and holds a precomputed view matching (typ, status):
-- ZADD (op "add") or ZREM (op "rem") the member of that view's sort letter.
local function fan_out(prefix, client, typ, status, members, op)
  local users = redis.call("SMEMBERS", prefix .. "cu:" .. client)
  local touched = 0
  for _, user in ipairs(users) do
    local views = redis.call("HKEYS", prefix .. "pv:" .. user)
    for _, view in ipairs(views) do
      if view_matches(view, typ, status) then
        local key = prefix .. "p:" .. user .. ":" .. view
        local m = members[string.sub(view, 1, 1)]
        if op == "add" then redis.call("ZADD", key, 0, m) else redis.call("ZREM", key, m) end
        touched = touched + 1
      end
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
