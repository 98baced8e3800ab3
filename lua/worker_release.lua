#!lua flags=allow-oom
-- Release a worker id's liveness key, if this process still holds it.
--
-- KEYS[1]  worker key ({NS}:workers:<worker_id>)
-- ARGV[1]  this process's token
--
-- Returns 1 when released, 0 when another process holds the id.
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
