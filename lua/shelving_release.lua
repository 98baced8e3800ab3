#!lua flags=allow-oom
-- Shelving service mock: take back the books of one entry of {NS}:shelving:returns.
--
-- KEYS[1]  shelving returns stream ({NS}:shelving:returns)
-- KEYS[2]  shelving state hash ({NS}:shelving:state)
-- ARGV[1]  consumer group
-- ARGV[2]  returns entry id
-- ARGV[3]  N, the number of books
-- ARGV[4..3+N]  book ids
-- ARGV[4+N..3+2N]  the context each book was handed out to ('' or absent: any)
--
-- Returns 1 when released here, 0 when the entry was already processed. The state is
-- only changed together with the acknowledgement, and a book is only freed if it is
-- still handed out to the context it comes back from: neither a second consumer
-- processing the same entry later, nor a book handed back twice, can free a book that
-- has been handed out again since.
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
local n = tonumber(ARGV[3])
for i = 4, 3 + n do
  local context = ARGV[i + n]
  if context == nil or context == '' or redis.call('HGET', KEYS[2], ARGV[i]) == context then
    redis.call('HDEL', KEYS[2], ARGV[i])
  end
end
return 1
