-- Shelving service mock: take back the books of one entry of {NS}:shelving:returns.
--
-- KEYS[1]  shelving returns stream ({NS}:shelving:returns)
-- KEYS[2]  shelving state hash ({NS}:shelving:state)
-- ARGV[1]  consumer group
-- ARGV[2]  returns entry id
-- ARGV[3..] book ids
--
-- Returns 1 when released here, 0 when the entry was already processed. The state is
-- only changed together with the acknowledgement: a second consumer processing the
-- same entry later must not free a book that has been handed out again since.
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
if #ARGV > 2 then redis.call('HDEL', KEYS[2], unpack(ARGV, 3)) end
return 1
