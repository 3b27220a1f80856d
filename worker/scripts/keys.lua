-- keys.lua: the key templates of worker/keys.py, for the scripts (prepended to each by
-- the loader; tests/test_keys.py checks that both languages make the same keys).  Every
-- key of an installation starts with its prefix "{i:N}:", the hash tag that keeps it in
-- one Redis Cluster slot.
local K = {}

-- sorted set: one (client, type, status)'s meetings; `pair` is "type:status"
function K.client_set(prefix, client, pair) return prefix .. "z:" .. client .. ":" .. pair end
-- set: the users who may see the client
function K.client_users(prefix, client) return prefix .. "cu:" .. client end
-- sorted set: a user's precomputed secured result set for one view
function K.view_set(prefix, user, view) return prefix .. "p:" .. user .. ":" .. view end
-- hash: the cached first members of K.view_set, per order
function K.view_head(prefix, user, view) return prefix .. "ph:" .. user .. ":" .. view end
-- set: the users who hold a precomputed set for the view
function K.view_users(prefix, view) return prefix .. "vu:" .. view end
-- set: the view ids ever precomputed in the installation
function K.views(prefix) return prefix .. "views" end
