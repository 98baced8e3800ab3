-- Read what a batch's decisions depend on, in one round trip, after WATCH.
--
-- KEYS[1]  lent-books hash ({NS}:lent-books)
-- KEYS[2..] user count keys ({NS}:user:<user_id>:count)
-- ARGV     book ids whose holder matters (the books of return requests)
--
-- Returns {counts, holders}: each count ('' when missing) and each book's holder
-- ('' when not lent). Changes nothing.
local counts = {}
if #KEYS > 1 then
  for k, count in ipairs(redis.call('MGET', unpack(KEYS, 2))) do counts[k] = count or '' end
end
local holders = {}
if #ARGV > 0 then
  for k, holder in ipairs(redis.call('HMGET', KEYS[1], unpack(ARGV))) do holders[k] = holder or '' end
end
return {counts, holders}
