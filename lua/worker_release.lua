#!lua flags=allow-oom
-- Release a worker id, if this process still holds it.
--
-- KEYS[1]  worker key ({NS}:workers:<worker_id>)
-- KEYS[2]  the ids of workers that started in the namespace ({NS}:workers)
-- KEYS[3]  this worker's info ({NS}:worker-info:<worker_id>)
-- ARGV[1]  this process's token
-- ARGV[2]  this worker's id
--
-- Returns 1 when released, 0 when another process holds the id.
-- allow-oom: it only deletes.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1], KEYS[3])
redis.call('SREM', KEYS[2], ARGV[2])
return 1
