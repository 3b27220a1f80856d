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
-- sorted set: the emails a user sees without seeing their client (mailbox, other links)
function K.extra_set(prefix, user, pair) return prefix .. "x:" .. user .. ":" .. pair end
-- set: the emails read from a user's mailbox
function K.mailbox(prefix, user) return prefix .. "mb:" .. user end
-- set: the emails linked to a client besides their own client_id
function K.secondary(prefix, client) return prefix .. "sc:" .. client end
-- set: the client ids a user may see
function K.user_clients(prefix, user) return prefix .. "uc:" .. user end
-- set: the "type:status" pairs present
function K.pairs(prefix) return prefix .. "ts" end
-- counter: bumped by every write to the installation's index; its values are the stamps
function K.data_version(prefix) return prefix .. "dv" end
-- hash: client id -> stamp of the last write that touched what the client makes visible
function K.client_stamps(prefix) return prefix .. "cs" end
-- hash: user id -> stamp of the last write to the user's mailbox emails or access list
function K.user_stamps(prefix) return prefix .. "us" end
-- sorted set: scratch of one query (the extra sets' members a client filter selects)
function K.scratch_extra(prefix) return prefix .. "tmpx" end
-- hash: meeting id -> "head|item JSON"
function K.payloads(prefix) return prefix .. "m" end
