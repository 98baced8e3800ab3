#!lua
-- Queue a request sent to the HTTP API, at most once per idempotency key.
--
-- KEYS[1]  the request stream ({NS}:lend-requests or {NS}:return-requests)
-- KEYS[2]  optional: the client's idempotency key ({NS}:idempotency:<key>), a string
--          "<request_id> <fingerprint>"
-- ARGV[1]  user_id
-- ARGV[2]  book_ids, comma-separated
-- ARGV[3]  with KEYS[2]: the request's fingerprint (its action, user and books)
-- ARGV[4]  with KEYS[2]: how long the idempotency key is kept, in seconds
--
-- Returns {1, request_id} when the request was queued now; {0, request_id} when KEYS[2]
-- already names a request with the same fingerprint, and {-1, request_id} when it names
-- one with another fingerprint: then nothing is queued.
--
-- Failure first: the only read comes before any write, and the first write is the XADD
-- (refused as a whole under OOM, on a stream out of IDs or a key of the wrong type), so
-- a call that fails queues nothing and keeps no idempotency key.

if KEYS[2] then
  local stored = redis.call('GET', KEYS[2])
  if stored then
    local space = string.find(stored, ' ', 1, true)
    if not space then return {-1, stored} end  -- not ours to read: never the same request
    local request_id = string.sub(stored, 1, space - 1)
    if string.sub(stored, space + 1) == ARGV[3] then return {0, request_id} end
    return {-1, request_id}
  end
end
local request_id = redis.call('XADD', KEYS[1], '*', 'user_id', ARGV[1], 'book_ids', ARGV[2])
if KEYS[2] then redis.call('SET', KEYS[2], request_id .. ' ' .. ARGV[3], 'EX', ARGV[4]) end
return {1, request_id}
