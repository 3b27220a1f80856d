-- common.lua: prepended to every script by the loader (worker/redis_index.py).

-- How many applied write ids {i:N}:w keeps (worker/keys.py RECENT_WRITES).
local RECENT_WRITES = 16

-- Remember that the write `write_id` reached the index ("" for none).
local function remember_write(key, write_id)
  if write_id ~= "" then
    redis.call("LPUSH", key, write_id)
    redis.call("LTRIM", key, 0, RECENT_WRITES - 1)
  end
end

-- A payload's head "client type status meeting_s updated_s updated_us[ reach]" (before
-- its "|" and item JSON; worker/redis_index.py head) as its fields, strings; reach is ""
-- when none.  Every script reads heads with this one function.
local function parse_head(value)
  return string.match(value, "^(%d+) (%S+) (%S+) (%d+) (%d+) (%d+) ?([%d,/]*)[|]?")
end

-- A meeting's sorted-set members, one per sort letter (worker/keys.py member): the letter,
-- the seconds as 4 big-endian bytes, the 7-byte id.
local function members_of(id, meeting_s, updated_s)
  return {d = "d" .. struct.pack(">I4", tonumber(meeting_s)) .. id,
          u = "u" .. struct.pack(">I4", tonumber(updated_s)) .. id}
end
