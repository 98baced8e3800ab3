#!lua flags=allow-oom
-- Take over entries idle on other consumers (XAUTOCLAIM ... JUSTID), answering what
-- redis-py's xautoclaim drops: the ids of entries deleted from the stream, which Redis 7
-- removes from the pending list as it reports them. Whoever gets them is the only one
-- who ever will: it must finish them (a lend's reservation holds books).
--
-- KEYS[1]  the stream
-- ARGV[1]  consumer group
-- ARGV[2]  this consumer
-- ARGV[3]  the least idle time, in milliseconds
-- ARGV[4]  at most this many entries
--
-- Returns {claimed ids, deleted ids} (Redis 6.2 reports no deleted ids: a deleted entry
-- stays pending, and is claimed like the others).
-- allow-oom: a take-over writes nothing that grows (Redis 7 would refuse a flagless
-- script as a whole while out of memory, and entries of dead workers would wait).

local reply = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], '0-0', 'COUNT', ARGV[4], 'JUSTID')
return {reply[2], reply[3] or {}}
