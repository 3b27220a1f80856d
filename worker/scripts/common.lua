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
